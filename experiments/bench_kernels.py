"""Throughput of the kernels in jaxunlearn.kernels, with same-run baselines.

Dense-layer Fisher ``F = sum_b (a_b^T g_b)**2``:
  * ``xla``      : the XLA scan over examples (``impl="xla"``, the CPU default),
  * ``vmap``     : ``jax.vmap`` of the per-example outer product, squared and summed
                   (materialises ``(B, d_in, d_out)``),
  * ``einsum``   : the batched-einsum reference (``impl="reference"``),
  * ``pallas``   : the Pallas kernel, compiled, only where a TPU/GPU is present,
  * ``matmul``   : on TPU/GPU, an XLA matmul with the same FLOPs (``(d_in, BT) @ (BT, d_out)``),
                   to report the kernel's fraction of it.
Projection of a pytree update on ``k`` retain vectors (``jaxunlearn.projection.project_tree``, the
core on the kernels of ``jaxunlearn.kernels.projection``), for each ``k`` of ``--k``:
  * ``fused``    : ``project_tree`` (one Gram+dots pass per leaf, one subtract pass),
  * ``naive``    : separate passes, as a plain pytree implementation would do them:
                   ``k(k+1)/2`` tree dots for the Gram, ``k`` for the dots, ``k`` axpys,
  * ``ravel``    : ravel the trees to ``(k, P)`` / ``(P,)`` (a global copy), then matmuls,
  * ``gram_and_dots`` / ``subtract``: the two passes of ``fused`` timed alone (the array kernels
                   ``gram_and_dots`` / ``subtract`` on every leaf, as the core calls them).
Each is reported as a multiple of its floor on this machine (:func:`projection_floors`): the
time of reading its inputs once at the measured read bandwidth (``jnp.sum``), and for the
Gram pass also its FLOPs at the measured matmul rate (at large ``k`` a CPU runs out of FLOPs
before bandwidth). The copy bandwidth (``x * 1.0001``) is reported beside them.
Ratios come from the same run. Results go to JSON and a table.

Usage: ``python experiments/bench_kernels.py [--batch 16 --seq 32 --d-in 256 ...]``
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

from jaxunlearn import tree as jt
from jaxunlearn.kernels import fisher as kf
from jaxunlearn.kernels import projection as kp
from jaxunlearn.pipeline import write_json_atomic
from jaxunlearn.projection import project_tree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import machine_info  # noqa: E402


def _times(fn, *args, repeats: int) -> tuple[float, float]:
    """(best, median) wall seconds of ``fn(*args)`` after one warm-up (compile) call.

    The best of N is the figure used for ratios (as ``timeit`` advises: on a shared
    machine the slower runs measure the other processes); the median is kept too.
    """
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.min(ts)), float(np.median(ts))


def _failed(name: str, err: Exception) -> dict:
    """The row of a path that a compiler or the device refused: the error, and the run goes on."""
    msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    print(f"  {name}: FAILED {msg}", flush=True)
    return {"error": msg}


def _time(fn, *args, repeats: int) -> float:
    return _times(fn, *args, repeats=repeats)[0]


def copy_bandwidth(n_bytes: int, repeats: int) -> float:
    """Bytes/s of an elementwise pass (read n + write n bytes) on a float32 array.

    On XLA:CPU this includes allocating (page-faulting) a fresh output buffer per call.
    """
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x * 1.0001)
    return 2 * n_bytes / _time(f, x, repeats=repeats)


def read_bandwidth(n_bytes: int, repeats: int) -> float:
    """Bytes/s of a read-only pass (``jnp.sum``) over a float32 array of ``n_bytes``."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    return n_bytes / _time(jax.jit(jnp.sum), x, repeats=repeats)


def bench_fisher(args, accel: bool) -> dict:
    dtype = jnp.dtype(args.dtype)
    B, T, di, do = args.batch, args.seq, args.d_in, args.d_out
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((B, T, di)), jnp.float32).astype(dtype)
    g = jnp.asarray(rng.standard_normal((B, T, do)), jnp.float32).astype(dtype)
    flops = 2 * B * T * di * do
    in_bytes = (a.size + g.size) * dtype.itemsize

    def vmap_outer(a, g):
        s = jax.vmap(lambda x, y: jnp.matmul(x.T, y, preferred_element_type=jnp.float32))(a, g)
        return jnp.sum(s * s, axis=0)

    fns = {
        "xla": jax.jit(lambda a, g: kf.dense_fisher(a, g, impl="xla")),
        "vmap": jax.jit(vmap_outer),
        "einsum": jax.jit(lambda a, g: kf.dense_fisher(a, g, impl="reference")),
    }
    if accel:
        fns["pallas"] = jax.jit(lambda a, g: kf.dense_fisher(a, g, impl="pallas"))
        a2 = a.reshape(B * T, di).T
        g2 = g.reshape(B * T, do)
        fns["matmul"] = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    ref = np.asarray(fns["einsum"](a, g))
    rows = {}
    for name, f in fns.items():
        args_ = (a2, g2) if name == "matmul" else (a, g)
        try:
            t, t_med = _times(f, *args_, repeats=args.repeats)
        except Exception as e:  # a kernel the compiler refuses on this device: record it, go on
            rows[name] = _failed(name, e)
            continue
        row = {
            "seconds": t,
            "seconds_median": t_med,
            "gflops": flops / t / 1e9,
            "input_bytes_per_s": in_bytes / t,
        }
        if name != "matmul":
            out = np.asarray(f(*args_))
            row["max_rel_err_vs_einsum"] = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
        rows[name] = row
    for name in rows:
        if "seconds" in rows[name]:
            rows[name]["speedup_vs_vmap"] = rows["vmap"]["seconds"] / rows[name]["seconds"]
    if "seconds" in rows.get("pallas", {}):
        rows["pallas"]["fraction_of_matmul"] = rows["matmul"]["seconds"] / rows["pallas"]["seconds"]
    shape = {"B": B, "T": T, "d_in": di, "d_out": do, "dtype": str(dtype)}
    return {"shape": shape, "flops": flops, "paths": rows}


def _split_sizes(P: int) -> list[int]:
    """A model-like pytree: two big matrices, a smaller one, a vector and a scale."""
    big = int(P * 0.45)
    mid = int(P * 0.08)
    vec = max(1, int(P * 0.019))
    return [big, big, mid, vec, P - 2 * big - mid - vec]


def matmul_flops(repeats: int, n: int = 1024) -> float:
    """FLOP/s XLA reaches on a float32 ``n x n`` matmul: the compute yardstick of the Gram pass."""
    x = jnp.asarray(np.random.default_rng(2).standard_normal((n, n)), jnp.float32)
    return 2 * n**3 / _time(jax.jit(jnp.matmul), x, x, repeats=repeats)


def projection_floors(k: int, P: int, itemsize: int, read_bw: float, flops: float) -> dict:
    """Lower bounds (seconds) for each pass on this machine, from the same run's probes.

    The issue's memory-bound limit is the time of reading a pass's inputs once,
    ``read_once = (k+1) P b / read_bw`` (``R`` and ``g``; ``b`` bytes per element).

    * ``gram_and_dots`` also does at least ``k(k+1) P`` multiply-adds (the symmetric Gram
      plus the dots), so its floor is ``max(read_once, 2 k(k+1) P / matmul FLOP/s)``: at
      large ``k`` a CPU runs out of FLOPs before bandwidth.
    * ``subtract`` (``g - R^T c``, ``2 k P`` FLOPs): ``read_once``.
    * ``project``: the two passes (the coefficients need all of ``R g`` before the subtract),
      so twice the inputs' read; the whole projection cannot reach one read unless ``R`` fits
      in cache.
    """
    read_once = (k + 1) * P * itemsize / read_bw
    gram = max(read_once, 2 * k * (k + 1) * P / flops)
    return {"read_once": read_once, "gram_and_dots": gram, "subtract": read_once, "project": gram + read_once}


def bench_projection(args, accel: bool, read_bw: float, flops: float, k: int) -> dict:
    """Each pass of ``project_tree`` and the whole projection at ``k`` retain vectors, vs floors."""
    dtype = jnp.dtype(args.dtype)
    P = args.p
    rng = np.random.default_rng(1)
    sizes = _split_sizes(P)

    def draw(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    g = {f"leaf{i}": draw(n) for i, n in enumerate(sizes)}
    r = {f"leaf{i}": draw(k, n) for i, n in enumerate(sizes)}
    c = jnp.asarray(rng.standard_normal(k), jnp.float32)

    def naive(g, r):
        rows = [jax.tree.map(lambda x, i=i: x[i], r) for i in range(k)]
        G = jnp.stack([jnp.stack([jt.dot(rows[i], rows[j]) for j in range(k)]) for i in range(k)])
        d = jnp.stack([jt.dot(rows[i], g) for i in range(k)])
        c = kp.pinv_solve(G, d)
        out = g
        for i in range(k):
            out = jax.tree.map(
                lambda o, x, i=i: (o.astype(jnp.float32) - c[i] * x.astype(jnp.float32)).astype(o.dtype),
                out,
                rows[i],
            )
        return out

    def ravel(g, r):
        gv = jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(g)]).astype(jnp.float32)
        R = jnp.concatenate([x.reshape(k, -1) for x in jax.tree.leaves(r)], axis=1).astype(jnp.float32)
        c = kp.pinv_solve(R @ R.T, R @ gv)
        out = gv - c @ R
        return jt.unravel_like(out.astype(dtype), g)

    fns = {
        "fused": jax.jit(lambda g, r: project_tree(g, r, impl="auto")),
        "naive": jax.jit(naive),
        "ravel": jax.jit(ravel),
    }
    triton_ok = k >= 16 and k & (k - 1) == 0  # the GPU kernels need a power-of-two k >= 16
    if jax.default_backend() == "tpu" or (accel and triton_ok):
        fns["fused_pallas"] = jax.jit(lambda g, r: project_tree(g, r, impl="pallas"))
    floors = projection_floors(k, P, dtype.itemsize, read_bw, flops)
    ref = np.concatenate([np.asarray(x, np.float32).reshape(-1) for x in jax.tree.leaves(fns["ravel"](g, r))])
    rows = {}
    for name, f in fns.items():
        try:
            t, t_med = _times(f, g, r, repeats=args.repeats)
        except Exception as e:  # a kernel the compiler refuses on this device: record it, go on
            rows[name] = _failed(f"k={k} {name}", e)
            continue
        out = np.concatenate([np.asarray(x, np.float32).reshape(-1) for x in jax.tree.leaves(f(g, r))])
        rows[name] = {
            "seconds": t,
            "seconds_median": t_med,
            "over_floor": t / floors["project"],
            "over_read_once": t / floors["read_once"],
            "max_rel_err_vs_ravel": float(np.max(np.abs(out - ref)) / np.max(np.abs(ref))),
        }
    for name in rows:
        if "seconds" in rows[name]:
            rows[name]["speedup_vs_naive"] = rows["naive"]["seconds"] / rows[name]["seconds"]
    # the two passes as the core runs them: a leaf seen as (k, P_l); one shorter than k by XLA
    def gram_and_dots_pass(g, r):
        parts = [kp.gram_and_dots(y.reshape(k, -1), x.reshape(-1), impl="auto") if x.size >= k
                 else kp.gram_and_dots_xla(y.reshape(k, -1), x.reshape(-1))
                 for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(r))]
        return sum(G for G, _ in parts), sum(d for _, d in parts)

    def subtract_pass(g, r, c):
        def leaf(x, y):
            R = y.reshape(k, -1)
            out = kp.subtract(x.reshape(-1), R, c, impl="auto") if x.size >= k else kp.subtract_xla(x.reshape(-1), R, c)
            return out.reshape(x.shape)

        return jax.tree.map(leaf, g, r)

    passes = {
        "gram_and_dots": (jax.jit(gram_and_dots_pass), (g, r)),
        "subtract": (jax.jit(subtract_pass), (g, r, c)),
    }
    for name, (f, a) in passes.items():
        try:
            t, t_med = _times(f, *a, repeats=args.repeats)
        except Exception as e:
            rows[name] = _failed(f"k={k} {name}", e)
            continue
        rows[name] = {"seconds": t, "seconds_median": t_med, "over_floor": t / floors[name],
                      "over_read_once": t / floors["read_once"]}
    shape = {"k": k, "P": P, "leaves": sizes, "dtype": str(dtype)}
    return {"shape": shape, "floors_seconds": floors, "paths": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-out", type=int, default=256)
    p.add_argument("--k", default="1,4,8,16", help="comma-separated numbers of retain vectors")
    p.add_argument("--p", type=int, default=1_000_000, help="parameters in the projected pytree")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--copy-mb", type=int, default=64, help="array size for the copy-bandwidth probe")
    p.add_argument("--out", default="results/bench/kernels.json")
    args = p.parse_args(argv)

    backend = jax.default_backend()
    accel = backend in ("tpu", "gpu", "cuda", "rocm")
    bw = copy_bandwidth(args.copy_mb * 2**20, args.repeats)
    rbw = read_bandwidth(args.copy_mb * 2**20, args.repeats)
    mm = matmul_flops(args.repeats)
    ks = [int(x) for x in str(args.k).split(",")]
    res = {
        "machine": machine_info(),
        "copy_bandwidth_bytes_per_s": bw,
        "read_bandwidth_bytes_per_s": rbw,
        "matmul_flops_per_s": mm,
        "fisher": bench_fisher(args, accel),
        "projection": [bench_projection(args, accel, rbw, mm, k) for k in ks],
    }
    out = Path(args.out)
    write_json_atomic(out, res)

    m = res["machine"]
    print(f"backend {m['backend']} ({m['device']}), jax {m['jax']}; copy (x*1.0001) {bw / 1e9:.2f} GB/s, "
          f"read (sum) {rbw / 1e9:.2f} GB/s")
    f = res["fisher"]
    print(f"\ndense_fisher {f['shape']}  ({f['flops'] / 1e9:.3f} GFLOP)")
    print("(ms: best of N / median; rates and ratios from the best)")
    print(f"{'path':<10}{'ms':>16}{'GFLOP/s':>10}{'x vmap':>9}{'rel err':>10}")
    for name, r in f["paths"].items():
        if "error" in r:
            print(f"{name:<10} FAILED {r['error'][:100]}")
            continue
        ms = f"{r['seconds'] * 1e3:.2f}/{r['seconds_median'] * 1e3:.2f}"
        print(f"{name:<10}{ms:>16}{r['gflops']:>10.2f}{r['speedup_vs_vmap']:>9.2f}"
              f"{r.get('max_rel_err_vs_einsum', float('nan')):>10.1e}")
    print(f"\nproject_tree over {args.p} parameters ({args.dtype}, 5 leaves); matmul {mm / 1e9:.1f} GFLOP/s. "
          "x floor: time / the pass's lower bound; x read: time / reading R and g once (projection_floors)")
    print(f"{'k':>3} {'path':<14}{'ms':>16}{'x floor':>9}{'x read':>8}{'x naive':>9}{'rel err':>10}")
    for pr in res["projection"]:
        for name, r in pr["paths"].items():
            if "error" in r:
                print(f"{pr['shape']['k']:>3} {name:<14} FAILED {r['error'][:100]}")
                continue
            ms = f"{r['seconds'] * 1e3:.2f}/{r['seconds_median'] * 1e3:.2f}"
            print(f"{pr['shape']['k']:>3} {name:<14}{ms:>16}{r['over_floor']:>9.2f}{r['over_read_once']:>8.2f}"
                  f"{r.get('speedup_vs_naive', float('nan')):>9.2f}{r.get('max_rel_err_vs_ravel', float('nan')):>10.1e}")
    print(f"\nwrote {out}")
    return res


if __name__ == "__main__":
    main()
