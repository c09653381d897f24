"""Chaos, fuzz and load: the recovery contract (DESIGN.md §6) as a repeatable
experiment. `llmos chaos` records a history of client operations while faults
are injected on a seeded schedule, then checks it (Jepsen style)."""
