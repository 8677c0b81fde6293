"""Sub-commands that live in their own modules: ``{name: (add_parser(sub), run(args, mesh) -> exit status)}``.

:func:`jaxunlearn.cli.build_parser` adds each one's parser and :func:`jaxunlearn.cli.main` runs
it inside the ``--mesh`` context (``mesh``: the device mesh of ``--mesh``, or None). A new command
registers here.
"""

from __future__ import annotations

from typing import Callable

from jaxunlearn.bench_cli import add_bench_parser, run_bench
from jaxunlearn.durability_cli import add_durability_parser, run_durability_cli
from jaxunlearn.stream_cli import add_stream_parser, run_stream_cli

__all__ = ["EXTRA_COMMANDS"]

EXTRA_COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "bench": (add_bench_parser, run_bench),
    "durability": (add_durability_parser, lambda args, mesh: run_durability_cli(args)),
    "stream": (add_stream_parser, lambda args, mesh: run_stream_cli(args)),
}
