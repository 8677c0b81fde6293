"""``jaxunlearn durability``: the command-line face of :func:`jaxunlearn.durability_bench.run_durability`.

``jaxunlearn durability --out DIR [--methods ...] [--seeds 3] [--epsilon 0.047] [--quick] [--no-sweep]``
trains (or reuses) a small target on the synthetic QA benchmark, unlearns it with every method in
adapter space (a LoRA adapter over the NF4-held target), deploys each merged model at BF16, INT8
and INT4 (and NF4 / FP4), prints FA / RA per precision with the (epsilon, P) durability
certificate of every method, sweeps each method's strength knob (``pareto.png``), and writes
``DIR/results.json`` and ``DIR/table.md``. ``--quick``: a tiny model, 2 methods, 2 seeds, 10 steps,
a 2-point sweep (a few minutes on a laptop CPU).
"""

from __future__ import annotations

import argparse

__all__ = ["add_durability_parser", "run_durability_cli", "config_from_args"]


def add_durability_parser(sub) -> argparse.ArgumentParser:
    """Add the ``durability`` sub-command to ``sub`` (an ``argparse`` sub-parsers object)."""
    p = sub.add_parser(
        "durability", help="adapter-space unlearning deployed at bf16 / int8 / int4: INT4 recovery and the "
        "(epsilon, P) durability certificate (DurableUn at small scale)",
        description=__doc__.split("\n\n")[1])
    p.add_argument("--out", required=True, help="results directory")
    p.add_argument("--methods", nargs="+", default=None,
                   help="method config names under --configs (default: ga grad_diff npo simnpo saf salun "
                        "task_vector; --quick: npo saf)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="seeds per method (default 3; --quick: 2)")
    p.add_argument("--epsilon", type=float, default=None,
                   help="certificate threshold on FA at every precision of P = bf16, int8, int4 (default 0.047)")
    p.add_argument("--fa-metric", default=None, choices=["exact_match", "token"],
                   help="how FA/RA score an answer: exact_match (default: the answer reproduced verbatim under "
                        "greedy decoding) or token (the fraction of its tokens, open-unlearning's exact_memorization, "
                        "which also credits template words)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, 2 methods, 2 seeds, 10 steps per method, a 2-point sweep")
    p.add_argument("--no-sweep", action="store_true", help="skip the Pareto sweep (and pareto.png)")
    p.add_argument("--configs", default=None,
                   help="directory of the adapter-regime method configs (default experiments/configs/durable)")
    p.add_argument("--reuse-target", default=None, metavar="DIR",
                   help="reuse the target cached by an earlier durability run in DIR when trained the same way")
    p.add_argument("--overwrite", action="store_true", help="replace an existing results directory")
    p.add_argument("--no-progress", action="store_true", help="print only the tables")
    return p


def config_from_args(args):
    """The :class:`~jaxunlearn.durability_bench.DurabilityConfig` the parsed ``args`` ask for
    (``--quick``: :func:`~jaxunlearn.durability_bench.quick_config`, else
    :func:`~jaxunlearn.durability_bench.full_config`, with the named flags applied).

    Raises:
      ValueError / TypeError: ``--seeds`` < 1, ``--epsilon`` < 0 or not finite, an empty or
        repeated ``--methods``.
    """
    from jaxunlearn.durability_bench import full_config, quick_config

    over = {}
    if args.methods is not None:
        over["methods"] = tuple(args.methods)
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        over["seeds"] = args.seeds
    if args.epsilon is not None:
        if not args.epsilon >= 0:  # also NaN
            raise ValueError(f"--epsilon must be >= 0, got {args.epsilon}")
        over["epsilon"] = args.epsilon
    if args.fa_metric is not None:
        over["fa_metric"] = args.fa_metric
    if args.no_sweep:
        over["sweep"] = False
    if args.configs is not None:
        over["configs_dir"] = args.configs
    return (quick_config if args.quick else full_config)(**over)


def run_durability_cli(args) -> int:
    """Run the ``durability`` sub-command; returns the exit status (0; 1 when a method run failed).

    Bad input (an unknown method, a config without an adapter block, ``--epsilon`` < 0,
    ``--seeds`` < 1, an existing ``--out`` without ``--overwrite``) raises ``ValueError`` /
    ``FileExistsError`` / ``FileNotFoundError`` before any training; ``jaxunlearn``'s ``main``
    prints them as errors with status 2.
    """
    from jaxunlearn.durability_bench import run_durability

    cfg = config_from_args(args)
    results = run_durability(args.out, cfg, overwrite=args.overwrite, progress=not args.no_progress,
                             reuse_from=args.reuse_target)
    if args.no_progress:
        print(results["table"])
    return 1 if results["failed"] else 0
