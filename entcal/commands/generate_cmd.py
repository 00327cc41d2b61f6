"""``entcal generate``: sample continuations with any decoder spec."""

from __future__ import annotations

import argparse
import json
import sys

from entcal.commands.common import add_device_arguments, add_model_argument, load_options


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "generate",
        help="sample continuations of a prompt with a decoder spec",
        description=(
            "Sample continuations with exactly the distribution of --decoder (no hidden "
            "transformers defaults). Specs: 'ancestral', 'temperature=0.8,top_p=0.95', "
            "'min_p=0.05', 'typical=0.9', 'mirostat:tau=3', 'edt:theta=1', ..."
        ),
    )
    parser.add_argument("prompt", nargs="+", help="prompt text (several prompts: several args)")
    add_model_argument(parser)
    add_device_arguments(parser)
    parser.add_argument("--decoder", default="ancestral", help="decoder spec")
    parser.add_argument("--n", type=int, default=1, help="continuations per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-at-eos", action="store_true", help="end a sequence at EOS")
    parser.add_argument(
        "--json", action="store_true", help="print JSON with per-token log-probs and entropies"
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from entcal import generate, models
    from entcal.decoding import parse

    decoder = parse(args.decoder)  # fail on a bad spec before loading the model
    if args.n < 1:
        raise ValueError(f"--n={args.n}; must be >= 1")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens}; must be >= 1")
    model, tokenizer = models.load(args.model, **load_options(args))
    results = generate(
        model,
        tokenizer,
        list(args.prompt),
        decoder=decoder,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        n=args.n,
        stop_at_eos=args.stop_at_eos,
    )
    if args.json:
        out = []
        for r in results:
            d = r.to_dict()
            d["prompt"] = args.prompt[r.prompt_index]
            d["decoder"] = str(decoder)
            out.append(d)
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return 0
    for r in results:
        mean_lp = float(r.raw_logprob.mean()) if len(r.token_ids) else float("nan")
        print(
            f"# prompt {r.prompt_index} | {decoder} | {len(r.token_ids)} tokens | "
            f"mean raw log-prob {mean_lp:.3f} nats"
        )
        print(args.prompt[r.prompt_index] + r.text)
        print()
    return 0
