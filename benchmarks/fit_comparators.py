"""Fit the two comparators of the calibrated decoder on a model's training split.

* the global temperature τ with zero entropy calibration error (generations of ``--length``
  tokens; :func:`entcal.calibrators.temperature.fit_temperature`);
* α of one-step lookahead calibration, by held-out human log loss
  (:func:`entcal.calibrators.lookahead.fit_lookahead_alpha`).

Writes ``benchmarks/results/comparators-MODEL.json`` with the specs to pass to ``entcal compare``
(``temperature=τ`` and ``lookahead:alpha=α``). Seeded; the prompts are disjoint from those of
``entcal compare`` (training split, another seed).

    python benchmarks/fit_comparators.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=256, help="generated tokens for the τ fit")
    ap.add_argument("--temperature-pairs", type=int, default=8)
    ap.add_argument("--lookahead-pairs", type=int, default=128)
    ap.add_argument("--lookahead-positions", type=int, default=32, help="human positions per pair")
    ap.add_argument("--skip-temperature", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from entcal import corpora, models
    from entcal.calibrators.lookahead import fit_lookahead_alpha
    from entcal.calibrators.temperature import fit_temperature

    model, tok = models.load(args.model)
    train = corpora.load_corpus().split("train")
    n = args.lookahead_pairs + args.temperature_pairs
    pairs = corpora.make_pairs(
        train, tok, prompt_tokens=128, continuation_tokens=args.length, n=n, seed=1
    )
    out: dict = {"model": args.model}
    t = time.time()
    la = fit_lookahead_alpha(
        model, pairs[: args.lookahead_pairs], positions_per_pair=args.lookahead_positions, k=8
    )
    out["lookahead"] = {
        "alpha": la.alpha[0],
        "spec": f"lookahead:alpha={la.alpha[0]:.4g}",
        "loss_at_zero": la.loss_at_zero[0],
        "loss_at_alpha": la.loss_at_alpha[0],
        "positions": la.counts[0],
        "seconds": round(time.time() - t, 1),
    }
    print(json.dumps(out["lookahead"]), file=sys.stderr)
    t = time.time()
    tf = None if args.skip_temperature else fit_temperature(
        model, tok, pairs[args.lookahead_pairs :], length=args.length, lo=0.7, hi=1.0,
        tol=0.02, max_evals=5, seed=0,
    )  # fmt: skip
    out["temperature"] = (
        None
        if tf is None
        else {
            "tau": tf.tau,
            "spec": tf.spec,
            "entce": tf.entce,
            "evaluations": tf.evaluations,
            "seconds": round(time.time() - t, 1),
        }
    )
    print(json.dumps(out["temperature"]), file=sys.stderr)
    path = Path(args.out) / f"comparators-{args.model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
