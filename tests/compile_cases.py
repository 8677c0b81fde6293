"""The cases the deviceless compile workers share (``tpu_compile_worker.py``, ``gpu_compile_worker.py``).

Abstract inputs only (``jax.ShapeDtypeStruct``, placed on compile-only devices by the caller):
the library steps built on the kernels (the fused-Fisher accumulation step, ``project_tree`` and
an NPO + projection unlearning step) on a small decoder, the same steps sharded over an 8-device
mesh, and :func:`compile_case`, which compiles one case and reports the compiler's result and
how many kernel calls (by the backend's custom-call target) the program holds.
"""

from __future__ import annotations

import functools
import time
import traceback

import jax
import jax.numpy as jnp
from flax import nnx

from jaxunlearn import fisher as fi
from jaxunlearn import reduction as rd
from jaxunlearn import sharding as sh
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig, dense_shapes
from jaxunlearn.placement import placed_specs
from jaxunlearn.projection import project_tree
from jaxunlearn.unlearn import UnlearnConfig

CFG = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, num_layers=2)
# large enough that each device's shard of an MLP kernel (256 x 1024 / 8) spans full kernel blocks
# (8192 elements on TPU; a shorter leaf is projected by the XLA tail alone)
CFG_SHARDED = ModelConfig(vocab_size=64, hidden_size=256, intermediate_size=1024, num_heads=4, num_kv_heads=2,
                          num_layers=1)


def decoder(cfg: ModelConfig = CFG):
    """``(DecoderFn, abstract params)`` of ``cfg`` (nothing allocated)."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return DecoderFn(graphdef), params


def batch(B: int, T: int, sharding=None) -> dict:
    """An abstract batch in the convention of :mod:`jaxunlearn.losses`."""
    return {name: jax.ShapeDtypeStruct((B, T), dt, sharding=sharding) for name, dt in
            (("input_ids", jnp.int32), ("attention_mask", jnp.int32), ("loss_mask", jnp.float32))}


def place(tree, sharding):
    """``tree`` 's structs with ``sharding``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def fisher_kernel_cases(dtype):
    """(name, fn, [(shape, dtype), ...], 1 expected kernel call): ``dense_fisher`` at an aligned,
    an odd and a masked shape."""
    from jaxunlearn.kernels import fisher as kf

    dt, f32 = jnp.dtype(dtype), jnp.dtype(jnp.float32)
    yield ("dense_fisher aligned", lambda a, g: kf.dense_fisher(a, g), [((8, 128, 256), dt), ((8, 128, 512), dt)], 1)
    yield ("dense_fisher odd", lambda a, g: kf.dense_fisher(a, g), [((3, 37, 100), dt), ((3, 37, 130), dt)], 1)
    yield ("dense_fisher masked", lambda a, g, m: kf.dense_fisher(a, g, m),
           [((4, 64, 128), dt), ((4, 64, 256), dt), ((4, 64), f32)], 1)


def library_cases(dtype, retain_k: int):
    """(name, fn, abstract args, expected kernel calls or None for "at least 2"): the fused-Fisher
    step (one kernel per dense layer), ``project_tree`` and an NPO + projection unlearning step
    with ``retain_k`` retain gradients."""
    dt = jnp.dtype(dtype)
    fn, params = decoder()
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt), params)
    B, T = 4, 32
    local = fi.fisher_local_sums(fn.example_nll)
    acc = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
    step = functools.partial(rd.accumulate, local_sums=local)
    yield ("fused Fisher step", lambda acc, p, b, w: step(acc, jnp.zeros((), jnp.float32), p, b, w, None),
           (acc, params, batch(B, T), jax.ShapeDtypeStruct((B,), jnp.float32)), len(dense_shapes(CFG)))
    retain = jax.tree.map(lambda x: jax.ShapeDtypeStruct((retain_k, *x.shape), x.dtype), params)
    yield (f"project_tree k={retain_k}", lambda g, r: project_tree(g, r), (params, retain), None)
    u = UnlearnConfig(method="npo", project=True, retain_k=retain_k, learning_rate=1e-4).build(fn, jit=False)
    state = jax.eval_shape(u.init, params)
    # retain_k strided micro-batches of the retain batch span the subspace: a multiple of k rows
    yield ("NPO + projection step", lambda s, fb, rb, ref: u.step(s, fb, rb, ref),
           (state, batch(B, T), batch(retain_k, T), params), None)


def sharded_cases(devices, retain_k: int):
    """On a mesh of 8 devices (``fsdp=4,tp=2`` and ``fsdp=8``): the steps the runs use, with the
    kernels where they run per shard (a ``shard_map`` manual over every axis) and XLA where XLA
    partitions the program. (name, fn, placed abstract args, expected kernel calls: an int, or
    None for "at least 2")."""
    dt = jnp.dtype(jnp.bfloat16)
    fn, params = decoder(CFG_SHARDED)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt), params)
    B, T = 8, 32
    for spec, tp in (("fsdp=4,tp=2", True), ("fsdp=8", False)):
        mesh = sh.make_mesh(spec, devices)
        p_sh = sh.param_shardings(params, mesh)
        placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, p_sh)
        b_sh = sh.batch_sharding(mesh)
        fb, rb = batch(B, T, b_sh), batch(max(B, retain_k), T, b_sh)
        specs = tuple(jax.tree.leaves(placed_specs(placed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
        # the data-parallel Fisher: manual over the data axes; a tp axis > 1 leaves the kernels to XLA
        acc = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding), placed)
        step = functools.partial(rd.accumulate, local_sums=fi.fisher_local_sums(fn.example_nll), mesh=mesh, specs=specs)
        w = jax.ShapeDtypeStruct((B,), jnp.float32, sharding=b_sh)
        yield (f"fused Fisher step {spec}", lambda a, p, b, w, step=step: step(a, jnp.zeros((), jnp.float32), p, b, w, None),
               (acc, placed, fb, w), 0 if tp else len(dense_shapes(CFG_SHARDED)))
        for per_shard in (False, True):
            u = UnlearnConfig(method="npo", project=True, retain_k=retain_k, learning_rate=1e-4).build(
                fn, jit=False, **(dict(mesh=mesh, param_specs=placed_specs(placed)) if per_shard else {}))
            state = jax.eval_shape(u.init, params)
            s_sh = sh.shardings_like_params(state, params, mesh)
            st = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, s_sh)
            name = f"NPO + projection step {spec}, " + ("projection per shard" if per_shard else "jit-partitioned")
            yield (name, lambda s, f, r, ref, u=u: u.step(s, f, r, ref), (st, fb, rb, placed),
                   None if per_shard else 0)


def compile_case(row: dict, fn, args, call_marker: str) -> dict:
    """``row`` plus the compile's result: ``ok``, ``calls`` (occurrences of ``call_marker`` in the
    compiled program), ``temp_bytes``, ``seconds``; or ``ok=False`` with the compiler's ``error``."""
    start = time.perf_counter()
    try:
        compiled = jax.jit(fn).lower(*args).compile()
        row.update(ok=True, calls=compiled.as_text().count(call_marker),
                   temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes))
    except Exception as e:  # the compiler's refusal is the result: reported, not raised
        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-2000:])
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row
