"""Unlearning-step and diagonal-Fisher throughput on 1, 2, 4 and 8 devices (strong scaling).

For each device count ``n`` the demo-sized decoder (vocabulary 1024, hidden 128,
2 layers, 4 heads; random weights) is sharded on the mesh ``fsdp=n`` over the first ``n``
devices (:func:`jaxunlearn.sharding.make_mesh`, parameters by
:func:`jaxunlearn.sharding.partition_rules`, batch rows split over ``fsdp``), and two
jitted computations run on the same global batch:

* ``unlearn``: one step of NPO with the orthogonal projection (``retain_k`` retain
  gradients), AdamW, :meth:`jaxunlearn.UnlearnConfig.build`; throughput counts the forget
  plus retain rows of a step;
* ``fisher``: :func:`jaxunlearn.fisher_diagonal` ``method="vmap"`` (chunked
  ``vmap(grad)``, the per-example work split over the data axis) on one batch.

Each is compiled first (compile seconds reported separately), then run ``--repeats``
times; the best time counts. ``ratio`` is examples/s over the 1-device figure (ideal: n).
As a check that the sharded path computes the same thing, the first step's forget loss and
the Fisher's sum are compared with the 1-device run (relative difference).

Devices: real accelerators when JAX finds them; otherwise ``--xla_force_host_platform_device_count=8``
CPU devices, set in ``XLA_FLAGS`` before JAX is imported (unless already set). Forced CPU
devices are slices of one host sharing its cores (a gain is possible only up to the core count,
where one device left cores idle): on a CPU host the benchmark shows that the sharded path runs
and what its partitioning and collectives cost; real scaling needs real devices.

Usage: ``python experiments/bench_scaling.py [--batch 32] [--seq 64] [--devices 1,2,4,8]``
Results: ``results/bench/scaling.json`` and a printed table.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # only affects the CPU platform: with GPUs/TPUs present JAX still uses those
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from jaxunlearn import sharding as sh  # noqa: E402
from jaxunlearn.fisher import fisher_diagonal  # noqa: E402
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig, count_params  # noqa: E402
from jaxunlearn.unlearn import UnlearnConfig  # noqa: E402
from jaxunlearn.pipeline import write_json_atomic  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import machine_info  # noqa: E402

DEMO = dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2)
FORCED_NOTE = ("forced CPU devices are slices of one host sharing its {cores} cores: more devices add no "
               "compute beyond those cores, so these ratios show that the sharded path runs and what its "
               "partitioning and collectives cost, not the scaling real devices give; real scaling needs real "
               "devices")


def _batch(vocab: int, B: int, T: int, seed: int) -> dict[str, np.ndarray]:
    """Random tokens; the first quarter of each row is the prompt (``loss_mask`` 0)."""
    rng = np.random.default_rng(seed)
    lm = np.ones((B, T), np.float32)
    lm[:, : T // 4] = 0.0
    return {"input_ids": rng.integers(0, vocab, (B, T)).astype(np.int32),
            "attention_mask": np.ones((B, T), np.int32), "loss_mask": lm}


def _best(fn, repeats: int) -> tuple[float, list[float]]:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return min(ts), ts


def bench_devices(n: int, params, apply, forget, retain, *, retain_k: int, chunk: int, repeats: int) -> dict:
    """Time one NPO+projection step and one vmap Fisher batch with everything sharded on ``fsdp=n``."""
    mesh = sh.make_mesh(f"fsdp={n}", devices=jax.devices()[:n])
    p = sh.shard_params(params, mesh)
    fb, rb = sh.shard_batch(forget, mesh), sh.shard_batch(retain, mesh)
    rep = NamedSharding(mesh, P())
    cfg = UnlearnConfig(method="npo", project=True, retain_k=retain_k, learning_rate=1e-5, steps=1)
    u = cfg.build(apply)
    step, state = u.step, u.init(p)
    state = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, rep), state)

    t0 = time.perf_counter()
    state, metrics = step(state, fb, rb, p)  # compiles
    jax.block_until_ready(state)
    compile_unlearn = time.perf_counter() - t0
    first_loss = float(metrics["forget_loss"])
    holder = {"state": state}

    def one_step():
        holder["state"], m = step(holder["state"], fb, rb, p)
        return holder["state"], m

    t_unlearn, ts_unlearn = _best(one_step, repeats)

    def fisher():
        return fisher_diagonal(apply.example_nll, p, [fb], method="vmap", chunk_size=chunk, check_finite=False)

    t0 = time.perf_counter()
    F = jax.block_until_ready(fisher())  # compiles
    compile_fisher = time.perf_counter() - t0
    fisher_sum = float(sum(jnp.sum(x) for x in jax.tree.leaves(F)))
    t_fisher, ts_fisher = _best(fisher, repeats)
    B = forget["input_ids"].shape[0]
    rows = B + retain["input_ids"].shape[0]
    return {
        "devices": n,
        "mesh": dict(mesh.shape),
        "unlearn": {"seconds": t_unlearn, "seconds_all": ts_unlearn, "compile_seconds": compile_unlearn,
                    "examples_per_s": rows / t_unlearn, "first_forget_loss": first_loss},
        "fisher": {"seconds": t_fisher, "seconds_all": ts_fisher, "compile_seconds": compile_fisher,
                   "examples_per_s": B / t_fisher, "sum": fisher_sum},
    }


def _table(rows: list[dict]) -> str:
    head = ("| devices | mesh | unlearn ex/s | ratio | fisher ex/s | ratio | unlearn compile s | fisher compile s "
            "| loss rel.diff | Fisher rel.diff |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        u, f = r["unlearn"], r["fisher"]
        lines.append(f"| {r['devices']} | {','.join(f'{k}={v}' for k, v in r['mesh'].items())} "
                     f"| {u['examples_per_s']:.1f} | {u['ratio']:.2f} | {f['examples_per_s']:.1f} | {f['ratio']:.2f} "
                     f"| {u['compile_seconds']:.1f} | {f['compile_seconds']:.1f} "
                     f"| {u['rel_diff_vs_1']:.1e} | {f['rel_diff_vs_1']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32, help="global forget batch (= retain batch) per step")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--retain-k", type=int, default=4, help="retain gradients spanning the projection subspace")
    p.add_argument("--chunk", type=int, default=8, help="vmap chunk of the Fisher")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--devices", default="1,2,4,8", help="device counts (each must divide --batch)")
    p.add_argument("--out", default="results/bench/scaling.json")
    args = p.parse_args(argv)

    counts = [int(c) for c in args.devices.split(",")]
    available = len(jax.devices())
    skipped = [c for c in counts if c > available]
    counts = [c for c in counts if c <= available]
    if not counts:
        raise SystemExit(f"no device count in {args.devices} fits the {available} devices")
    for c in counts:
        if args.batch % c or args.batch % args.retain_k:
            raise SystemExit(f"--batch {args.batch} must be divisible by {c} devices and --retain-k {args.retain_k}")
    backend = jax.default_backend()
    forced = backend == "cpu"
    cfg = ModelConfig(**DEMO)
    apply, params = DecoderFn.of(Decoder(cfg, rngs=nnx.Rngs(0)))
    forget, retain = _batch(cfg.vocab_size, args.batch, args.seq, 1), _batch(cfg.vocab_size, args.batch, args.seq, 2)

    rows = []
    for n in counts:
        t0 = time.perf_counter()
        r = bench_devices(n, params, apply, forget, retain, retain_k=args.retain_k, chunk=args.chunk,
                          repeats=args.repeats)
        rows.append(r)
        print(f"{n} device(s): unlearn step {r['unlearn']['seconds'] * 1e3:.0f} ms, Fisher batch "
              f"{r['fisher']['seconds'] * 1e3:.0f} ms (wall {time.perf_counter() - t0:.0f}s incl. compiles)",
              flush=True)
    base = rows[0]
    for r in rows:
        for key, ref in (("unlearn", base["unlearn"]), ("fisher", base["fisher"])):
            r[key]["ratio"] = r[key]["examples_per_s"] / ref["examples_per_s"]
        r["unlearn"]["rel_diff_vs_1"] = abs(r["unlearn"]["first_forget_loss"] - base["unlearn"]["first_forget_loss"]) \
            / max(abs(base["unlearn"]["first_forget_loss"]), 1e-30)
        r["fisher"]["rel_diff_vs_1"] = abs(r["fisher"]["sum"] - base["fisher"]["sum"]) / max(abs(base["fisher"]["sum"]),
                                                                                               1e-30)
    note = FORCED_NOTE.format(cores=os.cpu_count()) if forced else f"{available} {backend} devices"
    res = {
        "machine": machine_info(num_devices=available, forced_cpu_devices=forced),
        "note": note,
        "model": {**DEMO, "params": count_params(params)},
        "batch": args.batch, "seq": args.seq, "retain_k": args.retain_k, "fisher_chunk": args.chunk,
        "repeats": args.repeats,
        "throughput": "unlearn: (forget + retain rows) / best step time; fisher: rows / best batch time",
        "results": rows,
        "skipped_device_counts": skipped,
    }
    out = Path(args.out)
    write_json_atomic(out, res)
    print(f"\nScaling on {backend} ({res['machine']['device']}), demo decoder ({res['model']['params']:,} params), "
          f"batch {args.batch} x seq {args.seq}, NPO + projection (k={args.retain_k}) and vmap Fisher; best of "
          f"{args.repeats}; ratio = examples/s over 1 device.\n")
    print(_table(rows))
    if skipped:
        print(f"\nskipped {skipped}: only {available} devices")
    print(f"\nNOTE: {note}.")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
