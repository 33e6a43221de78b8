"""The ``microtrain compare`` command (see the package's docstring)."""

from __future__ import annotations

import microtrain
from microtrain import MicrotrainError


def cmd_compare(args) -> int:
    raise MicrotrainError("microtrain compare is not finished yet")


@microtrain.hookimpl
def register_commands(subparsers):
    parser = subparsers.add_parser("compare", help="is recipe B better than A? seed-paired runs with confidence intervals")
    parser.set_defaults(handler=cmd_compare)
