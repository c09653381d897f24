"""No shared filesystem (issue 17): the scheduler and gateway build the
tokenizer and chat template from what the driver sends in its
ModelDescription, never from the model directory's path. Here the
directory is renamed away once the driver has loaded it and the scheduler
is killed (its restart learns the model again): generate and chat still
serve, with the checkpoint's own template; and the files a driver may
send are checked and bounded."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import anyio
import httpx
import pytest

from ipc.errors import BadRequest
from ipc.protocol import security as sec
from kernel.config import ChildSpec
from tests.helpers.model_fixtures import make_checkpoint
from tests.helpers.net import free_port
from tests.helpers.stacks import secured_children
from text.shipped import (BYTE_TOKENIZER_FILE, formatter_from_files, read_tokenizer_files,
                          tokenizer_from_files)
from text.tokenizer import load_tokenizer
from tools.testing import running_llmos

TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, "llama", sharp=True)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "</s>"}))
    return d


async def test_generate_and_chat_without_the_model_directory(home: Path, checkpoint: Path) -> None:
    port = free_port()
    tok = load_tokenizer(checkpoint)
    kids = [*secured_children(checkpoint), ChildSpec("gateway", "services.gateway", args=["--listen", f"127.0.0.1:{port}"])]
    async with running_llmos(home, kids, auth=True, ready_timeout=120) as llmos:
        c = llmos.client
        key = (await c.call(sec.SECURITY, sec.CreateKey("alice", ["generate"]))).api_key
        before = await c.generate("Hello there", max_tokens=8, temperature=0.0)
        checkpoint.rename(checkpoint.with_name(checkpoint.name + "-gone"))
        try:
            st = await llmos.status()
            sched = llmos.instance(st, "scheduler")
            os.kill(sched.pid, signal.SIGKILL)  # its restart describes the model with the directory gone
            await llmos.wait_for(lambda s: (i := llmos.instance(s, "scheduler")).pid != sched.pid
                                 and i.state == "ready", timeout=60, what="scheduler restarted")
            with anyio.fail_after(60):
                while True:
                    try:
                        after = await c.generate("Hello there", max_tokens=8, temperature=0.0)
                        break
                    except Exception:  # the new scheduler still learning the model
                        await anyio.sleep(0.1)
            assert after.text == before.text and after.text
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                     headers={"Authorization": f"Bearer {key}"}) as http:
                msgs = [{"role": "user", "content": "Say something"}]
                r = await http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 6,
                                                                  "temperature": 0, "logprobs": True})
                assert r.status_code == 200, r.text
                body = r.json()
                rendered = "[user] Say something\n[assistant]"   # the checkpoint's template, as sent
                assert body["usage"]["prompt_tokens"] == len(tok.encode(rendered, add_special_tokens=False))
                assert body["usage"]["completion_tokens"] == 6
                tokens = [t["token"] for t in body["choices"][0]["logprobs"]["content"]]
                assert "".join(tokens) == body["choices"][0]["message"]["content"]
                r = await http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 8,
                                                             "temperature": 0})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == before.text
        finally:
            checkpoint.with_name(checkpoint.name + "-gone").rename(checkpoint)


def test_files_from_a_driver_are_checked_and_bounded(checkpoint: Path, tmp_path: Path) -> None:
    files = read_tokenizer_files(checkpoint)
    assert set(files) == {"tokenizer.json", "tokenizer_config.json"}
    tok = tokenizer_from_files(files, "driver cpu")
    assert tok.decode(tok.encode("héllo wörld", add_special_tokens=False)) == "héllo wörld"
    assert formatter_from_files(files, "driver cpu").has_template
    byte = tokenizer_from_files({BYTE_TOKENIZER_FILE: '{"type": "byte"}'}, "driver null")
    assert byte.decode(byte.encode("hé")) == "hé"
    with pytest.raises(BadRequest, match="sent no tokenizer"):
        tokenizer_from_files({}, "driver x")
    with pytest.raises(BadRequest, match=r"\['weights.bin'\] are not among"):
        tokenizer_from_files({**files, "weights.bin": "x"}, "driver x")
    with pytest.raises(BadRequest, match="driver x/tokenizer.json: not a valid tokenizer.json"):
        tokenizer_from_files({"tokenizer.json": "{not json"}, "driver x")
    with pytest.raises(BadRequest, match="tokenizer_config.json: expected a JSON object"):
        formatter_from_files({**files, "tokenizer_config.json": "[1]"}, "driver x")
    with pytest.raises(BadRequest, match="expected .*byte"):
        tokenizer_from_files({BYTE_TOKENIZER_FILE: '{"type": "bpe"}'}, "driver x")
    big = tmp_path / "big"
    big.mkdir()
    (big / "tokenizer.json").write_text("x" * 2048)
    with pytest.raises(BadRequest, match="at most 1024 bytes"):
        read_tokenizer_files(big, max_bytes=1024)
    with pytest.raises(BadRequest, match="missing"):
        read_tokenizer_files(tmp_path / "nowhere")
