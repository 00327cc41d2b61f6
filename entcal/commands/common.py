"""Arguments several commands share, declared once (torch-free: the CLI registers every command
without importing torch)."""

from __future__ import annotations

import argparse

#: The default model of every command; equal to :data:`entcal.models.DEFAULT_MODEL` (a test checks
#: it), written out so that building the parser imports no torch.
DEFAULT_MODEL = "smollm2-135m"

CORPUS_HELP = "human corpus: pydoc (default), FILE.txt, FILE.jsonl, hf:NAME"


def add_model_argument(parser: argparse.ArgumentParser, default: str = DEFAULT_MODEL) -> None:
    """``--model``: an embedded model's name, a local folder or a hub id."""
    parser.add_argument(
        "--model", default=default, help=f"embedded model name or folder (default {default})"
    )


def add_corpus_argument(parser: argparse.ArgumentParser, flag: str = "--human") -> None:
    """The human corpus (``--human``, or ``--corpus`` where the command trains on it)."""
    parser.add_argument(flag, default=None, help=CORPUS_HELP)


def add_pairs_arguments(
    parser: argparse.ArgumentParser,
    *,
    n: int | None,
    prompt_tokens: int | None,
    length: int | None,
    split: str | None = None,
    length_flag: str = "--length",
) -> None:
    """How many (prompt, continuation) pairs, of which lengths, from which split.

    A default of ``None`` means "the command decides" (compare's ``--quick`` changes them)."""

    def shown(v: int | None, fallback: str) -> str:
        return f"(default {v if v is not None else fallback})"

    parser.add_argument("--n", type=int, default=n, help=f"number of prompts {shown(n, 32)}")
    parser.add_argument(
        "--prompt-tokens", type=int, default=prompt_tokens,
        help=f"prompt tokens {shown(prompt_tokens, 128)}",
    )  # fmt: skip
    parser.add_argument(
        length_flag, type=int, default=length, help=f"continuation tokens {shown(length, 256)}"
    )
    if split is not None:
        parser.add_argument(
            "--split",
            choices=("all", "train", "test"),
            default=split,
            help=f"documents of the corpus: all, or its train / test split (default {split}; "
            "the embedded predictors were trained on the train split)",
        )


def add_engine_arguments(
    parser: argparse.ArgumentParser, engines: tuple[str, ...], engine_help: str
) -> None:
    """``--engine`` (one of ``engines``, the first the default) and ``--vllm-arg NAME=VALUE``
    (repeatable; parsed by :func:`entcal.decoding.vllm.engine.parse_vllm_args`)."""
    parser.add_argument("--engine", choices=engines, default=engines[0], help=engine_help)
    parser.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a vllm.LLM engine argument for the vLLM-based engines, e.g. "
        "tensor_parallel_size=4 (repeatable)",
    )


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype`` and ``--device-map``: where the model runs (see
    :func:`entcal.devices.resolve_device`); statistics are float32 whatever the weights' dtype."""
    parser.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N, mps, or auto (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16", "auto"),
        help="weight dtype (default float32; auto: bfloat16 on a GPU that supports it)",
    )
    parser.add_argument(
        "--device-map",
        default=None,
        help="transformers device_map (e.g. 'auto') for a model that does not fit one device; "
        "--device is then not used",
    )


def load_options(args: argparse.Namespace) -> dict:
    """The ``models.load`` keyword arguments of the device flags, checked before any loading
    (a device that is not here fails at once, naming it)."""
    from entcal import devices

    if args.device_map is None:
        devices.resolve_device(args.device)
    devices.resolve_dtype(args.dtype, args.device if args.device_map is None else "cpu")
    return {"device": args.device, "dtype": args.dtype, "device_map": args.device_map}


def add_run_arguments(parser: argparse.ArgumentParser, *, progress: bool = True) -> None:
    """``--seed``, ``--no-progress`` and the required ``--out`` folder."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", required=True, help="output folder")
