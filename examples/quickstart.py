"""Quickstart: sample a continuation from the embedded SmolLM2-135M with no model hub."""

import torch

from entcal import models


def main() -> None:
    model, tokenizer = models.load("smollm2-135m")
    prompt = "The Python interpreter reads a program and"
    inputs = tokenizer([prompt], return_tensors="pt")
    torch.manual_seed(0)
    with torch.inference_mode():
        out = model.generate(
            **inputs, do_sample=True, temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=60
        )
    print(prompt + tokenizer.decode(out[0, inputs["input_ids"].shape[1] :]))


if __name__ == "__main__":
    main()
