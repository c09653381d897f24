"""n > 1 and logprobs over the whole system (security, memory, a CPU driver,
the scheduler, the gateway as real processes, auth on), through the real
`openai` package and the SDK: the prompt is computed once (the driver's own
count of tokens it ran says so), the choices equal a lone greedy request,
their logprobs equal the scheduler's, and a seeded sample repeats."""

from __future__ import annotations

import importlib
from pathlib import Path

import anyio
import pytest

from ipc.protocol import driver as dp
from ipc.protocol import security as sec
from tools.testing import running_llmos
from tests.helpers.net import free_port
from tests.helpers.stacks import gateway_children


async def test_n_choices_share_one_prompt_computation_and_carry_logprobs(home: Path, checkpoint: Path) -> None:
    openai = await anyio.to_thread.run_sync(importlib.import_module, "openai")
    port = free_port()
    async with running_llmos(home, gateway_children(checkpoint, port), auth=True, ready_timeout=120) as llmos:
        admin = llmos.client
        key = (await admin.call(sec.SECURITY, sec.CreateKey("alice", ["generate"]))).api_key
        oai = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)
        model = str(checkpoint)
        greedy = {"model": model, "max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}

        async def driver_tokens() -> int:
            return int((await admin.call(dp.DRIVER, dp.DriverHealth(), timeout=30)).tokens)

        # one choice: the whole prompt computed, then 5 decode steps
        t0 = await driver_tokens()
        one = await oai.completions.create(prompt="Once upon a time in a land far away", logprobs=2, **greedy)
        t1 = await driver_tokens()
        p1 = one.usage.prompt_tokens
        assert t1 - t0 == p1 + 5 and one.usage.prefill_tokens == p1

        # four choices of another prompt: its first p - 1 positions once, then
        # each choice its last prompt position and 5 decode steps
        prompt = "Sing me a song of the sea and of ships"
        four = await oai.completions.create(prompt=prompt, n=4, logprobs=2, **greedy)
        t2 = await driver_tokens()
        p = four.usage.prompt_tokens
        assert len(four.choices) == 4 and [c.index for c in four.choices] == [0, 1, 2, 3]
        assert t2 - t1 == (p - 1) + 4 * 6, "the prompt was not computed once"
        assert four.usage.prefill_tokens == p - 1 + 4 and four.usage.completion_tokens == 24
        assert four.usage.prompt_tokens_details.cached_tokens == 0

        # each choice equals a lone greedy request; logprobs equal the scheduler's
        lone = await admin.generate(prompt, max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
        for c in four.choices:
            assert c.text == lone.text and c.finish_reason == "length"
            assert c.logprobs.token_logprobs == pytest.approx(lone.logprobs, abs=1e-5)
            # two alternatives each (one, when both decode alone to the same text, e.g. half a UTF-8 character)
            assert len(c.logprobs.tokens) == 6 and all(1 <= len(t) <= 2 for t in c.logprobs.top_logprobs)
            # the chosen token is the most likely one (greedy), as its top-2 says
            assert all(max(t.values()) == pytest.approx(lp, abs=1e-5)
                       for t, lp in zip(c.logprobs.top_logprobs, c.logprobs.token_logprobs))

        # a seeded sample repeats, choice by choice
        sampled = {"model": model, "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 3}
        a = await oai.completions.create(prompt="Roll the dice", **sampled)
        b = await oai.completions.create(prompt="Roll the dice", **sampled)
        assert [c.text for c in a.choices] == [c.text for c in b.choices]

        # chat: two choices with logprobs, in OpenAI's chat shape
        msgs = [{"role": "user", "content": "Say something"}]
        chat = await oai.chat.completions.create(model=model, messages=msgs, n=2, max_tokens=4, temperature=0,
                                                 logprobs=True, top_logprobs=1)
        assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content
        content = chat.choices[0].logprobs.content
        assert len(content) == chat.usage.completion_tokens // 2 and len(content[0].top_logprobs) == 1

        # the SDK: n completions of one prompt
        sdk = await admin.generate_n("Sing me a song", 3, max_tokens=4, temperature=0.0, ignore_eos=True)
        assert len(sdk) == 3 and len({c.text for c in sdk}) == 1
        assert all(c.usage.forked_tokens > 0 for c in sdk)

        # a bad n is refused naming the field
        with pytest.raises(openai.BadRequestError, match="max_n"):
            await oai.completions.create(model=model, prompt="x", n=100, max_tokens=2)
