"""Choose an entcal decoder per request on vLLM's OpenAI-compatible server (OpenAI Python SDK).

Start a server in another shell::

    entcal serve --port 8000          # vLLM + entcal's processor, embedded smollm2-135m

then ``python examples/vllm_client.py`` (or ``--start`` to have this script launch and stop
``entcal serve`` itself on a free local port). Each request passes its spec with
``extra_body={"vllm_xargs": {"entcal": "<spec>"}}``; leave vLLM's own temperature / top_p /
top_k / min_p / penalties unset. ``entcal serve`` runs with ``--logprobs-mode
processed_logprobs``, so ``logprobs`` are those of the entcal distribution.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

SPECS = [None, "top_k=1", "top_p=0.9", "temperature=0.8,min_p=0.1", "mirostat:tau=3.0"]


@contextlib.contextmanager
def entcal_server():
    """Run ``entcal serve`` on a free loopback port for the duration of the block."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "entcal.cli", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "512", "--enforce-eager"]  # fmt: skip
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"entcal serve exited with status {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        yield base + "/v1"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


async def demo(base_url: str, model: str) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused")
    prompt = "The best way to learn a new programming language is"

    async def complete(spec: str | None):
        extra = {"vllm_xargs": {"entcal": spec}} if spec else {}
        return await client.completions.create(
            model=model, prompt=prompt, max_tokens=32, seed=0, logprobs=1, extra_body=extra
        )

    results = await asyncio.gather(*(complete(s) for s in SPECS))  # served in one batch
    for spec, res in zip(SPECS, results):
        lps = res.choices[0].logprobs.token_logprobs
        print(f"--- {spec or 'vLLM default sampling'}  (mean -log p: {-sum(lps) / len(lps):.2f})")
        print(prompt + res.choices[0].text)

    try:  # a bad spec: HTTP 400 naming the parameter; the server keeps serving
        await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=8,
            extra_body={"vllm_xargs": {"entcal": "top_p=2"}},
        )
    except openai.BadRequestError as exc:
        print(f"\nHTTP {exc.status_code}: {exc.body}")
    await client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="smollm2-135m", help="the served model name")
    ap.add_argument("--start", action="store_true", help="start (and stop) entcal serve here")
    args = ap.parse_args()
    if args.start:
        with entcal_server() as base_url:
            asyncio.run(demo(base_url, args.model))
    else:
        asyncio.run(demo(args.base_url, args.model))


if __name__ == "__main__":
    main()
