"""The ``entcal`` command line.

Each command lives in the module that owns its logic and exposes ``register(subparsers)``, which
adds an argparse sub-parser whose ``func`` default runs the command. Registration imports nothing
heavy (torch and transformers are imported inside the handlers), so ``entcal --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands, in the order ``entcal --help`` lists them.
COMMAND_MODULES = [
    "entcal.commands.models_cmd",
    "entcal.commands.generate_cmd",
    "entcal.commands.train_cmd",
    "entcal.commands.compare_cmd",
    "entcal.commands.frontier_cmd",
    "entcal.commands.serve_cmd",
    "entcal.commands.listdecode_cmd",
    "entcal.commands.emergence_cmd",
]


class UsageError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entcal",
        description="Entropy-calibrated text generation and typical-set evaluation.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _version() -> str:
    from entcal import __version__

    return f"entcal {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (UsageError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"entcal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
