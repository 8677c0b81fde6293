"""The ``jaxunlearn`` command line.

    jaxunlearn demo [--out results/demo] [--overwrite] [--steps N] [--forget-split forget10]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

__all__ = ["main", "build_parser"]


def _set_offline_env() -> None:
    # Nothing here ever needs the network: make the HF libraries fail fast instead of trying.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per job)."""
    p = argparse.ArgumentParser(prog="jaxunlearn", description="Machine unlearning for language models in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo",
        help="generate the synthetic benchmark, train target and reference models, print a results table",
        description="Runs the embedded default offline: synthetic fictitious-facts benchmark, a small Llama-style "
        "decoder trained from scratch as the target (all people) and as the reference (without the forget "
        "people); prints answer probability / token accuracy / fact accuracy per split and writes "
        "<out>/results.json, <out>/data and <out>/models/{target,reference}.",
    )
    d.add_argument("--out", default="results/demo", help="results directory (default: results/demo)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing results directory")
    d.add_argument("--steps", type=int, default=None, help="training steps per model")
    d.add_argument("--people", type=int, default=None, help="number of trained people")
    d.add_argument("--forget-split", default=None, choices=["forget01", "forget05", "forget10"])
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _demo(args) -> int:
    from jaxunlearn.demo import run_demo
    from jaxunlearn.pipeline import DemoConfig

    cfg = DemoConfig()
    changes = {}
    if args.people is not None:
        changes["num_people"] = args.people
    if args.forget_split is not None:
        changes["forget_split"] = args.forget_split
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.steps is not None:
        changes["train"] = dataclasses.replace(cfg.train, steps=args.steps)
    cfg = dataclasses.replace(cfg, **changes)
    run_demo(args.out, cfg=cfg, overwrite=args.overwrite, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxunlearn`` console script."""
    _set_offline_env()
    args = build_parser().parse_args(argv)
    try:
        return {"demo": _demo}[args.command](args)
    except (FileExistsError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"jaxunlearn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
