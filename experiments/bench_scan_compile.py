"""Compile time and program size of a decoder's gradient: unrolled blocks vs ``scan_layers=True``.

For each depth ``L`` (default 2, 8, 32) and both layouts, a tiny decoder (vocabulary 64, hidden 32,
MLP 64, 4 heads / 2 KV heads; random weights) is built and the gradient of its mean answer-token
NLL (:meth:`jaxunlearn.models.DecoderFn.answer_loss`) on a ``B x T`` batch is jitted; reported:

* ``lower_s``: tracing + lowering to StableHLO (``jax.jit(...).lower``);
* ``compile_s``: XLA compilation of that module (``.compile()``);
* ``hlo_chars``: size of the lowered StableHLO text, ``compiled_chars``: of the optimised HLO;
* ``run_ms``: one call after compilation (best of ``--repeats``), a sanity check that the two
  layouts run at a similar speed.

With unrolled blocks the program holds ``L`` copies of the block (its size and compile time
grow linearly with ``L``); scanned, one (a ``while`` loop over the stacked parameters), so the
figures stay flat. The two gradients are also compared (max relative difference).

Usage: ``python experiments/bench_scan_compile.py [--layers 2,8,32] [--batch 4] [--seq 32]``
Results: ``results/bench/scan_compile.json`` and a printed table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn.models import Decoder, DecoderFn, ModelConfig
from jaxunlearn.models.scan import stack_layer_params

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import machine_info  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)


def measure(layers: int, scan: bool, batch: dict, repeats: int) -> tuple[dict, dict]:
    """Timings and sizes for one depth and layout; also the gradient (as an unrolled pure dict)."""
    cfg = ModelConfig(num_layers=layers, scan_layers=scan, **TINY)
    fn, params = DecoderFn.of(Decoder(cfg, rngs=nnx.Rngs(0)))
    f = jax.jit(jax.grad(lambda p, b: fn.answer_loss(p, b)))
    t0 = time.perf_counter()
    lowered = f.lower(params, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    grads = jax.block_until_ready(compiled(params, batch))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(params, batch))
        best = min(best, time.perf_counter() - t)
    row = {"layers": layers, "layout": "scan" if scan else "unrolled", "lower_s": round(t1 - t0, 3),
           "compile_s": round(t2 - t1, 3), "hlo_chars": len(lowered.as_text()),
           "compiled_chars": len(compiled.as_text()), "run_ms": round(best * 1e3, 2)}
    return row, nnx.to_pure_dict(grads)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,8,32", help="comma-separated depths")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/bench/scan_compile.json")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    shape = (args.batch, args.seq)
    batch = {"input_ids": jnp.asarray(rng.integers(0, TINY["vocab_size"], shape), jnp.int32),
             "attention_mask": jnp.ones(shape, jnp.int32), "loss_mask": jnp.ones(shape, jnp.float32)}
    rows = []
    print(f"{'L':>3} {'layout':>9} {'lower s':>8} {'compile s':>10} {'HLO chars':>10} {'opt HLO':>9} {'run ms':>8}")
    for layers in (int(x) for x in args.layers.split(",")):
        row_u, g_u = measure(layers, False, batch, args.repeats)
        row_s, g_s = measure(layers, True, batch, args.repeats)
        diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30)),
                             stack_layer_params(g_u), g_s)
        row_s["max_rel_diff_vs_unrolled"] = max(jax.tree.leaves(diffs))
        for r in (row_u, row_s):
            rows.append(r)
            print(f"{r['layers']:>3} {r['layout']:>9} {r['lower_s']:>8.2f} {r['compile_s']:>10.2f} "
                  f"{r['hlo_chars']:>10} {r['compiled_chars']:>9} {r['run_ms']:>8.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(batch=args.batch, seq=args.seq, **TINY), "rows": rows},
                              indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
