"""The scheduler server: continuous batching, policies, preemption (see ipc/protocol/scheduler.py)."""

from services.scheduler.config import PolicyConfig, PolicyName, SchedulerConfig
from services.scheduler.engine import Backend, Engine, Model

__all__ = ["Backend", "Engine", "Model", "PolicyConfig", "PolicyName", "SchedulerConfig"]
