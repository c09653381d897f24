"""The memory server: the KV cache as virtual memory (see ipc/protocol/memory.py)."""

from common.config.memory import MemoryConfig
from services.memory.manager import MemoryManager

__all__ = ["MemoryConfig", "MemoryManager"]
