"""Does a prompt's own log loss predict its human continuation's, across kinds of text?

The ``anchored`` decoder holds a generation's entropy at ``L_prompt + δ``: the raw model's mean
negative log-likelihood on the prompt's last 64 tokens plus a fixed offset. That works on text
unlike the training corpus only if the gap ``L_continuation − L_prompt`` stays about the same
from one kind of text to another (the ``calibrated`` decoder's predictor level does not: it
spreads over 0.8 nats/token across these corpora). For each corpus this reports, over the same
pairs ``entcal compare`` uses (128-token prompt, 256-token continuation, seed 0), the mean
continuation log loss and entropy, and for prompt windows of 32, 64 and 112 tokens the mean gap
to the prompt's log loss and to its entropy, the gap's standard deviation over documents and the
correlation of the two log losses. Teacher forced, no generation; about 9 minutes on 2 threads.

    python benchmarks/corpora/debian_handbook.py --out runs/handbook.txt
    python benchmarks/corpora/janeausten.py --out runs/austen.txt
    cp "$(python -c 'import tvm_ffi, pathlib; print(pathlib.Path(tvm_ffi.__file__).parent)')/3rdparty/libbacktrace/Isaac.Newton-Opticks.txt" runs/opticks.txt
    python benchmarks/prompt_level.py --out benchmarks/results/prompt_level.json
    python benchmarks/prompt_level.py --model gemma3-270m --corpora pydoc:train --n 48 \
        --out benchmarks/results/prompt_level-gemma3-270m.json     # another model's offset
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from entcal import corpora, models

CORPORA = (
    ("pydoc", "train"),
    ("pydoc", "test"),
    ("runs/handbook.txt", "all"),
    ("runs/austen.txt", "all"),
    ("runs/opticks.txt", "all"),
)
PROMPT, CONTINUATION = 128, 256


def _r(x) -> float:
    return round(float(x), 4)


@torch.inference_mode()
def token_stats(model, pairs, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll, entropy)`` ``(N, PROMPT + CONTINUATION − 1)``: position ``j`` predicts token
    ``j + 1``."""
    ids = torch.tensor([list(p.prompt_ids) + list(p.continuation_ids) for p in pairs])
    nll, ent = [], []
    for s in range(0, len(ids), batch):
        x = ids[s : s + batch]
        lp = torch.log_softmax(model(x).logits[:, :-1].float(), -1)
        nll.append(-lp.gather(-1, x[:, 1:, None])[..., 0])
        ent.append(-(lp.exp() * lp).nan_to_num().sum(-1))
    return torch.cat(nll), torch.cat(ent)


def corpus_report(nll: torch.Tensor, ent: torch.Tensor) -> dict:
    first = PROMPT - 1  # the prediction of the continuation's first token
    lc, hc = nll[:, first:].mean(1), ent[:, first:].mean(1)
    out: dict = {
        "documents": len(lc),
        "continuation_log_loss": _r(lc.mean()),
        "continuation_entropy": _r(hc.mean()),
    }
    for window in (32, 64, 112):
        lp = nll[:, first - window : first].mean(1)
        hp = ent[:, first - window : first].mean(1)
        out[f"prompt_last_{window}"] = {
            "log_loss": _r(lp.mean()),
            "entropy": _r(hp.mean()),
            "gap_to_log_loss": _r((lc - lp).mean()),
            "gap_to_log_loss_sd": _r((lc - lp).std()),
            "gap_to_entropy": _r((lc - hp).mean()),
            "gap_to_entropy_sd": _r((lc - hp).std()),
            "corr_log_losses": _r(torch.corrcoef(torch.stack([lc, lp]))[0, 1]),
        }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=96, help="documents per corpus (default 96)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default="", help="JSON file (default: print only)")
    p.add_argument("--model", default="smollm2-135m", help="model (default smollm2-135m)")
    p.add_argument(
        "--corpora",
        default=",".join(f"{name}:{split}" for name, split in CORPORA),
        help="comma-separated CORPUS:SPLIT (default: the five above)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = models.load(args.model)
    # a batch's log-probs are (batch, 383, vocab) floats: fewer rows for a large vocabulary
    batch = max(1, 8 * 49152 // model.config.vocab_size)
    report: dict = {
        "benchmark": "prompt log loss against continuation log loss (teacher forced)",
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "prompt_tokens": PROMPT,
        "continuation_tokens": CONTINUATION,
        "corpora": {},
    }
    for item in args.corpora.split(","):
        name, _, split = item.strip().rpartition(":")
        corpus = corpora.load_corpus(name)
        if split != "all":
            corpus = corpus.split(split)
        pairs = corpora.make_pairs(
            corpus, tok, prompt_tokens=PROMPT, continuation_tokens=CONTINUATION, n=args.n
        )
        key = f"{Path(name).stem}:{split}"
        report["corpora"][key] = corpus_report(*token_stats(model, pairs, batch))
        print(key, json.dumps(report["corpora"][key]), flush=True)
    gaps = [c["prompt_last_64"]["gap_to_log_loss"] for c in report["corpora"].values()]
    report["gap_64_range"] = [min(gaps), max(gaps)]
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
