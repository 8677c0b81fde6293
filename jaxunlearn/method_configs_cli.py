"""Command-line options over :mod:`jaxunlearn.method_configs`: ``--adapter SPEC`` for every command that unlearns."""

from __future__ import annotations

import argparse

__all__ = ["add_adapter_argument", "adapter_from_args"]


def add_adapter_argument(p: argparse.ArgumentParser) -> None:
    """Add ``--adapter SPEC`` (a :func:`jaxunlearn.method_configs.parse_adapter_spec` spec) to ``p``."""
    p.add_argument("--adapter", default=None, metavar="SPEC",
                   help="unlearn in adapter space: train a LoRA adapter over the frozen target and merge it "
                        "into the result. SPEC: key=value pairs of jaxunlearn.adapters.LoraConfig, e.g. "
                        "'rank=8,alpha=16,base=nf4' (base=nf4: the frozen target held as NF4, QLoRA), or 'nf4' "
                        "or 'default'. Methods of kind task_vector, perta and gradient (not ssd)")


def adapter_from_args(args: argparse.Namespace):
    """The :class:`~jaxunlearn.adapters.LoraConfig` of ``args.adapter``, or None without one.

    Raises:
      ValueError / TypeError: a bad spec (:func:`jaxunlearn.method_configs.parse_adapter_spec`).
    """
    from jaxunlearn.method_configs import parse_adapter_spec

    return None if args.adapter is None else parse_adapter_spec(args.adapter)
