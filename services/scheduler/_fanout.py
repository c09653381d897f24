"""n > 1 by copy-on-write: the choices of one prompt share its KV.

The choices arrive as Submits naming one `fork_group` of `fork_size` (one
Submit each: its own stream, request id and seed). The first to arrive
starts the group's *prefix*: an internal sequence of the prompt without its
last token, which runs like any other (chunked, preemptible, recomputed
after a loss). Its one sampled token is thrown away. Once it is done, each
choice that has arrived is forked from it (memory `Fork`: the children
share its blocks; the partial block is copied on first write) and joins the
waiting line with positions [0, P-1) computed. So the prompt's KV is
computed once, and each choice computes only the prompt's last position,
where its own first token is sampled with its own seed.

A finished prefix waits up to FORK_WAIT_S for the rest of its group; a
choice that arrives later runs on its own (the prompt's full blocks are in
the prefix cache by then). Forking is an optimisation, never a condition: a
choice whose prefix failed, was lost, or whose fork the memory server
refused runs on its own from token 0.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from ipc.protocol import memory as mp
from ipc.protocol.scheduler import FinishReason
from services.scheduler._request import Request, Seq
from services.scheduler._state import EngineState
from text.stream import TextStream
from text.tokenizer import Tokenizer

FORK_WAIT_S = 2.0
# Groups remembered after their fork, so a choice that comes later runs alone
# at once rather than start a prefix of its own and wait for a group that is gone.
REMEMBER_FORKED = 1024


@dataclass(eq=False)
class _Group:
    key: tuple[str, str]
    size: int
    prompt: list[int]
    prefix: Request
    members: list[Request] = field(default_factory=list)
    done_at: float = 0.0  # monotonic; 0: the prefix is still running
    incarnation: int = -1  # of the prefix's driver when it finished


class ForkGroups:
    """The fork groups whose choices wait for their prefix (or for the rest
    of the group). `new_seq_id` gives the prefix sequences their ids."""

    def __init__(self, state: EngineState, new_seq_id: Callable[[], int]):
        self.state = state
        self._new_seq_id = new_seq_id
        self._groups: dict[tuple[str, str], _Group] = {}
        self._prefixes: dict[int, _Group] = {}  # prefix seq id -> its group
        self._over: OrderedDict[tuple[str, str], None] = OrderedDict()  # forked or failed groups
        self.forked = 0  # choices that started from a fork (stats, tests)

    @property
    def pending(self) -> bool:
        """A finished prefix waits to be forked."""
        return any(g.done_at for g in self._groups.values())

    def arrive(self, req: Request, tokenizer: Tokenizer) -> bool:
        """Hold a new request of a fork group for its prefix; False when it
        is not one to fork (the caller enqueues it as usual)."""
        msg = req.submit
        if not msg.fork_group or len(req.prompt_ids) < 2 or msg.resume_ids or req.session is not None:
            return False
        key = (req.key[0], msg.fork_group)
        g = self._groups.get(key)
        if g is None and key in self._over:
            return False
        if g is None:
            g = self._groups[key] = _Group(key, msg.fork_size, req.prompt_ids, self._prefix(req, tokenizer))
            self._prefixes[g.prefix.seq.seq_id] = g
            self.state.enqueue(g.prefix.seq)
        elif g.prompt != req.prompt_ids or len(g.members) >= g.size:
            return False  # not this group's prompt, or one too many: it runs on its own
        g.members.append(req)
        return True

    def _prefix(self, first: Request, tokenizer: Tokenizer) -> Request:
        prompt = first.prompt_ids[:-1]
        seq = Seq(self._new_seq_id(), list(prompt), len(prompt), tenant=first.seq.tenant,
                  priority=first.seq.priority, arrival=time.monotonic(), max_len=len(prompt) + 1)
        # One sampled token, thrown away: no stop ids, no logprobs, no deadline.
        params = msgspec.structs.replace(first.submit.params, logprobs=0)
        submit = msgspec.structs.replace(first.submit, prompt="", prompt_ids=prompt, params=params, max_tokens=1,
                                         stop=[], request_id=f"{first.submit.fork_group}/prefix", deadline_ns=0,
                                         fork_group="", fork_size=0)
        text = TextStream(tokenizer, prompt, [])
        return Request((first.key[0], submit.request_id), submit, prompt, seq, text, frozenset(), len(prompt) + 1)

    def ended(self, req: Request, reason: FinishReason) -> bool:
        """Whether `req` is a group's prefix (then this takes its end: its KV
        is kept for the fork, or, when it failed, its choices go on alone)."""
        g = self._prefixes.pop(req.seq.seq_id, None)
        if g is None or g.prefix is not req:
            return False
        seq = req.seq
        self.state.remove(seq)
        self.state.policy.on_finished(seq)
        req.finish(reason)
        driver = self.state.drivers.get(seq.pool or "")
        if reason == FinishReason.LENGTH and seq.num_computed == len(g.prompt) - 1 and driver is not None:
            g.done_at, g.incarnation = time.monotonic(), driver.incarnation
            self.state.wake()
        else:
            self._dissolve(g)
        return True

    async def apply(self) -> None:
        """Fork the groups whose prefix is done and whose choices have all
        arrived (or waited long enough). Before the step's plan and its
        Release: the prefix's KV is released after its children took it."""
        now = time.monotonic()
        ready = [g for g in self._groups.values()
                 if g.done_at and (len(g.members) >= g.size or now - g.done_at >= FORK_WAIT_S)]
        for g in ready:
            await self._fork(g)

    async def _fork(self, g: _Group) -> None:
        prefix = g.prefix.seq
        live = [m for m in g.members if not m.done.is_set()]
        driver = self.state.drivers.get(prefix.pool or "")
        failed: set[int] = {m.seq.seq_id for m in live}
        if live and driver is not None and driver.incarnation == g.incarnation:
            pairs = [mp.ForkItem(prefix.seq_id, m.seq.seq_id) for m in live]
            reply = await self.state.memory(self.state.backend.fork(mp.Fork(pairs)))
            if isinstance(reply, mp.ForkReply):
                failed = {f.seq_id for f in reply.failures}
        for m in live:
            if m.seq.seq_id not in failed:
                _take_kv(m.seq, prefix)
                m.cached_tokens = g.prefix.cached_tokens  # what the prefix found in the prefix cache
                m.forked_tokens = prefix.num_computed - g.prefix.cached_tokens
                self.forked += 1
        self._dissolve(g)

    def _dissolve(self, g: _Group) -> None:
        """The group is over: its prefix's KV released, its choices in line."""
        self._groups.pop(g.key, None)
        self._prefixes.pop(g.prefix.seq.seq_id, None)
        self._over[g.key] = None
        if len(self._over) > REMEMBER_FORKED:
            self._over.popitem(last=False)
        self.state.release(g.prefix.seq)
        for m in g.members:
            if not m.done.is_set():
                self.state.enqueue(m.seq)
        g.members.clear()


def _take_kv(child: Seq, parent: Seq) -> None:
    """`child` (the whole prompt) now holds the KV of `parent` (the prompt
    without its last token), as the memory server's fork gave it."""
    child.pool = parent.pool
    child.block_table = list(parent.block_table)
    child.num_computed = parent.num_computed
    child.mem_known = parent.mem_known
    child.served = child.high_water = parent.num_computed


__all__ = ["FORK_WAIT_S", "ForkGroups"]
