"""``jaxunlearn stream``: the command-line face of :func:`jaxunlearn.stream.run_stream`.

``jaxunlearn stream --out DIR [--requests 5] [--methods npo grad_diff saf npo+lwf] [--continual ...]
[--size small|quick] [--quick] [--relearn-steps N]`` trains (or reuses) a small target on the synthetic
QA benchmark, splits its forget people into R sequential deletion requests, applies every method
request by request (each from the previous request's result; ``+lwf`` / ``+fit`` carry a continual
method's state between requests), and after every request reports forget metrics on the current
and the earlier requests, utility (retain, general), the INT4 recovery of the earlier requests and,
with ``--relearn-steps``, their relearning recovery: ``DIR/results.json``, ``DIR/table.md``,
``DIR/stream.png``. ``--quick``: the quick target and at most 15 steps per request.

Also runnable as ``python -m jaxunlearn.stream_cli ...`` (same flags).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

__all__ = ["add_stream_parser", "config_from_args", "run_stream_cli", "main", "QUICK_MAX_STEPS"]

#: ``--quick``: the most unlearning steps a request runs.
QUICK_MAX_STEPS = 15


def _arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", required=True, help="results directory")
    p.add_argument("--requests", type=int, default=5, metavar="R", help="sequential deletion requests (>= 2; default 5)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="method config names under --configs, optionally with a continual method: 'npo+lwf', "
                        "'npo+fit' (default: npo grad_diff saf npo+lwf)")
    p.add_argument("--continual", nargs="+", default=None, choices=["lwf", "fit", "none"],
                   help="continual method per --methods entry (one value: for every method)")
    p.add_argument("--lwf-strength", type=float, default=None, help="lambda of the lwf Fisher penalty")
    p.add_argument("--cumulative", action="store_true",
                   help="each request also sees the earlier requests' forget rows (default: only its own, as FIT)")
    p.add_argument("--size", default="small", choices=["small", "quick"], help="target size (default small)")
    p.add_argument("--quick", action="store_true",
                   help=f"--size quick and at most {QUICK_MAX_STEPS} unlearning steps per request")
    p.add_argument("--max-steps", type=int, default=None, help="cap every method's steps per request")
    p.add_argument("--seed", type=int, default=None, help="data, request split and batch-order seed (default 0)")
    p.add_argument("--relearn-steps", type=int, default=0, metavar="N",
                   help="relearning attack on the earlier requests after each request (0: off; it costs time)")
    p.add_argument("--configs", default=None, help="method configs directory (default experiments/configs)")
    p.add_argument("--reuse-target", default=None, metavar="DIR",
                   help="reuse the target cached by an earlier stream run in DIR when trained the same way")
    p.add_argument("--overwrite", action="store_true", help="replace an existing results directory")
    p.add_argument("--no-progress", action="store_true", help="print only the table")
    return p


def add_stream_parser(sub) -> argparse.ArgumentParser:
    """Add the ``stream`` sub-command to ``sub`` (an ``argparse`` sub-parsers object)."""
    return _arguments(sub.add_parser(
        "stream", help="continual deletion: a stream of R requests per method, forget/utility after each",
        description=__doc__.split("\n\n")[1]))


def config_from_args(args):
    """The :class:`~jaxunlearn.stream.StreamConfig` the parsed ``args`` ask for.

    Raises:
      ValueError: ``--requests`` < 2, ``--continual`` of the wrong length or conflicting with a
        method's own ``+kind``, ``--relearn-steps`` < 0, ``--max-steps`` < 1, ``--seed`` < 0, an empty
        or repeated method list (each named).
    """
    from jaxunlearn.stream import DEFAULT_METHODS, STREAM_SIZES, StreamConfig, parse_method_spec

    if args.requests < 2:
        raise ValueError(f"--requests must be >= 2 (a stream has at least two requests), got {args.requests}")
    if args.relearn_steps < 0:
        raise ValueError(f"--relearn-steps must be >= 0 (0: off), got {args.relearn_steps}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    methods = list(args.methods) if args.methods is not None else list(DEFAULT_METHODS)
    if args.continual is not None:
        kinds = args.continual * len(methods) if len(args.continual) == 1 else list(args.continual)
        if len(kinds) != len(methods):
            raise ValueError(f"--continual takes one value or one per method ({len(methods)}), got {len(kinds)}")
        out = []
        for m, k in zip(methods, kinds):
            name, own = parse_method_spec(m)
            if own is not None and k != "none" and own != k:
                raise ValueError(f"method {m!r} already names continual method {own!r}; --continual says {k!r}")
            out.append(name if (own or (None if k == "none" else k)) is None else f"{name}+{own or k}")
        methods = out
    demo = STREAM_SIZES["quick" if args.quick else args.size]
    if args.seed is not None:
        demo = dataclasses.replace(demo, seed=args.seed)
    max_steps = args.max_steps if args.max_steps is not None else (QUICK_MAX_STEPS if args.quick else None)
    continual = {"lwf": {"strength": args.lwf_strength}} if args.lwf_strength is not None else {}
    return StreamConfig(demo=demo, methods=tuple(methods), requests=args.requests, cumulative=args.cumulative,
                        continual=continual, max_steps=max_steps, relearn_steps=args.relearn_steps,
                        configs_dir=args.configs)


def run_stream_cli(args) -> int:
    """Run the ``stream`` sub-command; returns the exit status (0; 1 when a method's stream failed).

    Bad input (``--requests`` < 2, an unknown method, an existing ``--out`` without
    ``--overwrite``) raises ``ValueError`` / ``FileExistsError`` before any training; ``jaxunlearn``'s
    ``main`` prints them as errors with status 2.
    """
    from jaxunlearn.stream import run_stream

    cfg = config_from_args(args)
    results = run_stream(args.out, cfg, overwrite=args.overwrite, progress=not args.no_progress,
                         reuse_from=args.reuse_target)
    if args.no_progress:
        print(results["table"])
    return 1 if results["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jaxunlearn.stream_cli``: the ``stream`` command on its own (errors: status 2)."""
    args = _arguments(argparse.ArgumentParser(prog="jaxunlearn stream", description=__doc__.split("\n\n")[1])
                      ).parse_args(argv)
    try:
        return run_stream_cli(args)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"jaxunlearn stream: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
