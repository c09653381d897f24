"""The Responses API over the whole system (security, memory, a CPU driver,
the scheduler, the gateway as real processes, auth on), through the real
`openai` package's `client.responses`: a chain of responses is a session
the OS keeps, so each turn sends only its new input."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import anyio
import pytest

from ipc.protocol import security as sec
from tools.testing import running_llmos
from tests.helpers.net import free_port
from tests.helpers.stacks import gateway_children


def total(r: Any) -> int:
    return int(r.usage.input_tokens + r.usage.output_tokens)


async def test_a_chain_of_responses_is_a_session_the_os_keeps(home: Path, checkpoint: Path) -> None:
    openai = await anyio.to_thread.run_sync(importlib.import_module, "openai")
    port = free_port()
    async with running_llmos(home, gateway_children(checkpoint, port), auth=True, ready_timeout=120) as llmos:
        admin = llmos.client
        keys = [(await admin.call(sec.SECURITY, sec.CreateKey(who, ["generate", "session"]))).api_key
                for who in ("alice", "bob")]
        base = f"http://127.0.0.1:{port}/v1"
        alice, bob = (openai.AsyncOpenAI(base_url=base, api_key=k, max_retries=0, timeout=120) for k in keys)
        opts: dict[str, Any] = {"model": str(checkpoint), "max_output_tokens": 5, "temperature": 0,
                                "extra_body": {"ignore_eos": True}}

        # three turns, each sending only its new input (text, then a message list)
        r1 = await alice.responses.create(input="Hello there", instructions="Be brief", **opts)
        r2 = await alice.responses.create(input="Tell me more", previous_response_id=r1.id, **opts)
        r3 = await alice.responses.create(input=[{"role": "user", "content": "And then?"}],
                                          previous_response_id=r2.id, **opts)
        assert r1.object == "response" and r1.status == "incomplete" and r1.output_text
        assert r1.incomplete_details.reason == "max_output_tokens"
        # each turn's prompt holds the whole conversation, and its prefix is the
        # session's KV: all of it, the last generated token's included
        assert r2.usage.input_tokens > total(r1) and r3.usage.input_tokens > total(r2)
        assert r2.usage.input_tokens_details.cached_tokens >= total(r1)
        assert r3.usage.input_tokens_details.cached_tokens >= total(r2)

        # the answers equal re-sending the whole history (greedy)
        history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": r1.output_text},
                   {"role": "user", "content": "Tell me more"}, {"role": "assistant", "content": r2.output_text},
                   {"role": "user", "content": "And then?"}]
        full = await alice.responses.create(input=history, instructions="Be brief", store=False, **opts)
        assert full.output_text == r3.output_text
        assert full.usage.input_tokens == r3.usage.input_tokens

        # stored: retrievable, chained
        got = await alice.responses.retrieve(r2.id)
        assert got.output_text == r2.output_text and got.previous_response_id == r1.id
        assert got.instructions == "Be brief"

        # streamed, in the Responses API's events
        stream = await alice.responses.create(input="Go on", previous_response_id=r3.id, stream=True, **opts)
        kinds, deltas, final = [], [], None
        async for ev in stream:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
            if ev.type in ("response.completed", "response.incomplete"):
                final = ev.response
        assert kinds[:2] == ["response.created", "response.in_progress"] and final is not None
        assert "".join(deltas) == final.output_text and final.previous_response_id == r3.id
        assert final.usage.input_tokens_details.cached_tokens >= total(r3)

        # continuing an earlier response branches: the same history, the same answer
        branch = await alice.responses.create(input="Tell me more", previous_response_id=r1.id, **opts)
        assert branch.output_text == r2.output_text and branch.id[:37] != r2.id[:37]
        assert (await alice.responses.retrieve(r3.id)).output_text == r3.output_text  # the chain is untouched

        # not stored: not retrievable
        with pytest.raises(openai.NotFoundError):
            await alice.responses.retrieve(full.id)

        # another tenant can neither read, continue nor delete alice's responses
        with pytest.raises(openai.NotFoundError):
            await bob.responses.retrieve(r1.id)
        with pytest.raises(openai.NotFoundError):
            await bob.responses.create(input="Hi", previous_response_id=r2.id, **opts)
        with pytest.raises(openai.NotFoundError):
            await bob.responses.delete(r1.id)
        assert (await alice.responses.retrieve(r1.id)).output_text == r1.output_text

        # stored responses survive a scheduler restart (sessions are stored under LLMOS_HOME)
        pid = llmos.instance(await llmos.status(), "scheduler").pid
        assert await admin.kill("scheduler") == ["scheduler"]
        await llmos.wait_for(lambda st: llmos.instance(st, "scheduler").pid != pid
                             and llmos.instance(st, "scheduler").state == "ready", 60, "scheduler restarted")
        assert (await alice.responses.retrieve(r3.id)).output_text == r3.output_text
        after = await alice.responses.create(input="Tell me more", previous_response_id=branch.id, **opts)
        again = await alice.responses.create(input=[*history[:3], {"role": "assistant", "content": branch.output_text},
                                                    {"role": "user", "content": "Tell me more"}],
                                             instructions="Be brief", store=False, **opts)
        assert after.output_text == again.output_text

        # bad inputs, each naming its field
        with pytest.raises(openai.BadRequestError, match="input"):
            await alice.responses.create(input=[], **opts)
        with pytest.raises(openai.BadRequestError, match="instructions"):
            await alice.responses.create(input="x", previous_response_id=r1.id, instructions="Be long", **opts)
        with pytest.raises(openai.NotFoundError, match="response"):
            await alice.responses.create(input="x", previous_response_id="resp_nope", **opts)
        with pytest.raises(openai.BadRequestError, match="max_output_tokens"):
            await alice.responses.create(input="x", model=str(checkpoint), max_output_tokens=0)

        # deleted: its chain is gone
        await alice.responses.delete(r3.id)
        with pytest.raises(openai.NotFoundError):
            await alice.responses.retrieve(r2.id)
