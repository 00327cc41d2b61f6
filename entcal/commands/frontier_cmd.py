"""``entcal frontier``: EntCE against human log-loss cost for several decoder families.

A thin adapter over :func:`entcal.eval.frontier.run_frontier`.
"""

from __future__ import annotations

import argparse

from entcal.commands.common import (
    add_corpus_argument,
    add_device_arguments,
    add_model_argument,
    add_pairs_arguments,
    add_run_arguments,
    load_options,
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "frontier",
        help="calibration-log-loss frontier: EntCE vs log-loss cost per decoder family",
        description=(
            "Sweep decoder families (temperature, calibrated scale, lookahead alpha, top-p) "
            "on the same prompts and seeds; write OUT/frontier.json and OUT/frontier.png. "
            "Each family option takes comma-separated values ('' leaves the family out)."
        ),
    )
    add_model_argument(parser)
    add_corpus_argument(parser)
    add_pairs_arguments(parser, n=32, prompt_tokens=128, length=256, split="test")
    parser.add_argument("--samples", type=int, default=1, help="continuations per prompt")
    parser.add_argument("--batch-size", type=int, default=32)
    from entcal.eval.frontier import DEFAULT_FAMILIES, FAMILIES

    for family in FAMILIES:
        default = ",".join(f"{v:g}" for v in DEFAULT_FAMILIES.get(family, ()))
        parser.add_argument(
            "--" + family.replace("_", "-"),
            default=default,
            help=f"values of the {family} family (default: {default or 'none'})",
        )
    parser.add_argument(
        "--calibrated-predictor",
        default=None,
        help="predictor folder of the calibrated family (default: the model's shipped one)",
    )
    add_device_arguments(parser)
    add_run_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from entcal.eval.compare import CompareConfig
    from entcal.eval.frontier import FAMILIES, run_frontier

    sweep = {}
    for family in FAMILIES:
        text = getattr(args, family).strip()
        if not text:
            continue
        try:
            sweep[family] = tuple(float(x) for x in text.split(","))
        except ValueError:
            raise ValueError(
                f"--{family.replace('_', '-')}={text!r}: expected comma-separated numbers"
            ) from None
    config = CompareConfig(
        out=args.out, model=args.model, human=args.human, decoders="ancestral", n=args.n,
        length=args.length, prompt_tokens=args.prompt_tokens, seed=args.seed,
        samples=args.samples, split=args.split, batch_size=args.batch_size,
        progress=not args.no_progress, **load_options(args),
    )  # fmt: skip
    doc = run_frontier(config, sweep, predictor=args.calibrated_predictor)
    print(f"{'family':12s} {'spec':28s} {'EntCE':>16s} {'cost':>9s} {'slope/100':>9s}")
    for p in doc["points"]:
        entce = f"{p['entce']:+.3f} ± {p['entce_se']:.3f}"
        print(
            f"{p['family']:12s} {p['spec']:28s} {entce:>16s} {p['log_loss_cost']:+9.4f} "
            f"{p['entropy_slope']:+9.3f}"
        )
    print(f"\nwrote {args.out}/frontier.json and {args.out}/frontier.png")
    return 0
