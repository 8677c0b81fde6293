"""``jaxunlearn bench``: run unlearning methods on a trained checkpoint and compare them in one table.

Every method (a config under ``--configs``) runs on the target with ``--seeds`` seeds and is
evaluated against the reference (TOFU-style metrics, MIA, quantisation recovery, MUSE columns
with ``--muse``) and by the probes (:mod:`jaxunlearn.eval.probes`: the relearning attack, the
overlap splits where the data have their columns, REMIND with a ``--holdout``); ``--out`` gets
``results.json``, ``forget_vs_utility.png``, ``relearn.png`` and the printed tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
import types

from jaxunlearn.cli_common import (add_mesh, add_model_data, add_seeds, encode_splits, format_failures, is_main,
                                   load_model_and_data, seeds_of, shard_model, split_of)
from jaxunlearn.method_configs_cli import adapter_from_args, add_adapter_argument
from jaxunlearn.outputs import check_output_dir, staged_dir
from jaxunlearn.quant import SCHEMES as QUANT_SCHEMES

__all__ = ["add_bench_parser", "run_bench"]


def add_bench_parser(sub) -> argparse.ArgumentParser:
    """Add the ``bench`` sub-command to ``sub`` (an ``argparse`` sub-parsers object)."""
    from jaxunlearn.eval.probes import PROBES, RELEARN_DATA, RELEARN_DEFAULT
    from jaxunlearn.stats import DEFAULT_SEEDS

    b = sub.add_parser(
        "bench",
        help="run unlearning methods on a trained target and compare them in one table (TOFU-style "
             "metrics, MIA, quantisation recovery)",
        description="Run each method (a config under --configs) on the target, evaluate every result against "
                    "the reference, and write results.json, forget_vs_utility.png and the printed table to --out.",
    )
    add_model_data(b)
    b.add_argument("--reference", default=None, help="reference checkpoint (never trained on the forget split)")
    b.add_argument("--forget", required=True, help="forget split: trained on by the methods and evaluated "
                   "(forget quality needs paraphrased/perturbed answers, else n/a)")
    b.add_argument("--retain", required=True, help="retain split: the methods' retain data and evaluated")
    b.add_argument("--general", nargs="*", default=[], help="further retain-side sets for model utility")
    b.add_argument("--holdout", default=None, help="never-trained split for membership inference")
    b.add_argument("--methods", nargs="*", default=None,
                   help="config names under --configs (default: the demo's methods, jaxunlearn.benchmark.DEFAULT_METHODS)")
    b.add_argument("--configs", default=None, help="method configs directory (default: experiments/configs)")
    b.add_argument("--quant", nargs="*", default=["int4"], choices=list(QUANT_SCHEMES),
                   help="fake-quantisation schemes for the recovery columns (default: int4)")
    b.add_argument("--rouge-examples", type=int, default=32, help="generate for the first N rows per split")
    b.add_argument("--muse", default=None, help="a MUSE corpus directory (jaxunlearn.data.muse.load_muse layout, "
                   "e.g. the demo's <out>/muse): add MUSE's KnowMem, VerbMem and PrivLeak columns")
    b.add_argument("--verbmem-tokens", type=int, default=128,
                   help="VerbMem generation budget with --muse (default 128, MUSE's; the demo uses 64)")
    b.add_argument("--seed", type=int, default=0, help="the first unlearning seed (default 0)")
    add_seeds(b, DEFAULT_SEEDS)
    add_adapter_argument(b)
    b.add_argument("--out", required=True, help="results directory")
    b.add_argument("--overwrite", action="store_true", help="replace an existing results directory")
    add_mesh(b)
    b.add_argument("--probes", nargs="*", default=None, choices=list(PROBES),
                   help="extra evaluations of every model (default: all the data allow, the others named n/a): "
                        "relearn (the relearning attack), overlap (BLUR-style splits; needs person/attribute/fact "
                        "columns), remind (needs --holdout)")
    b.add_argument("--relearn-data", default="forget", choices=list(RELEARN_DATA),
                   help="what the relearning attack fine-tunes on: forget (the rows of half the forget people; "
                        "default), paraphrase (the same rows with paraphrased answers), facts (some attributes of "
                        "every forget person, the others held out)")
    b.add_argument("--relearn-steps", type=int, default=RELEARN_DEFAULT.steps,
                   help="relearning attack steps (AdamW lr %g, batch %d; default %%(default)s)"
                        % (RELEARN_DEFAULT.learning_rate, RELEARN_DEFAULT.batch_size))
    return b


def run_bench(args: argparse.Namespace, mesh) -> int:
    """Run ``jaxunlearn bench`` (parsed ``args``; ``mesh`` from ``--mesh`` or None); the exit status."""
    from tqdm.auto import tqdm

    from jaxunlearn.benchmark import (DEFAULT_METHODS, MUSE_EVAL, compare_methods, format_results_table,
                                      load_method_configs, write_benchmark)
    from jaxunlearn.data.muse import load_muse
    from jaxunlearn.eval.probes import PROBES, RELEARN_DEFAULT, benchmark_probes
    from jaxunlearn.results_table import format_probe_table
    from jaxunlearn.eval.runner import encode_eval_splits
    from jaxunlearn.methods import UnlearnContext
    from jaxunlearn.models import DecoderFn, from_pretrained
    from jaxunlearn.method_configs import method_config_to_dict
    from jaxunlearn.outputs import write_json_atomic

    check_output_dir(args.out, overwrite=args.overwrite, what="--out")
    if args.rouge_examples < 0:
        raise ValueError(f"--rouge-examples must be >= 0, got {args.rouge_examples}")
    seeds = seeds_of(args)
    methods = list(DEFAULT_METHODS if args.methods is None else args.methods)
    configs = load_method_configs(methods, args.configs, adapter_from_args(args))  # bad names fail before loading
    if args.verbmem_tokens < 1:
        raise ValueError(f"--verbmem-tokens must be >= 1, got {args.verbmem_tokens}")
    muse = load_muse(args.muse, raw=False) if args.muse else None
    muse_kwargs = {**MUSE_EVAL, "verbmem_max_new_tokens": args.verbmem_tokens}
    model, tok, dd = load_model_and_data(args)
    if args.relearn_steps < 1:
        raise ValueError(f"--relearn-steps must be >= 1, got {args.relearn_steps}")
    if args.probes is not None and "remind" in args.probes and not args.holdout:
        raise ValueError("--probes remind needs --holdout (REMIND's never-trained negatives); drop it with --probes "
                         "relearn overlap")
    train_enc = encode_splits(model, tok, dd, (args.forget, args.retain) + ((args.holdout,) if args.holdout else ()),
                              args.separator)
    roles = {args.forget: "forget", args.retain: "retain", **{g: "general" for g in args.general}}
    if args.holdout:
        roles[args.holdout] = "holdout"
    enc = encode_eval_splits(tok, {n: split_of(dd, n) for n in roles}, roles=roles, separator=args.separator)
    reference = None
    if args.reference:
        reference, _ = from_pretrained(args.reference, load_tokenizer=False)
    if mesh is not None:
        shard_model(model, mesh)
        if reference is not None:
            shard_model(reference, mesh)
    fn, params = DecoderFn.of(model)
    ctx = UnlearnContext(fn, params, train_enc[args.forget], train_enc[args.retain],
                         seed=args.seed, mesh=mesh)
    ev = dict(forget=args.forget, retain=args.retain, general=args.general or None, holdout=args.holdout,
              rouge_examples=args.rouge_examples)
    data = types.SimpleNamespace(dataset=dd, forget_split=args.forget, retain_split=args.retain,
                                 holdout_split=args.holdout, encoded=train_enc, tokenizer=tok,
                                 separator=args.separator)
    probe_names = list(PROBES if args.probes is None else args.probes)
    relearn = dataclasses.replace(RELEARN_DEFAULT, steps=args.relearn_steps,
                                  eval_every=max(1, min(RELEARN_DEFAULT.eval_every, args.relearn_steps)))
    probes, probes_na = benchmark_probes(data, fn, params, probe_names, seed=args.seed,
                                         relearn_data=args.relearn_data, relearn=relearn)
    head = {"model": os.path.abspath(args.model), "reference": args.reference and os.path.abspath(args.reference),
            "data": os.path.abspath(args.data), "roles": roles, "seed": args.seed, "train_seeds": False,
            "muse": args.muse and os.path.abspath(args.muse), "muse_eval": muse_kwargs if muse else None,
            "method_configs": {m: method_config_to_dict(c) for m, c in configs.items()},
            "forget_split": args.forget, "retain_split": args.retain, "probes": probe_names,
            "relearn": {"data": args.relearn_data, **dataclasses.asdict(relearn)},
            "probes_not_available": probes_na}
    # process 0 writes the results; the others run the same SPMD program and write into a scratch directory
    out, scratch = args.out, None
    if not is_main():
        out = scratch = tempfile.mkdtemp(prefix="jaxunlearn-bench-")
    t0 = time.perf_counter()
    try:
        with staged_dir(out, overwrite=args.overwrite or scratch is not None, command="bench", what="--out") as tmp:
            bar = tqdm(total=1 + len(configs) * len(seeds), desc="bench", disable=args.no_progress,
                       dynamic_ncols=True)
            res = compare_methods(model, reference, tok, enc, ev, ctx, configs, seeds=seeds, quant_schemes=args.quant,
                                  bar=bar, muse=muse, muse_kwargs=muse_kwargs, probes=probes,
                                  on_update=lambda partial: write_json_atomic(
                                      tmp / "results.json", {**head, **partial, "complete": False}))
            bar.close()
            results = {**head, **res, "seconds_total": time.perf_counter() - t0}
            write_benchmark(tmp, results)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if not is_main():
        return 0
    print(format_results_table(results["table"], results.get("not_available")))
    probe_table = format_probe_table(results["table"])
    if probe_table is not None:
        print("\nprobes (jaxunlearn.eval.probes):\n" + probe_table)
    for name, why in probes_na.items():
        print(f"  probe {name} n/a: {why}")
    print(f"wrote {os.path.join(args.out, 'results.json')}")
    if results["failed"]:
        print(f"jaxunlearn bench: {len(results['failed'])} method(s) failed: {format_failures(results['failed'])} "
              "(reasons in the table and results.json)", file=sys.stderr)
        return 1
    return 0
