"""Compile every Pallas kernel and the library steps on them for unattached TPU topologies.

Run by ``tests/kernels/test_tpu_compile.py`` in a subprocess whose ``PYTHONPATH`` holds libtpu
(installed by ``make`` into ``.venv/libtpu``, outside the environment ordinary runs use, so a
CPU run never starts looking for a TPU) and with ``JAX_PLATFORMS=cpu``:
``jax.experimental.topologies.get_topology_desc`` gives the devices of a TPU slice that is not
attached, and ``jax.jit(f).lower(ShapeDtypeStructs on those devices).compile()`` runs the real
XLA:TPU compiler, Mosaic included. On an 8-chip slice the sharded steps compile too: kernels
where they run per shard, their XLA path where XLA partitions the program. One JSON object per case goes to the file named by argv[1]:
``{"case", "topology", "dtype", "ok", "mosaic_calls", "temp_bytes", "error"}``.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding

from jaxunlearn import fisher as fi
from jaxunlearn import reduction as rd
from jaxunlearn.kernels import fisher as kf
from jaxunlearn.kernels import projection as kp
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig, dense_shapes
from jaxunlearn.projection import project_tree
from jaxunlearn.unlearn import UnlearnConfig

TOPOLOGIES = ("v5e:2x2", "v5p:2x2x1")
DTYPES = ("float32", "bfloat16")


def _cases(dtype):
    """(name, fn, [(shape, dtype), ...], expected Mosaic calls) for one dtype."""
    dt = jnp.dtype(dtype)
    f32 = jnp.dtype(jnp.float32)
    yield ("dense_fisher aligned", lambda a, g: kf.dense_fisher(a, g), [((8, 128, 256), dt), ((8, 128, 512), dt)], 1)
    yield ("dense_fisher odd", lambda a, g: kf.dense_fisher(a, g), [((3, 37, 100), dt), ((3, 37, 130), dt)], 1)
    yield ("dense_fisher masked", lambda a, g, m: kf.dense_fisher(a, g, m),
           [((4, 64, 128), dt), ((4, 64, 256), dt), ((4, 64), f32)], 1)
    for k in (1, 4, 16):
        for P in (3 * 8192, 20001):
            yield (f"gram_and_dots k={k} P={P}", lambda R, g: kp.gram_and_dots(R, g), [((k, P), dt), ((P,), dt)], 1)
            yield (f"subtract k={k} P={P}", lambda g, R, c: kp.subtract(g, R, c), [((P,), dt), ((k, P), dt), ((k,), f32)], 1)


CFG = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, num_layers=2)


# large enough that each chip's shard of an MLP kernel (256 x 1024 / 8) spans full kernel blocks
# (8192 elements on TPU; a shorter leaf is projected by the XLA tail alone)
CFG_SHARDED = ModelConfig(vocab_size=64, hidden_size=256, intermediate_size=1024, num_heads=4, num_kv_heads=2,
                          num_layers=1)


def _decoder(cfg=CFG):
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return DecoderFn(graphdef), params


def _library_cases(dtype):
    """The fused-Fisher accumulation step, project_tree, and an NPO + projection unlearning step."""
    dt = jnp.dtype(dtype)
    fn, params = _decoder()
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt), params)
    B, T = 4, 32
    batch = {"input_ids": jax.ShapeDtypeStruct((B, T), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((B, T), jnp.int32),
             "loss_mask": jax.ShapeDtypeStruct((B, T), jnp.float32)}
    local = fi.fisher_local_sums(fn.example_nll)
    acc = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
    step = functools.partial(rd.accumulate, local_sums=local)
    yield ("fused Fisher step", lambda acc, p, b, w: step(acc, jnp.zeros((), jnp.float32), p, b, w, None),
           (acc, params, batch, jax.ShapeDtypeStruct((B,), jnp.float32)), len(dense_shapes(CFG)))
    retain = jax.tree.map(lambda x: jax.ShapeDtypeStruct((16, *x.shape), x.dtype), params)
    yield ("project_tree k=16", lambda g, r: project_tree(g, r), (params, retain), None)
    u = UnlearnConfig(method="npo", project=True, retain_k=4, learning_rate=1e-4).build(fn, jit=False)
    state = jax.eval_shape(u.init, params)
    yield ("NPO + projection step", lambda s, fb, rb, ref: u.step(s, fb, rb, ref), (state, batch, batch, params), None)


SHARDED_TOPOLOGY = "v5e:2x4"


def _sharded_cases(devices):
    """On a mesh of 8 chips: the steps the runs use, with the kernels where they run per shard
    (inside a shard_map manual over every axis) and XLA where XLA partitions the program.

    (name, fn, placed abstract args, expected Mosaic calls: an int, or None for "at least 2")."""
    from jaxunlearn import sharding as sh
    from jaxunlearn.placement import placed_specs

    dt = jnp.dtype(jnp.bfloat16)
    fn, params = _decoder(CFG_SHARDED)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt), params)
    B, T = 8, 32
    batch = {"input_ids": jax.ShapeDtypeStruct((B, T), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((B, T), jnp.int32),
             "loss_mask": jax.ShapeDtypeStruct((B, T), jnp.float32)}
    for spec, tp in (("fsdp=4,tp=2", True), ("fsdp=8", False)):
        mesh = sh.make_mesh(spec, devices)
        p_sh = sh.param_shardings(params, mesh)
        placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, p_sh)
        b_sh = sh.batch_sharding(mesh)
        fb = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=b_sh), batch)
        specs = tuple(jax.tree.leaves(placed_specs(placed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
        # the data-parallel Fisher: manual over the data axes; a tp axis > 1 leaves the kernels to XLA
        acc = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding), placed)
        step = functools.partial(rd.accumulate, local_sums=fi.fisher_local_sums(fn.example_nll), mesh=mesh, specs=specs)
        w = jax.ShapeDtypeStruct((B,), jnp.float32, sharding=b_sh)
        yield (f"fused Fisher step {spec}", lambda a, p, b, w, step=step: step(a, jnp.zeros((), jnp.float32), p, b, w, None),
               (acc, placed, fb, w), 0 if tp else len(dense_shapes(CFG_SHARDED)))
        for per_shard in (False, True):
            u = UnlearnConfig(method="npo", project=True, retain_k=4, learning_rate=1e-4).build(
                fn, jit=False, **(dict(mesh=mesh, param_specs=placed_specs(placed)) if per_shard else {}))
            state = jax.eval_shape(u.init, params)
            s_sh = sh.shardings_like_params(state, params, mesh)
            st = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, s_sh)
            name = f"NPO + projection step {spec}, " + ("projection per shard" if per_shard else "jit-partitioned")
            yield (name, lambda s, f, r, ref, u=u: u.step(s, f, r, ref), (st, fb, fb, placed),
                   None if per_shard else 0)


def _place(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _compile(name, topology, dtype, fn, args, expected):
    row = {"case": name, "topology": topology, "dtype": dtype, "expected": expected}
    try:
        compiled = jax.jit(fn).lower(*args).compile()
        text = compiled.as_text()
        row.update(ok=True, mosaic_calls=text.count('custom_call_target="tpu_custom_call"'),
                   temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes))
    except Exception as e:  # the compiler's refusal is the result: reported, not raised
        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-2000:])
    return row


def main(out: str) -> None:
    rows = []
    for topology in TOPOLOGIES:
        device = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]
        sharding = SingleDeviceSharding(device)
        for dtype in DTYPES:
            for name, fn, specs, expected in _cases(dtype):
                args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in specs]
                rows.append(_compile(name, topology, dtype, fn, args, expected))
            for name, fn, args, expected in _library_cases(dtype):
                rows.append(_compile(name, topology, dtype, fn, _place(args, sharding), expected))
    devices = topologies.get_topology_desc(platform="tpu", topology_name=SHARDED_TOPOLOGY).devices
    for name, fn, args, expected in _sharded_cases(devices):
        rows.append(_compile(name, SHARDED_TOPOLOGY, "bfloat16", fn, args, expected))
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
