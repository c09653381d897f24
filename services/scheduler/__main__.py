import gc
import sys

from services.scheduler.service import SchedulerService

# The engine's text runs in a worker thread (_text.py) beside its event loop;
# a pure-Python tokenizer holds the GIL there, and every socket send on the
# loop releases it. At the default 5 ms switch interval the loop then waited
# up to 5 ms to get it back, once per send (zmq send showed as a tenth of the
# scheduler's samples); 0.5 ms keeps the loop's wait below a tenth of a step.
sys.setswitchinterval(0.0005)
# The cyclic collector's youngest generation ran each 700 net allocations
# (the default): a step at 256 sequences holds ~1,000 short-lived lists at
# once (its deltas' block lists, its TokenDeltas' slices) and makes no
# cyclic garbage, yet that ran it twice a step and a full collection every
# ~60 steps, ~11% of this process's CPU at 0 ms b256 (docs/benchmarks.md).
# At 10,000 a step's objects die by reference count before it runs.
gc.set_threshold(10_000, 10, 10)
SchedulerService.main()
