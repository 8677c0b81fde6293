"""Sweep the Fisher-penalty strength of `npo_lwf` and the l1 weight of `npo_l1` on the demo's target.

    python experiments/lwf_l1_sweep.py --demo results/demo

Loads the target saved by `make demo`, regenerates the benchmark (deterministic in the seed), runs
`experiments/configs/npo_lwf.json` with strength 0 (plain NPO), 3, 10, 30, 100 and `npo.json` with l1 1e-4,
1e-3, 1e-2 (`jaxunlearn.methods.run_method`, seed 0), and prints the forget / retain / general mean answer
probability (and for l1 the share of exactly-zero weights, `jaxunlearn.sparsity.sparsity`). The numbers the
README quotes for these two configs come from this script.
"""

import argparse
import json
import os
import time

import numpy as np

from jaxunlearn.eval.runner import evaluate_encoded
from jaxunlearn.methods import UnlearnContext, run_method
from jaxunlearn.models import DecoderFn, from_pretrained
from jaxunlearn.pipeline import DemoConfig, prepare_data, unlearning_sets
from jaxunlearn.sparsity import sparsity

CONFIGS = os.path.join(os.path.dirname(__file__), "configs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default="results/demo", help="a `make demo` output directory (its models/target)")
    args = ap.parse_args()
    data = prepare_data(DemoConfig())
    fn, params = DecoderFn.of(from_pretrained(os.path.join(args.demo, "models", "target"))[0])
    forget, retain = unlearning_sets(data)
    ctx = UnlearnContext(fn, params, forget, retain, seed=0)

    def probs(p):
        return {s: round(float(np.mean(evaluate_encoded(fn, p, data.encoded[s])["probability"])), 3)
                for s in (data.forget_split, data.retain_split, "general")}

    lwf = json.load(open(os.path.join(CONFIGS, "npo_lwf.json")))
    for strength in (0.0, 3.0, 10.0, 30.0, 100.0):
        cfg = ({**lwf, "continual": {**lwf["continual"], "strength": strength}} if strength
               else {k: v for k, v in lwf.items() if k != "continual"})
        t = time.perf_counter()
        print(f"npo_lwf strength {strength:g}: {probs(run_method(ctx, cfg))} ({time.perf_counter() - t:.1f} s)",
              flush=True)
    npo = json.load(open(os.path.join(CONFIGS, "npo.json")))
    for l1 in (1e-4, 1e-3, 1e-2):
        p = run_method(ctx, {**npo, "unlearn": {**npo["unlearn"], "l1": l1}})
        print(f"npo l1 {l1:g}: {probs(p)}, sparsity {float(sparsity(p)):.4f}", flush=True)


if __name__ == "__main__":
    main()
