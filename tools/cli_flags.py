"""What every `llmos` subcommand shares: a client connected by the global
flags (--endpoint, --home, --api-key) and the flags of one generation
(`generate` and `jobs submit`)."""

from __future__ import annotations

import argparse
import os
from typing import Any


def connect(args: argparse.Namespace) -> Any:
    """A sync client from the global flags (--endpoint, --home, --api-key)."""
    from sdk.client import Client

    return Client.connect(args.endpoint, home=args.home, api_key=api_key(args))


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else $LLMOS_API_KEY, else None (the local operator's admin.key, if readable)."""
    key = args.api_key if args.api_key is not None else os.environ.get("LLMOS_API_KEY")
    return key.strip() or None if key is not None else None


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The flags of one generation, shared by `generate` and `jobs submit`."""
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--priority", type=int, default=0, help="lower runs first (policy 'priority')")
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--session", default="",
                   help="a conversation's name: send only the new text; the scheduler keeps the history and its KV")


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                priority=args.priority, stop=args.stop or (), session=args.session)
