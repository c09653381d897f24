"""`python -m kernel.ray_child PARENT_PID MODULE ARGS...`: run `python -m
MODULE ARGS...` in this process, set first to be SIGKILLed when the Ray
actor that started it dies (PR_SET_PDEATHSIG; Linux). Set here rather than
in a `preexec_fn`, which is unsafe in the actor's threaded worker; if the
actor died before the setting took, the child exits at once."""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, module, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the child then outlives a lost actor until the kernel's heartbeats end it
    if os.getppid() != parent:
        sys.exit(f"kernel.ray_child: the actor that started {module} is gone")
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
