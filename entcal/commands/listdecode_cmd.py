"""``entcal listdecode``: branching analysis of threshold list decoding (Chang, arXiv 2303.13112).

Sweeps the per-step threshold θ on (prompt, human continuation) pairs and writes
``OUT/results.json`` (per θ: ``theta``, ``R``, ``R_low``, ``R_high``, ``beta``, …),
``OUT/report.md`` and ``OUT/erroneous_vs_step.png`` / ``OUT/R_vs_theta.png``.
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

DEFAULT_THETAS = "0.02,0.05,0.1,0.2,0.3,0.5"


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "listdecode",
        help="list decoding: branching factor R per threshold and the R = 1 transition",
        description=(
            "Threshold list decoding against human continuations: estimates beta (erroneous "
            "children of the correct prefix per step) and R (kept children per erroneous "
            "candidate) per theta, with intervals, and where R crosses 1. Writes "
            "OUT/results.json, OUT/report.md and PNG plots."
        ),
    )
    add_model_argument(parser)
    add_corpus_argument(parser)
    parser.add_argument(
        "--thetas",
        type=_floats,
        default=_floats(DEFAULT_THETAS),
        help=f"(default {DEFAULT_THETAS})",
    )
    add_pairs_arguments(parser, n=8, prompt_tokens=64, length=16, length_flag="--steps")
    parser.add_argument(
        "--max-list", type=int, default=16, help="erroneous candidates kept per prompt (default 16)"
    )
    parser.add_argument(
        "--min-total-logprob",
        type=float,
        default=None,
        help="optional bound on a candidate's total log-probability (nats, <= 0)",
    )
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    add_device_arguments(parser)
    add_run_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from entcal.studies.list_rules import check_list_params

    # Bad parameters fail before the model is loaded.
    if not args.thetas:
        raise ValueError("--thetas is empty")
    for th in args.thetas:
        check_list_params(th, args.min_total_logprob, args.max_list)
    for name in ("n", "steps", "prompt_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    import time
    from pathlib import Path

    from entcal import corpora, models
    from entcal.studies.branching import branching_sweep
    from entcal.studies.branching_report import write_branching_report
    from entcal.studies.branching_stats import critical_theta

    start = time.time()
    model, tokenizer = models.load(args.model, **load_options(args))
    corpus = corpora.load_corpus(args.human)
    pairs = corpora.make_pairs(
        corpus,
        tokenizer,
        prompt_tokens=args.prompt_tokens,
        continuation_tokens=args.steps,
        n=args.n,
        seed=args.seed,
        at_least=1,
    )
    results = branching_sweep(
        model,
        pairs,
        args.thetas,
        steps=args.steps,
        max_list=args.max_list,
        min_total_logprob=args.min_total_logprob,
        n_boot=args.n_boot,
        seed=args.seed,
        pad_token_id=tokenizer.pad_token_id or 0,
        progress=not args.no_progress,
    )
    meta = {
        "model": args.model,
        "human": args.human or "pydoc",
        "n_prompts": len(pairs),
        "prompt_tokens": args.prompt_tokens,
        "steps": args.steps,
        "max_list": args.max_list,
        "min_total_logprob": args.min_total_logprob,
        "seed": args.seed,
        "critical_theta": critical_theta(results),
        "seconds": None,
    }
    meta["seconds"] = round(time.time() - start, 1)
    files = write_branching_report(results, meta, Path(args.out))
    for r in results:
        print(
            f"theta={r.theta:<6g} R={r.R:.3f} [{r.R_low:.3f}, {r.R_high:.3f}]  "
            f"beta={r.beta:.3f}  ref kept {r.ref_kept_rate:.2f}"
        )
    crit = meta["critical_theta"]
    print("R crosses 1 at theta ~ " + (f"{crit:.3g}" if crit else "(not within the sweep)"))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
