"""``entcal train``: Monte-Carlo labels, future-entropy predictor, α fit, report.

Example (the command that made the shipped SmolLM2 predictor)::

    entcal train --model smollm2-135m --out runs/train-smollm2 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json


def register(sub: argparse._SubParsersAction) -> None:
    from entcal.calibrators.config import TrainConfig

    defaults = TrainConfig()
    parser = sub.add_parser(
        "train",
        help="train a future-entropy predictor and its alpha for a model",
        description=(
            "Estimate k-step future entropies at human prefixes by Monte Carlo, fit the "
            "predictor (ridge vs MLP by held-out R^2), fit alpha by minimizing held-out human "
            "log loss, refit on rollouts of the adjusted model. Writes OUT/predictor (use it as "
            "'calibrated:predictor=OUT/predictor') and OUT/report.json. Interrupted runs resume."
        ),
    )
    parser.add_argument("--model", default=defaults.model, help="embedded name or HF folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--corpus", default=None, help="corpus (default: the embedded pydoc one)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("model", "corpus", "seed", "bucket_edges"):
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = type(getattr(defaults, field.name))
        parser.add_argument(flag, type=kind, default=getattr(defaults, field.name))
    parser.add_argument(
        "--bucket-edges",
        default=",".join(str(e) for e in defaults.bucket_edges),
        help="position edges of the alpha buckets, comma-separated ('' for one alpha)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from entcal.calibrators.config import TrainConfig
    from entcal.calibrators.train import train_predictor

    values = {}
    for field in dataclasses.fields(TrainConfig):
        if field.name == "bucket_edges":
            text = args.bucket_edges.strip()
            try:
                values[field.name] = tuple(int(x) for x in text.split(",")) if text else ()
            except ValueError:
                raise ValueError(
                    f"--bucket-edges={text!r}: expected increasing integers like 16,64,128"
                ) from None
        else:
            values[field.name] = getattr(args, field.name)
    cfg = TrainConfig(**values)
    report = train_predictor(cfg, args.out, progress=not args.quiet)
    last = report["rounds"][-1]
    summary = {
        "predictor": f"{args.out}/predictor",
        "estimator": last["predictor"]["chosen"],
        "r2_heldout": last["predictor"]["r2_heldout"],
        "r2_within_prefix_heldout": last["predictor"]["r2_within_prefix_heldout"],
        "alpha_global": last["alpha_global"],
        "alpha_buckets": last["alpha_buckets"],
        "alpha_fit_logloss": last["alpha_fit_logloss"],
        "test_logloss": last.get("test_logloss"),
        "seconds": report["seconds"],
    }
    print(json.dumps(summary, indent=2))
    return 0
