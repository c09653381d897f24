"""Liveness constants shared by the kernel, services and clients (Paranoid Pirate)."""

HEARTBEAT_INTERVAL_S = 1.0
# A peer is dead after this many intervals without hearing anything from it.
HEARTBEAT_LIVENESS = 3
HEARTBEAT_EXPIRY_S = HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS
