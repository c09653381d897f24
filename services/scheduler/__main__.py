import sys

from services.scheduler.service import SchedulerService

# The engine's text runs in a worker thread (_text.py) beside its event loop;
# a pure-Python tokenizer holds the GIL there, and every socket send on the
# loop releases it. At the default 5 ms switch interval the loop then waited
# up to 5 ms to get it back, once per send (zmq send showed as a tenth of the
# scheduler's samples); 0.5 ms keeps the loop's wait below a tenth of a step.
sys.setswitchinterval(0.0005)
SchedulerService.main()
