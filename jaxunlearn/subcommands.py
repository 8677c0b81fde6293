"""Sub-commands that live in their own modules: ``{name: (add_parser(sub), run(args) -> exit status)}``.

:func:`jaxunlearn.cli.build_parser` adds each one's parser and :func:`jaxunlearn.cli.main` runs
it (inside the ``--mesh`` context when the command has one). A new command registers here.
"""

from __future__ import annotations

from typing import Callable

from jaxunlearn.durability_cli import add_durability_parser, run_durability_cli

__all__ = ["EXTRA_COMMANDS"]

EXTRA_COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "durability": (add_durability_parser, run_durability_cli),
}
