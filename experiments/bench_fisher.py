"""Fused diagonal Fisher vs chunked vmap(grad) Fisher on decoders, with one ordinary gradient as the yardstick.

For each model and (batch, sequence) size, three jit-compiled functions of the same batch:

* ``fused``: the per-batch step of the Fisher that PerTA-fisher (and SSD) run: the
  :func:`jaxunlearn.reduction.accumulate` step with the local sums
  ``fisher_local_sums(importance_loss(ctx), **ctx.fisher_kwargs)`` of an
  :class:`~jaxunlearn.methods.UnlearnContext` built on the model's
  :class:`~jaxunlearn.models.DecoderFn`, i.e. what ``methods.importances`` hands
  ``fisher_diagonal`` (``method="auto"``): the fused path (one forward and backward pass,
  dense layers by ``jaxunlearn.kernels.fisher.dense_fisher``; checked, not assumed),
* ``vmap``:  the same step with ``method="vmap"``'s local sums (``vmap(grad)`` over chunks of
  ``--chunk`` examples, squared and summed by a ``lax.scan``),
* ``grad``:  one ordinary gradient of the batch loss ``sum_n l_n`` (no per-example work).

Each is compiled ahead of time (compile seconds reported separately), then run
``--repeats`` times; the best time is used (on a shared machine slower runs measure
other processes). Peak memory is XLA's own figure for the compiled program,
``compiled.memory_analysis().temp_size_in_bytes`` (scratch buffers beyond the
arguments and outputs), so all three are measured the same way in one run; ratios
(``vmap / fused`` time, ``fused / grad`` memory) come from that single run.

Models (random weights): ``demo`` (the demo's decoder: vocab 1024, hidden 128,
2 layers) and ``llama100m`` (Llama-shaped: hidden 768, 12 layers, 12 heads,
intermediate 2048, vocab 8192, untied: ~98M parameters).

Usage::

    python experiments/bench_fisher.py            # CPU-sized grid (about 2-3 minutes on 2 cores)
    python experiments/bench_fisher.py --full     # batch 8/32/128 x seq 128/512 for both models

Results: ``results/bench/fisher.json`` and a Markdown table ``results/bench/fisher.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn import fisher as fi
from jaxunlearn import reduction as rd
from jaxunlearn.fisher_fused import FusedFisherSums
from jaxunlearn.methods import UnlearnContext, importance_loss
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig, count_params
from jaxunlearn.pipeline import write_json_atomic

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import machine_info  # noqa: E402

MODELS = {
    "demo": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                 num_kv_heads=2),
    "llama100m": dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                      num_kv_heads=12),
}
# (model, batch, seq) run by default on CPU, and with --full; the rest of the 8/32/128 x 128/512
# grid is listed as skipped with the reason.
SMALL = [("demo", 8, 128), ("demo", 32, 128), ("demo", 128, 128), ("demo", 8, 512), ("llama100m", 8, 128),
         ("llama100m", 32, 128)]
FULL = [(m, b, t) for m in MODELS for b in (8, 32, 128) for t in (128, 512)]
SKIP_REASON = "skipped by default on CPU (time budget); run with --full"


def _model(name: str, dtype: str):
    cfg = ModelConfig(**MODELS[name], dtype=dtype, param_dtype=dtype)
    return DecoderFn.of(Decoder(cfg, rngs=nnx.Rngs(0)))


def _batch(vocab: int, B: int, T: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens; the first quarter of each sequence is the prompt (loss_mask 0)."""
    rng = np.random.default_rng(seed)
    lm = np.ones((B, T), np.float32)
    lm[:, : T // 4] = 0.0
    return {
        "input_ids": rng.integers(0, vocab, (B, T)).astype(np.int32),
        "attention_mask": np.ones((B, T), np.int32),
        "loss_mask": lm,
    }


def _grad_step(fn):
    @jax.jit
    def step(params, batch):
        return jax.grad(lambda p: jnp.sum(fn.answer_nll(p, batch)))(params)

    return step


def perta_fisher_local_sums(fn, params, chunk: int):
    """``(fused, vmap)`` local sums: the first is what PerTA-fisher's ``importances`` runs for this model."""
    ctx = UnlearnContext(fn, params, forget={}, retain={})
    loss = importance_loss(ctx)
    fused = fi.fisher_local_sums(loss, **ctx.fisher_kwargs)
    if not isinstance(fused, FusedFisherSums):
        raise SystemExit(f"PerTA-fisher's Fisher is not the fused one here ({type(fused).__name__})")
    return fused, fi.fisher_local_sums(loss, method="vmap", chunk_size=chunk)


def _measure(lowered, args, repeats: int) -> dict:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        ts.append(time.perf_counter() - t0)
    return {
        "seconds": float(min(ts)),
        "seconds_all": [float(t) for t in ts],
        "compile_seconds": compile_s,
        "temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else None,
        "argument_bytes": int(mem.argument_size_in_bytes) if mem is not None else None,
        "output_bytes": int(mem.output_size_in_bytes) if mem is not None else None,
    }


def bench_one(name: str, B: int, T: int, *, chunk: int, repeats: int, dtype: str, cache: dict) -> dict:
    if name not in cache:
        cache.clear()  # one model alive at a time
        cache[name] = _model(name, dtype)
    fn, params = cache[name]
    batch = _batch(MODELS[name]["vocab_size"], B, T)
    weight = np.ones((B,), np.float32)
    acc, total = rd.zeros(params)
    args = (acc, total, params, batch, weight, None)
    fused, vmap = perta_fisher_local_sums(fn, params, chunk)
    rows = {}
    rows["fused"] = _measure(rd.accumulate.lower(*args, local_sums=fused), args, repeats)
    rows["vmap"] = _measure(rd.accumulate.lower(*args, local_sums=vmap), args, repeats)
    rows["grad"] = _measure(_grad_step(fn).lower(params, batch), (params, batch), repeats)
    for r in rows.values():
        r["ms_per_example"] = 1e3 * r["seconds"] / B
    g = rows["grad"]["temp_bytes"] or 1
    return {
        "model": name,
        "params": count_params(params),
        "batch": B,
        "seq": T,
        "vmap_chunk": chunk,
        "perta_fisher_path": type(fused).__name__,
        "paths": rows,
        "speedup_fused_vs_vmap": rows["vmap"]["seconds"] / rows["fused"]["seconds"],
        "time_fused_over_grad": rows["fused"]["seconds"] / rows["grad"]["seconds"],
        "temp_fused_over_grad": (rows["fused"]["temp_bytes"] or 0) / g,
        "temp_vmap_over_grad": (rows["vmap"]["temp_bytes"] or 0) / g,
    }


def _table(results: list[dict]) -> str:
    head = ("| model | params | B | T | fused (PerTA-fisher) ms/ex | vmap ms/ex | grad ms/ex | vmap/fused | fused/grad time "
            "| fused temp MB | vmap temp MB | grad temp MB | fused/grad mem |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        p = r["paths"]
        mb = {k: (v["temp_bytes"] or 0) / 1e6 for k, v in p.items()}
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['seq']} "
            f"| {p['fused']['ms_per_example']:.2f} | {p['vmap']['ms_per_example']:.2f} "
            f"| {p['grad']['ms_per_example']:.2f} | {r['speedup_fused_vs_vmap']:.1f}x "
            f"| {r['time_fused_over_grad']:.2f} | {mb['fused']:.0f} | {mb['vmap']:.0f} | {mb['grad']:.0f} "
            f"| {r['temp_fused_over_grad']:.2f} |"
        )
    return "\n".join(lines)


def _parse_case(text: str) -> tuple[str, int, int]:
    try:
        name, b, t = text.split(":")
        case = (name, int(b), int(t))
    except ValueError:
        raise SystemExit(f"--cases entries are model:batch:seq, got {text!r}") from None
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r} in --cases; choose from {sorted(MODELS)}")
    return case


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the whole 8/32/128 x 128/512 grid for both models")
    p.add_argument("--only", default=None, help="comma-separated model names to run (default: all)")
    p.add_argument("--cases", default=None,
                   help="comma-separated model:batch:seq cases to run instead of the grid, e.g. llama100m:32:128")
    p.add_argument("--chunk", type=int, default=8, help="vmap chunk size (fisher_diagonal's default)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default="results/bench/fisher.json")
    args = p.parse_args(argv)

    grid = FULL if args.full else SMALL
    if args.cases:
        grid = [_parse_case(c) for c in args.cases.split(",")]
    keep = set(MODELS)
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - set(MODELS)
        if unknown:
            raise SystemExit(f"unknown model(s) {sorted(unknown)}; choose from {sorted(MODELS)}")
        grid = [g for g in grid if g[0] in keep]
    skipped = [
        {"model": m, "batch": b, "seq": t,
         "reason": "not selected (--cases)" if args.cases else SKIP_REASON if m in keep else "model not selected (--only)"}
        for (m, b, t) in FULL
        if (m, b, t) not in grid
    ]

    results, cache = [], {}
    for name, B, T in grid:
        t0 = time.perf_counter()
        repeats = 1 if name == "llama100m" else args.repeats
        r = bench_one(name, B, T, chunk=args.chunk, repeats=repeats, dtype=args.dtype, cache=cache)
        results.append(r)
        print(f"{name} B={B} T={T}: fused {r['paths']['fused']['seconds']:.3f}s, vmap "
              f"{r['paths']['vmap']['seconds']:.3f}s, grad {r['paths']['grad']['seconds']:.3f}s "
              f"(case wall {time.perf_counter() - t0:.0f}s incl. compiles)", flush=True)

    res = {
        "machine": machine_info(),
        "dtype": args.dtype,
        "memory_measure": "compiled.memory_analysis().temp_size_in_bytes",
        "fused_is": "the Fisher step PerTA-fisher and SSD run: fisher_local_sums(methods.importance_loss(ctx)) "
                    "for ctx.apply_fn = DecoderFn.of(model)[0] (fisher_diagonal method='auto')",
        "results": results,
        "skipped": skipped,
    }
    out = Path(args.out)
    write_json_atomic(out, res)
    table = _table(results)
    m = res["machine"]
    header = (f"Fused vs chunked-vmap diagonal Fisher ({args.dtype}, vmap chunk {args.chunk}); fused = the "
              "Fisher step PerTA-fisher / SSD run (methods.importance_loss -> fisher_diagonal, method='auto'); backend "
              f"{m['backend']} ({m['device']}, {m['cpu_count']} CPUs), jax {m['jax']}. Best of "
              f"{args.repeats} runs (1 for llama100m); memory = XLA temp bytes of the compiled step.")
    skipped_txt = "\n".join(f"- {s['model']} B={s['batch']} T={s['seq']}: {s['reason']}" for s in skipped)
    md = header + "\n\n" + table + ("\n\nSkipped:\n" + skipped_txt if skipped else "") + "\n"
    out.with_suffix(".md").write_text(md)
    print("\n" + md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return res


if __name__ == "__main__":
    main()
