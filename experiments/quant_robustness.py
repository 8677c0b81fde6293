"""Does forgetting survive 4-bit quantisation? Gradient unlearning with and without SAF.

Zhang et al. (ICLR 2025, "Catastrophic Failure of LLM Unlearning via Quantization") found
that models unlearned with small learning rates recover much of the forgotten knowledge once
quantised to 4 bits: the unlearning update is smaller than half a quantisation step, so
rounding maps the unlearned weights back onto the target's codes. Sharpness-aware forgetting
(SAF, ``jaxunlearn.sam.saf_loss``) evaluates the forget loss at a perturbation of the size of
the INT4 rounding error, so its forgetting should hold at every point of that neighbourhood.

This sweep runs each base method (NPO, GradDiff) and its SAF variant at decreasing learning
rates with ``steps * learning_rate`` held fixed (the same total movement budget; default 3e-3,
a fifth of the demo configs' 30 x 5e-4, the small-update regime of the paper), on the demo's
trained target, and reports for every run the forget answer probability before and after INT4
fake quantisation (blocks of 64, absmax scales) and the model utility. The summary per method
is the largest INT4 recovery (forget probability after quantisation minus before) over the sweep.

Usage (after ``make demo``, which leaves models and data in results/demo)::

    python experiments/quant_robustness.py --demo results/demo --out results/quant_robustness
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time


def _variants(configs_dir: str) -> dict[str, dict]:
    """The base methods and their SAF variants (SAF settings of ``saf.json``)."""
    load = lambda name: json.load(open(os.path.join(configs_dir, f"{name}.json")))  # noqa: E731
    saf = {k: v for k, v in load("saf")["unlearn"].items() if k.startswith("saf")}
    out = {}
    for base in ("npo", "grad_diff"):
        cfg = load(base)
        out[base] = cfg
        with_saf = copy.deepcopy(cfg)
        with_saf["unlearn"].update(saf)
        out[f"{base}+saf"] = with_saf
    return out

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _demo_run import load_demo_run  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", default="results/demo", help="a `jaxunlearn demo` results directory")
    p.add_argument("--out", default="results/quant_robustness")
    p.add_argument("--configs", default="experiments/configs")
    p.add_argument("--lrs", type=float, nargs="*", default=[5e-4, 1e-4, 2e-5])
    p.add_argument("--budget", type=float, default=3e-3, help="steps * learning_rate of every run")
    p.add_argument("--methods", nargs="*", default=None, help="subset of npo, npo+saf, grad_diff, grad_diff+saf")
    p.add_argument("--rouge-examples", type=int, default=32)
    args = p.parse_args(argv)

    import jax

    from jaxunlearn.benchmark import summarize
    from jaxunlearn.eval.quant_recovery import quantization_recovery
    from jaxunlearn.eval.runner import evaluate_model
    from jaxunlearn.methods import run_method
    from jaxunlearn.pipeline import write_json_atomic

    t_start = time.perf_counter()
    variants = _variants(args.configs)
    if args.methods:
        unknown = set(args.methods) - set(variants)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {sorted(variants)}")
        variants = {m: variants[m] for m in args.methods}
    run = load_demo_run(args.demo, rouge_examples=args.rouge_examples)
    target, tok, ctx, enc, ev, ref_res, fs = run.target, run.tok, run.ctx, run.enc, run.ev, run.ref_res, run.fs

    rows = []
    for name, base in variants.items():
        for lr in args.lrs:
            cfg = copy.deepcopy(base)
            steps = max(1, round(args.budget / lr))
            cfg["unlearn"].update(learning_rate=lr, steps=steps)
            t0 = time.perf_counter()
            new_params = jax.block_until_ready(run_method(ctx, cfg))
            seconds = time.perf_counter() - t0
            r = evaluate_model(target, tok, enc, params=new_params, reference=ref_res, **ev)
            rec = quantization_recovery(target, tok, enc, forget=fs, holdout="holdout", schemes=("int4",),
                                        params=new_params, reference=ref_res, baseline=r, rouge_examples=0)
            row = summarize(r, rec, seconds)
            row.update(method=name, learning_rate=lr, steps=steps,
                       forget_probability_int4=float(rec["int4"]["metrics"]["probability"]))
            rows.append(row)
            print(f"{name:14s} lr {lr:.0e} steps {steps:4d}: forget_p {row['forget_probability']:.3f} -> int4 "
                  f"{row['forget_probability_int4']:.3f} (rec {row['int4_recovery']:+.3f}), utility "
                  f"{row['model_utility']:.3f}, FQ {row['forget_quality']:.3g}, {seconds:.0f}s", flush=True)

    worst = {m: max(r["int4_recovery"] for r in rows if r["method"] == m) for m in variants}
    target_p = summarize(ref_res, None, None)["forget_probability"]
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "results.json"),
                      {"demo": os.path.abspath(args.demo), "budget_steps_x_lr": args.budget, "rows": rows,
                       "max_int4_recovery": worst, "reference_forget_probability": target_p,
                       "configs": variants, "seconds": time.perf_counter() - t_start})
    print(f"\nlargest INT4 recovery of the forget probability over the sweep (reference forget_p {target_p:.3f}):")
    for m, w in worst.items():
        print(f"  {m:14s} {w:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
