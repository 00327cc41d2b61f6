"""``entcal compare``: several decoders on the same prompts, evaluated side by side.

A thin adapter over :func:`entcal.eval.compare.run_compare` (see there for the protocol and
``results.json``).
"""

from __future__ import annotations

import argparse
import sys

from entcal.commands.common import (
    add_corpus_argument,
    add_device_arguments,
    add_engine_arguments,
    add_model_argument,
    add_pairs_arguments,
    add_run_arguments,
    load_options,
)
from entcal.eval.defaults import DEFAULT_DECODERS, ENGINES, TRANSFORMERS_ONLY_DEFAULTS


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
    add_model_argument(parser)
    add_corpus_argument(parser)
    parser.add_argument(
        "--decoders",
        default=None,
        help=f"';'-separated decoder specs (default: {DEFAULT_DECODERS!r})",
    )
    add_pairs_arguments(parser, n=None, prompt_tokens=None, length=None, split="all")
    parser.add_argument(
        "--samples", type=int, default=1, help="continuations sampled per prompt (default 1)"
    )
    parser.add_argument(
        "--observer", default=None, help="second model with the same tokenizer (Binoculars)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch")
    parser.add_argument("--epsilon", type=float, default=0.1, help="typical-set epsilon (nats)")
    parser.add_argument(
        "--quick", action="store_true", help="8 prompts of 64 tokens, 48-token continuations"
    )
    add_device_arguments(parser)
    add_engine_arguments(
        parser,
        ENGINES,
        "what generates: transformers (default), vllm (one request per continuation; the "
        "statistics are recomputed by the teacher-forced scorer) or ray (Ray Data with a vLLM "
        "engine per actor, shards written to OUT/generations)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster address for --engine ray (default: a local Ray)",
    )
    parser.add_argument(
        "--ray-actors", type=int, default=1, help="vLLM engines (Ray actors) at once (default 1)"
    )
    parser.add_argument(
        "--ray-actor-gpus", type=float, default=None, help="GPUs each Ray actor reserves"
    )
    parser.add_argument(
        "--from-generations",
        default=None,
        metavar="DIR",
        help="score and report the generations in DIR (JSON-lines shards, e.g. OUT/generations "
        "of an --engine ray run) instead of generating; the decoders default to DIR's",
    )
    add_run_arguments(parser)
    parser.set_defaults(func=_run)


def _without(decoders: str, names: tuple[str, ...]) -> str:
    """The ``;``-separated ``decoders`` less the specs of the methods in ``names``."""
    kept = (d.strip() for d in decoders.split(";"))
    return "; ".join(d for d in kept if d and d.split(":", 1)[0].strip() not in names)


def default_decoders(
    has_predictor: bool, engine: str, model: str = "this model"
) -> tuple[str, list[str]]:
    """``entcal compare``'s default decoders for ``model``, with or without a shipped predictor,
    and for an engine, with a note for each one left out."""
    decoders, notes = DEFAULT_DECODERS, []
    if not has_predictor:
        # Predictors are shipped for the embedded models; another needs its own (entcal train).
        decoders = _without(decoders, ("calibrated",))
        notes.append(
            f"no shipped predictor for {model}; 'calibrated' left out of the default decoders "
            "(train one with entcal train, then pass --decoders "
            "'...; calibrated:predictor=DIR/predictor')"
        )
    if engine != "transformers":
        decoders = _without(decoders, TRANSFORMERS_ONLY_DEFAULTS)
        notes.append(
            f"{', '.join(TRANSFORMERS_ONLY_DEFAULTS)} left out of the default decoders with "
            f"--engine {engine} (target=prompt reads the prompt through the model; a vLLM "
            "request takes the target as a number, e.g. 'anchored:target=2.9')"
        )
    return decoders, notes


def _run(args: argparse.Namespace) -> int:
    from entcal.decoding.vllm.engine import parse_vllm_args
    from entcal.eval.compare import QUICK, CompareConfig, parse_decoders

    if args.decoders is not None:
        decoders = args.decoders
    elif args.from_generations is not None:
        from entcal.eval.ray_engine import specs_in

        decoders = specs_in(args.from_generations)
    else:
        from entcal.calibrators.predictor_file import shipped_predictors

        has_predictor = args.model in shipped_predictors()
        decoders, notes = default_decoders(has_predictor, args.engine, args.model)
        for note in notes:
            print(f"entcal compare: {note}", file=sys.stderr)
    # Unknown decoders fail here, before the model is loaded or anything generated; the parsed
    # decoders go on to run_compare, which does not parse them again.
    parsed = list(parse_decoders(decoders).values())
    base = QUICK if args.quick else {"n": 32, "length": 256, "prompt_tokens": 128}
    config = CompareConfig(
        out=args.out,
        model=args.model,
        human=args.human,
        decoders=parsed,
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
        **load_options(args),
        engine=args.engine,
        vllm_args=parse_vllm_args(args.vllm_arg),
        ray_address=args.ray_address,
        ray_actors=args.ray_actors,
        ray_actor_gpus=args.ray_actor_gpus,
        from_generations=args.from_generations,
    )
    from entcal.eval.compare import run_compare

    results = run_compare(config)
    from entcal.eval.report import summary_table

    print(summary_table(results))
    print(f"\nwrote {args.out}/results.json, {args.out}/report.md and plots")
    return 0
