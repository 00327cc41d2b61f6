"""``entcal train``: fit the calibrated decoder for a model (predictor, then gate).

Example (the commands that made the shipped SmolLM2 predictor: the predictor and its gate, then
the gate refitted with a base)::

    entcal train --model smollm2-135m --out runs/train-smollm2 --seed 0
    entcal train --model smollm2-135m --out runs/gate-smollm2 --seed 0 \
        --gate-of runs/train-smollm2/predictor --base-alphas 0,0.01,0.02 --gate-rounds 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from entcal.commands.common import (
    add_corpus_argument,
    add_device_arguments,
    add_engine_arguments,
    add_model_argument,
    load_options,
)

_TUPLES = {"threshold_quantiles": float, "base_alphas": float, "bucket_edges": int}
#: config fields with flags of their own (or none), not the generic one per field
_OWN_FLAGS = (
    "model",
    "corpus",
    "engine",
    "vllm_args",
    "gate_of",
    "warmup",
    "lift",
    "lift_quantile",
)


def register(sub: argparse._SubParsersAction) -> None:
    from entcal.calibrators.config import ENGINES, TrainConfig

    defaults = TrainConfig()
    parser = sub.add_parser(
        "train",
        help="fit the calibrated decoder (future-entropy predictor and gate) for a model",
        description=(
            "Teacher-force human text and sample generations from training-split prompts, fit a "
            "predictor of the excess future entropy rate from the generation's state, then fit "
            "the decoder's gate so that EntCE = 0 on its own generations at the lowest human "
            "log-loss cost. Writes OUT/predictor (use it as 'calibrated:predictor=OUT/predictor') "
            "and OUT/report.json. Interrupted runs resume."
        ),
    )
    add_model_argument(parser, default=defaults.model)
    parser.add_argument("--out", required=True, help="output folder")
    add_corpus_argument(parser, "--corpus")
    for field in dataclasses.fields(TrainConfig):
        if field.name in _OWN_FLAGS:
            continue
        flag = "--" + field.name.replace("_", "-")
        value = getattr(defaults, field.name)
        if field.name in _TUPLES:
            parser.add_argument(
                flag, default=",".join(str(v) for v in value),
                help=f"comma-separated (default {','.join(str(v) for v in value)})",
            )  # fmt: skip
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"default {value}")
    add_engine_arguments(
        parser,
        ENGINES,
        "what generates the rollouts (default transformers; vllm: vllm.LLM, token ids "
        "only, statistics from the same teacher-forced pass); the gate's generations use "
        "transformers",
    )
    parser.add_argument(
        "--gate-of", metavar="PREDICTOR", default=None,
        help="refit only the gate of this predictor folder (its predictor, threshold and "
        "buckets kept; strengths start from its own), e.g. to search --base-alphas",
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=int, default=None, metavar="K",
        help="generated steps at the start with the gate closed (default 0; with --gate-of, "
        "the predictor's own)",
    )  # fmt: skip
    parser.add_argument(
        "--lift", type=float, default=None, metavar="L",
        help="share in [0, 1] of a text's shortfall below the human reference level (its early "
        "level: the mean predicted excess over its 16 steps after the warm-up; the reference: "
        "the --lift-quantile of the same on the gate documents' human texts) added to its "
        "predicted excess before the threshold (default 0; with --gate-of, the predictor's own)",
    )  # fmt: skip
    parser.add_argument(
        "--lift-quantile", type=float, default=None, metavar="Q",
        help="the human reference level of --lift is this quantile of the gate documents' human "
        "early levels (default 0.25; with --gate-of, the predictor's run's own)",
    )  # fmt: skip
    add_device_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from entcal.calibrators.config import TrainConfig

    values = {}
    for field in dataclasses.fields(TrainConfig):
        if field.name == "vllm_args":
            from entcal.decoding.vllm.engine import parse_vllm_args

            values["vllm_args"] = parse_vllm_args(args.vllm_arg)
            continue
        value = getattr(args, field.name)
        if field.name in _TUPLES:
            text = str(value).strip()
            try:
                value = tuple(_TUPLES[field.name](x) for x in text.split(",")) if text else ()
            except ValueError:
                flag = "--" + field.name.replace("_", "-")
                raise ValueError(f"{flag}={text!r}: expected comma-separated numbers") from None
        values[field.name] = value
    cfg = TrainConfig(**values)
    cfg.validate()  # before the model is loaded
    from entcal.calibrators.train import train_predictor

    report = train_predictor(cfg, args.out, progress=not args.quiet, load=load_options(args))
    summary = {
        "predictor": f"{args.out}/predictor",
        "estimator": report["predictor"]["chosen"],
        "r2_heldout": report["predictor"]["r2_heldout"],
        "gate": report["gate"],
        "seconds": report["seconds"],
    }
    print(json.dumps(summary, indent=2))
    return 0
