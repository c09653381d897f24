"""The scheduler server: continuous batching, policies, preemption (see ipc/protocol/scheduler.py)."""

from common.config.scheduler import PolicyConfig, PolicyName, SchedulerConfig
from services.scheduler.engine import Backend, Engine, Model

__all__ = ["Backend", "Engine", "Model", "PolicyConfig", "PolicyName", "SchedulerConfig"]
