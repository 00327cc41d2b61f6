"""``entcal models list | pull NAME | info NAME``."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("models", help="list, fetch and describe the embedded models")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="embedded model names").set_defaults(func=_list)
    pull = actions.add_parser("pull", help="fetch and convert an embedded model now")
    pull.add_argument("name")
    pull.add_argument("--force", action="store_true", help="convert again")
    pull.set_defaults(func=_pull)
    info = actions.add_parser("info", help="describe an embedded model (JSON)")
    info.add_argument("name")
    info.set_defaults(func=_info)


def _list(args: argparse.Namespace) -> int:
    from entcal import models

    for name, spec in models.EMBEDDED.items():
        default = " (default)" if name == models.DEFAULT_MODEL else ""
        print(f"{name}{default}\t{spec.description}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from entcal import models

    print(models.pull(args.name, force=args.force))
    return 0


def _info(args: argparse.Namespace) -> int:
    from entcal import models

    print(json.dumps(models.info(args.name), indent=2))
    return 0
