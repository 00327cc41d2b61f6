"""Where the shipped SmolLM2 gate opens on a corpus's human text (teacher forced, no generation).

The raw model reads each human continuation (128-token prompt, 256 tokens); the shipped
predictor gives ``D̂_t`` along it as the decoder's state tracker would, and the gate's score
(lifted), open share and ``α_t`` follow. A gate that opens on human text costs log loss there; a
corpus whose human ``D̂`` sits high reads as derailing. Reported: mean ``D̂`` (overall, by
quarter), the early level ``r`` (mean ``D̂`` over steps 8-23) by quantile, the open share and
mean ``α`` with and without the lift, and the same split by quarters of documents ranked by
``r``; with ``--pydoc-arrays``, how scores read as a level or as a rise flag this text against
pydoc's and Austen's. JSON out. About 3 minutes for 128 documents on 2 CPU threads.

    python benchmarks/corpora/debian_handbook.py --out runs/handbook.txt
    python benchmarks/gate_on_human.py --corpus runs/handbook.txt --n 128 \
        --pydoc-arrays runs/gate-dhat.pt  # gate_transfer.py --other runs/austen.txt --arrays runs/gate-dhat.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from gate_transfer import excess_along, shipped_gate

from entcal import corpora
from entcal.calibrators.derailment import (
    REFERENCE_WINDOW,
    early_level_along,
    gate_alpha,
    lifted_excess_along,
    step_strength,
)


def _r(x: float) -> float:
    return round(float(x), 4)


def early_level(d: torch.Tensor, warmup: int) -> torch.Tensor:
    """``r (N, 1)``: each text's mean ``D̂`` over its whole reference window (steps 8-23 at
    warm-up 8), the early level the lift reads once the window is complete."""
    end = warmup + REFERENCE_WINDOW - 1
    return early_level_along(d, warmup)[:, end : end + 1]


def flagged_shares(human: torch.Tensor, arrays: dict, warmup: int, lift, late: int = 64) -> dict:
    """Level against rise: for each score of a state (``D̂``; the shipped lifted score; ``D̂``
    minus the text's early level ``r``, in full and by half), at steps ``>= late``, the threshold
    that flags 2% of pydoc's human states, then the share flagged of pydoc's ancestral
    generations, of this corpus's human text and of Austen's human text and generations
    (``arrays``: ``gate_transfer.py --arrays``, its "other" corpus being Austen)."""
    from sklearn.metrics import roc_auc_score

    def rise(d: torch.Tensor, w: float) -> torch.Tensor:
        return d - w * early_level(d, warmup)

    scores = {
        "dhat": lambda d: d,
        "lifted (shipped)": lambda d: lifted_excess_along(d, warmup, *lift),
        "dhat - r": lambda d: rise(d, 1.0),
        "dhat - 0.5 r": lambda d: rise(d, 0.5),
    }
    texts = {"this corpus, human": human, "austen human": arrays[("other", "human")],
             "austen ancestral": arrays[("other", "ancestral")]}  # fmt: skip
    out = {}
    for name, score in scores.items():
        ph = score(arrays[("pydoc", "human")])[:, late:].flatten()
        pa = score(arrays[("pydoc", "ancestral")])[:, late:].flatten()
        thr = torch.quantile(ph, 0.98)
        labels = torch.cat([torch.zeros(len(ph)), torch.ones(len(pa))])
        entry = {
            "threshold": _r(thr),
            "pydoc_auroc": _r(roc_auc_score(labels, torch.cat([ph, pa]))),
            "flagged: pydoc ancestral": _r((pa > thr).float().mean()),
        }
        for text, d in texts.items():
            entry[f"flagged: {text}"] = _r((score(d)[:, late:] > thr).float().mean())
        out[name] = entry
    return out


@torch.inference_mode()
def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model, tok, pred, strength, threshold, base, edges, warmup, lift = shipped_gate(args.spec)
    corpus = corpora.load_corpus(args.corpus)
    if args.split != "all":
        corpus = corpus.split(args.split)
    pairs = corpora.make_pairs(corpus, tok, prompt_tokens=128, continuation_tokens=256, n=args.n)
    d = excess_along(
        model, pred, [p.prompt_ids for p in pairs], [p.continuation_ids for p in pairs]
    )
    steps = torch.arange(d.shape[1])
    g = step_strength(torch.tensor(strength), steps, torch.tensor(edges), warmup).expand_as(d)
    scores = {"lifted": lifted_excess_along(d, warmup, *lift), "no lift": d}
    alphas = {
        k: gate_alpha(s, g, torch.tensor(threshold), torch.tensor(base)) for k, s in scores.items()
    }
    r = early_level(d, warmup).squeeze(1)
    quantiles = (0.1, 0.25, 0.5, 0.75, 0.9)
    by_level = []
    order = torch.argsort(r)
    for part in order.tensor_split(4):
        s = scores["lifted"][part]
        by_level.append(
            {
                "documents": len(part),
                "mean_r": _r(r[part].mean()),
                "mean_dhat_after_64": _r(d[part, 64:].mean()),
                "open_share": _r((s > threshold).float().mean()),
                "mean_alpha": _r(alphas["lifted"][part].mean()),
            }
        )
    report = {
        "benchmark": "where the shipped SmolLM2 gate opens on human text (teacher forced)",
        "torch_threads": torch.get_num_threads(),
        "corpus": corpus.name,
        "documents": len(pairs),
        "spec": args.spec,
        "gate": {
            "threshold": threshold,
            "strength": strength,
            "base": base,
            "warmup": warmup,
            "lift": list(lift),
        },
        "mean_dhat": _r(d.mean()),
        "mean_dhat_by_quarter": [_r(q.mean()) for q in d.tensor_split(4, dim=1)],
        "early_level_quantiles": {str(q): _r(torch.quantile(r, q)) for q in quantiles},
        "open_share": {k: _r((s > threshold).float().mean()) for k, s in scores.items()},
        "mean_alpha": {k: _r(a.mean()) for k, a in alphas.items()},
        "by_early_level_quarter": by_level,
    }
    if args.pydoc_arrays:
        arrays = torch.load(args.pydoc_arrays, weights_only=True)
        report["level_against_rise_after_step_64"] = flagged_shares(d, arrays, warmup, lift)
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", default="pydoc", help="pydoc (default) or a .txt / .jsonl corpus")
    p.add_argument("--split", default="all", choices=("all", "train", "test"))
    p.add_argument("--n", type=int, default=128, help="documents (default 128)")
    p.add_argument("--spec", default="calibrated", help="the calibrated decoder (default: shipped)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", default="", help="JSON file (default: print only)")
    p.add_argument(
        "--pydoc-arrays",
        default="",
        help="D̂ arrays of gate_transfer.py --arrays (pydoc test and Austen): adds level vs rise",
    )
    args = p.parse_args()
    report = run(args)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
