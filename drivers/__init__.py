"""Device drivers: the `Driver` contract (base.py), CPU and CUDA drivers, and
the model code they run (model/).

A driver's OpenMP threads wait passively (sleep) between parallel regions
instead of spinning: a driver shares the machine's cores with the kernel, the
memory server and the scheduler, whose work between two steps spinning
threads would starve. On 2 shared cores the default spin gave a fifth of the
tokens/s through the whole system (tools/bench/serve.py). Set
OMP_WAIT_POLICY yourself to choose otherwise; it is read when torch loads, so
this runs before any driver module imports torch.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
