"""``entcal compare``: several decoders on the same prompts, evaluated side by side.

A thin adapter over :func:`entcal.eval.compare.run_compare` (see there for the protocol and
``results.json``).
"""

from __future__ import annotations

import argparse
import sys

from entcal.eval.defaults import DEFAULT_DECODERS


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "compare",
        help="compare decoders: entropy calibration, typical set, detectability, diversity",
        description=(
            "Generate continuations of the same human prompts with several decoders and write "
            "OUT/results.json, OUT/report.md and PNG plots. Generations are cached in OUT/cache, "
            "so an interrupted run resumes."
        ),
    )
    parser.add_argument("--model", default="smollm2-135m", help="model name or folder")
    parser.add_argument(
        "--human", default=None, help="human corpus: pydoc (default), FILE.txt, FILE.jsonl, hf:NAME"
    )
    parser.add_argument(
        "--decoders",
        default=None,
        help=f"';'-separated decoder specs (default: {DEFAULT_DECODERS!r})",
    )
    parser.add_argument("--n", type=int, default=None, help="number of prompts (default 32)")
    parser.add_argument(
        "--length", type=int, default=None, help="continuation tokens (default 256)"
    )
    parser.add_argument(
        "--prompt-tokens", type=int, default=None, help="prompt tokens (default 128)"
    )
    parser.add_argument(
        "--split",
        choices=("all", "train", "test"),
        default="all",
        help="documents of the corpus: all (default), or its train / test split (the embedded "
        "predictors were trained on the train split)",
    )
    parser.add_argument(
        "--samples", type=int, default=1, help="continuations sampled per prompt (default 1)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--observer", default=None, help="second model with the same tokenizer (Binoculars)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch")
    parser.add_argument("--epsilon", type=float, default=0.1, help="typical-set epsilon (nats)")
    parser.add_argument(
        "--quick", action="store_true", help="8 prompts of 64 tokens, 48-token continuations"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", required=True, help="output folder")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from entcal.eval.compare import QUICK, CompareConfig, parse_decoders

    decoders = args.decoders if args.decoders is not None else DEFAULT_DECODERS
    from entcal.calibrators.predictor_file import shipped_predictors

    if args.decoders is None and args.model not in shipped_predictors():
        # Predictors are shipped for the embedded models; another needs its own (entcal train).
        decoders = "; ".join(d.strip() for d in decoders.split(";") if d.strip() != "calibrated")
        print(
            f"entcal compare: no shipped predictor for {args.model}; 'calibrated' left out of the "
            "default decoders (train one with entcal train, then pass "
            "--decoders '...; calibrated:predictor=DIR/predictor')",
            file=sys.stderr,
        )
    # Unknown decoders fail here, before the model is loaded or anything generated.
    parse_decoders(decoders)
    base = QUICK if args.quick else {"n": 32, "length": 256, "prompt_tokens": 128}
    config = CompareConfig(
        out=args.out,
        model=args.model,
        human=args.human,
        decoders=decoders,
        n=args.n if args.n is not None else base["n"],
        length=args.length if args.length is not None else base["length"],
        prompt_tokens=args.prompt_tokens
        if args.prompt_tokens is not None
        else base["prompt_tokens"],
        seed=args.seed,
        samples=args.samples,
        split=args.split,
        observer=args.observer,
        batch_size=args.batch_size,
        epsilon=args.epsilon,
        progress=not args.no_progress,
    )
    from entcal.eval.compare import run_compare

    results = run_compare(config)
    from entcal.eval.report import summary_table

    print(summary_table(results))
    print(f"\nwrote {args.out}/results.json, {args.out}/report.md and plots")
    return 0
