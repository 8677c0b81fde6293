import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.quant import (
    NF4_LEVELS,
    dequantize_leaf,
    fake_quantize,
    fake_quantize_leaf,
    quantize_leaf,
)

# QLoRA (Dettmers et al., 2023) NF4 table, typed in independently of the module's copy.
_NF4 = np.array([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                 0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _np_blocks(x, bs):
    flat = x.reshape(-1).astype(np.float64)
    pad = (-flat.size) % bs
    return np.concatenate([flat, np.zeros(pad)]).reshape(-1, bs), pad


def _np_int4(x, bs):
    b, pad = _np_blocks(x, bs)
    s = np.abs(b).max(axis=1, keepdims=True) / 7
    q = np.clip(np.round(b / np.where(s > 0, s, 1)), -7, 7) * s
    step = np.broadcast_to(s, b.shape).reshape(-1)[: x.size].reshape(x.shape)
    return q.reshape(-1)[: x.size].reshape(x.shape), step


def _np_nf4(x, bs):
    b, _ = _np_blocks(x, bs)
    a = np.abs(b).max(axis=1, keepdims=True)
    u = b / np.where(a > 0, a, 1)
    idx = np.argmin(np.abs(u[..., None] - _NF4), axis=-1)
    return (_NF4[idx] * a).reshape(-1)[: x.size].reshape(x.shape)


def test_nf4_table_is_the_published_one():
    np.testing.assert_allclose(NF4_LEVELS, _NF4, atol=1e-7)
    assert NF4_LEVELS.shape == (16,) and np.all(np.diff(NF4_LEVELS) > 0)


def test_int8_per_channel_vs_numpy_and_half_step_bound():
    x = _x((6, 5))
    x[:, 2] *= 100.0  # a large channel must not coarsen the others
    q = np.asarray(jax.jit(functools.partial(fake_quantize_leaf, scheme="int8"))(jnp.asarray(x)))
    s = np.abs(x.astype(np.float64)).max(axis=0, keepdims=True) / 127
    ref = np.round(x / s) * s
    np.testing.assert_allclose(q, ref, rtol=1e-6, atol=1e-7)
    assert np.all(np.abs(q - x) <= s / 2 * (1 + 1e-5))
    # per-tensor scale for a 1-D leaf (quantised when min_ndim allows it)
    v = _x((7,), seed=1)
    qv = fake_quantize({"v": jnp.asarray(v)}, "int8", min_ndim=1)["v"]
    sv = np.abs(v).max() / 127
    np.testing.assert_allclose(qv, np.round(v / sv) * sv, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(8, 16), (5, 14)])  # 128 = 2 blocks; 70 -> padded tail block
def test_int4_blocks_values_and_bound(shape):
    bs = 64
    x = _x(shape)
    q = np.asarray(jax.jit(functools.partial(fake_quantize, scheme="int4", block_size=bs))({"w": x})["w"])
    ref, step = _np_int4(x, bs)
    assert q.shape == x.shape
    np.testing.assert_allclose(q, ref, rtol=1e-6, atol=1e-7)
    assert np.all(np.abs(q - x) <= step / 2 * (1 + 1e-5))
    flat = q.reshape(-1)
    for i in range(0, flat.size, bs):
        assert len(np.unique(flat[i : i + bs])) <= 16
    # the tail block's scale comes from its own (unpadded) values only
    if x.size % bs:
        tail = x.reshape(-1)[(x.size // bs) * bs :]
        assert np.isclose(np.abs(flat[-tail.size :]).max(), np.abs(tail).max(), rtol=1e-6)


@pytest.mark.parametrize("shape", [(4, 32), (3, 30)])
def test_nf4_values_on_levels_times_block_scale(shape):
    bs = 64
    x = _x(shape, seed=2)
    q = np.asarray(jax.jit(functools.partial(fake_quantize, scheme="nf4", block_size=bs))({"w": x})["w"])
    np.testing.assert_allclose(q, _np_nf4(x, bs), rtol=1e-6, atol=1e-7)
    b, _ = _np_blocks(x, bs)
    qb, _ = _np_blocks(q, bs)
    a = np.abs(b).max(axis=1, keepdims=True)
    u = qb / a
    assert np.all(np.min(np.abs(u[..., None] - _NF4), axis=-1) < 1e-6)


def test_codes_roundtrip_and_ranges():
    x = jnp.asarray(_x((3, 50), seed=3))
    for scheme, lo, hi in [("int8", -127, 127), ("int4", -7, 7), ("nf4", 0, 15)]:

        @jax.jit
        def roundtrip(x):
            codes, scales = quantize_leaf(x, scheme, block_size=32)
            back = dequantize_leaf(codes, scales, scheme, shape=x.shape, dtype=x.dtype)
            return codes, scales, back, fake_quantize_leaf(x, scheme, block_size=32)

        codes, scales, back, direct = roundtrip(x)
        c = np.asarray(codes).astype(np.int64)
        assert c.min() >= lo and c.max() <= hi
        assert c.max() == hi  # the absmax entry gets the top code (nf4: level 1.0 = index 15)
        np.testing.assert_array_equal(back, direct)
        if scheme == "int4":
            assert codes.shape == (5, 32) and scales.shape == (5, 1)  # 150 values -> 5 blocks


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_quantisation_is_idempotent_and_zero_safe(scheme):
    x = jnp.asarray(_x((4, 40), seed=4)).at[0].set(0.0)  # an all-zero row / block
    f = jax.jit(functools.partial(fake_quantize_leaf, scheme=scheme, block_size=40))
    q = f(x)
    assert np.all(np.isfinite(q)) and np.all(np.asarray(q)[0] == 0)
    np.testing.assert_allclose(f(q), q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_bfloat16_keeps_dtype_and_matches_float32(scheme):
    x = jnp.asarray(_x((4, 40), seed=5)).astype(jnp.bfloat16)
    q = jax.jit(functools.partial(fake_quantize, scheme=scheme, block_size=32))({"w": x})["w"]
    assert q.dtype == jnp.bfloat16
    q32 = jax.jit(functools.partial(fake_quantize, scheme=scheme, block_size=32))({"w": x.astype(jnp.float32)})["w"]
    np.testing.assert_allclose(np.asarray(q, np.float32), q32, rtol=1e-2, atol=1e-6)


def test_ste_gradient_is_identity():
    p = {"w": jnp.asarray(_x((4, 16), seed=6)), "b": jnp.asarray(_x((16,), seed=7))}
    c = {"w": jnp.asarray(_x((4, 16), seed=8)), "b": jnp.asarray(_x((16,), seed=9))}

    def loss(p, ste):
        q = fake_quantize(p, "int4", block_size=16, ste=ste, min_ndim=1)
        return sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(c)))

    g = jax.jit(jax.grad(functools.partial(loss, ste=True)))(p)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(c)):
        np.testing.assert_array_equal(a, b)
    # without the STE, the derivative flows only through the absmax scale of each block
    g0 = jax.jit(jax.grad(functools.partial(loss, ste=False)))(p)
    for x, a in zip(jax.tree.leaves(p), jax.tree.leaves(g0)):
        xb, ab = np.asarray(x).reshape(-1, 16), np.asarray(a).reshape(-1, 16)
        top = np.zeros_like(xb, dtype=bool)
        top[np.arange(len(xb)), np.abs(xb).argmax(axis=1)] = True
        assert np.all(ab[~top] == 0) and np.all(ab[top] != 0)
    # the STE value is exactly the quantised value
    fq = jax.jit(lambda p: (fake_quantize(p, "int4", block_size=16, ste=True), fake_quantize(p, "int4", block_size=16)))
    a, b = fq(p)
    np.testing.assert_array_equal(a["w"], b["w"])


def test_leaf_selection():
    p = {"kernel": jnp.asarray(_x((4, 8))), "scale": jnp.asarray(_x((8,))), "step": jnp.int32(3)}
    q = jax.jit(functools.partial(fake_quantize, scheme="int4", block_size=8))(p)
    np.testing.assert_array_equal(q["scale"], p["scale"])  # 1-D skipped by default
    assert q["step"] == 3
    assert not np.array_equal(q["kernel"], p["kernel"])
    q2 = jax.jit(functools.partial(fake_quantize, scheme="int4", block_size=8, where=lambda path, x: path == "scale"))(p)
    np.testing.assert_array_equal(q2["kernel"], p["kernel"])
    assert not np.array_equal(q2["scale"], p["scale"])


def test_bad_input():
    with pytest.raises(ValueError, match="unknown quantisation scheme 'int3'"):
        fake_quantize({"w": jnp.ones((2, 2))}, "int3")
    with pytest.raises(ValueError, match="block_size"):
        fake_quantize({"w": jnp.ones((2, 2))}, "int4", block_size=0)
    with pytest.raises(TypeError, match="not floating"):
        quantize_leaf(jnp.ones((2, 2), jnp.int32), "int8")


def test_sharded_input_matches_unsharded():
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jnp.asarray(_x((16, 24), seed=10))
    xs = jax.device_put(x, NamedSharding(mesh, P("d", None)))
    for scheme in ("int8", "int4", "nf4"):
        f = jax.jit(functools.partial(fake_quantize, scheme=scheme, block_size=32))
        np.testing.assert_array_equal(f({"w": xs})["w"], f({"w": x})["w"])
