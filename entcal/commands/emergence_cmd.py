"""``entcal emergence``: information emergence per block (Chen et al., arXiv 2405.12617).

Writes ``OUT/results.json`` (IE, macro and micro MI per block), ``OUT/report.md`` and
``OUT/ie_per_layer.png`` (plus ``OUT/ie_per_position.png`` with ``--positions``).
"""

from __future__ import annotations

import argparse

from entcal.commands.common import (
    add_corpus_argument,
    add_device_arguments,
    add_model_argument,
    add_run_arguments,
    load_options,
)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "emergence",
        help="information emergence (IE) per transformer block, MI by a MINE critic",
        description=(
            "IE(l) = MI(block output; block input) of the last token in context minus the mean "
            "MI of tokens fed alone, on windows of human text; MI = held-out MINE bound with "
            "its standard error. Writes "
            "OUT/results.json, OUT/report.md and PNG plots."
        ),
    )
    add_model_argument(parser)
    add_corpus_argument(parser)
    parser.add_argument(
        "--layers", type=_ints, default=None, help="comma-separated block indices (default: all)"
    )
    parser.add_argument(
        "--n", type=int, default=4096, help="distinct text windows, MI samples (default 4096)"
    )
    parser.add_argument("--seq-len", type=int, default=8, help="tokens per window T (default 8)")
    parser.add_argument(
        "--dim", type=int, default=32, help="whitened principal components per state (default 32)"
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=1.0,
        help="σ of the Gaussian noise per whitened component, which makes the MI of the "
        "deterministic blocks finite (default 1.0; 0: none)",
    )
    parser.add_argument(
        "--positions",
        action="store_true",
        help="also IE vs position (T more MI estimates per block)",
    )
    parser.add_argument("--mine-steps", type=int, default=600, help="MINE steps (default 600)")
    parser.add_argument("--mine-batch", type=int, default=512, help="MINE batch (default 512)")
    add_device_arguments(parser)
    add_run_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.n < 100:
        raise ValueError(f"--n must be >= 100 for MI estimation, got {args.n}")
    if args.dim < 1:
        raise ValueError(f"--dim must be >= 1, got {args.dim}")
    if not args.noise >= 0:
        raise ValueError(f"--noise must be >= 0, got {args.noise}")
    if args.mine_steps < 1 or args.mine_batch < 2:
        raise ValueError(
            f"--mine-steps must be >= 1 and --mine-batch >= 2, got {args.mine_steps}, "
            f"{args.mine_batch}"
        )
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.layers is not None and any(v < 0 for v in args.layers):
        raise ValueError(f"--layers must be block indices >= 0, got {args.layers}")

    import time
    from pathlib import Path

    from entcal import corpora, models
    from entcal.studies.capture import check_layers
    from entcal.studies.emergence import information_emergence
    from entcal.studies.emergence_report import write_emergence_report

    start = time.time()
    model, tokenizer = models.load(args.model, **load_options(args))
    check_layers(model, args.layers)  # an index beyond the model fails before any work
    result = information_emergence(
        model,
        tokenizer,
        corpora.load_corpus(args.human),
        layers=args.layers,
        n_sequences=args.n,
        seq_len=args.seq_len,
        dim=args.dim,
        noise=args.noise,
        positions=args.positions,
        seed=args.seed,
        progress=not args.no_progress,
        steps=args.mine_steps,
        batch_size=args.mine_batch,
    )
    meta = {"model": args.model, "human": args.human or "pydoc", "seconds": None}
    meta["seconds"] = round(time.time() - start, 1)
    files = write_emergence_report(result, meta, Path(args.out))
    for i, layer in enumerate(result.layers):
        print(
            f"block {layer:>2}: IE={result.ie[i]:+.3f} ± {result.ie_se[i]:.3f}  "
            f"MI macro={result.mi_macro[i]:.3f}  MI micro={result.mi_micro[i]:.3f}"
        )
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
