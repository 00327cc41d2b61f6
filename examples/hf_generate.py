"""entcal decoders in Hugging Face `generate`, and `entcal.generate` with per-token statistics.

python examples/hf_generate.py [--decoder "temperature=0.8,top_p=0.95"] [--max-new-tokens 40]
"""

from __future__ import annotations

import argparse

import torch

from entcal import generate, models
from entcal.decoding import hf, parse
from entcal.generation import neutral_generation_config


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--decoder", default="temperature=0.8,top_p=0.95")
    p.add_argument("--max-new-tokens", type=int, default=40)
    args = p.parse_args()
    decoder = parse(args.decoder)
    model, tok = models.load("smollm2-135m")
    prompt = "The Python interpreter reads a program and"

    # 1. Plain transformers: pass the processor and switch transformers' own warpers off
    #    (otherwise generate adds top_k=50 on top).
    inputs = tok([prompt], return_tensors="pt")
    torch.manual_seed(0)
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            generation_config=neutral_generation_config(max_new_tokens=args.max_new_tokens),
            logits_processor=[hf.logits_processor(decoder)],
        )
    print(f"[transformers generate, {decoder}]")
    print(prompt + tok.decode(out[0, inputs["input_ids"].shape[1] :]))

    # 2. entcal.generate: the same distribution, plus per-token log-probs and entropies.
    (g,) = generate(model, tok, [prompt], decoder=decoder, max_new_tokens=args.max_new_tokens)
    print(f"\n[entcal.generate, {decoder}]")
    print(prompt + g.text)
    print(
        f"mean log-prob: sampling {g.logprob.mean():.3f}, model {g.raw_logprob.mean():.3f} nats; "
        f"mean entropy: sampling {g.entropy.mean():.3f}, model {g.raw_entropy.mean():.3f} nats"
    )


if __name__ == "__main__":
    main()
