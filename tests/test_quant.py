import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.quant import (
    FP4_LEVELS,
    NF4_LEVELS,
    dequantize_leaf,
    fake_quantize,
    fake_quantize_leaf,
    quant_targets,
    quantize_leaf,
)

# The earlier behaviour, reachable by options: blocks of the leaf flattened as stored, every leaf
# with ndim >= 2. The tests below marked "flat" check it against the earlier numpy references.
FLAT = dict(layout="flat", targets="all")

# QLoRA (Dettmers et al., 2023) NF4 table, typed in independently of the module's copy.
_NF4 = np.array([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                 0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])
# FP4 (E2M1) magnitudes {0, 0.0625, 2, 3, 4, 6, 8, 12} / 12 with a sign.
_FP4 = np.array([-12, -8, -6, -4, -3, -2, -0.0625, 0, 0.0625, 2, 3, 4, 6, 8, 12]) / 12


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
    q = np.asarray(jax.jit(functools.partial(fake_quantize_leaf, scheme="int8", layout="flat"))(jnp.asarray(x)))
    s = np.abs(x.astype(np.float64)).max(axis=0, keepdims=True) / 127
    ref = np.round(x / s) * s
    np.testing.assert_allclose(q, ref, rtol=1e-6, atol=1e-7)
    assert np.all(np.abs(q - x) <= s / 2 * (1 + 1e-5))
    # per-tensor scale for a 1-D leaf (quantised when min_ndim allows it)
    v = _x((7,), seed=1)
    qv = fake_quantize({"v": jnp.asarray(v)}, "int8", min_ndim=1, **FLAT)["v"]
    sv = np.abs(v).max() / 127
    np.testing.assert_allclose(qv, np.round(v / sv) * sv, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(8, 16), (5, 14)])  # 128 = 2 blocks; 70 -> padded tail block
def test_int4_blocks_values_and_bound(shape):
    bs = 64
    x = _x(shape)
    q = np.asarray(jax.jit(functools.partial(fake_quantize, scheme="int4", block_size=bs, **FLAT))({"w": x})["w"])
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
    q = np.asarray(jax.jit(functools.partial(fake_quantize, scheme="nf4", block_size=bs, **FLAT))({"w": x})["w"])
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


@pytest.mark.parametrize("layout", ["bnb", "flat"])
def test_ste_gradient_is_identity(layout):
    p = {"w": jnp.asarray(_x((4, 16), seed=6)), "b": jnp.asarray(_x((16,), seed=7))}
    c = {"w": jnp.asarray(_x((4, 16), seed=8)), "b": jnp.asarray(_x((16,), seed=9))}

    def loss(p, ste):
        q = fake_quantize(p, "int4", block_size=16, ste=ste, min_ndim=1, layout=layout)
        return sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(c)))

    g = jax.jit(jax.grad(functools.partial(loss, ste=True)))(p)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(c)):
        np.testing.assert_array_equal(a, b)
    # without the STE, the derivative flows only through the absmax scale of each block
    # (blocks: rows of x.T in the bnb layout, of x in the flat one)
    view = (lambda a: np.asarray(a).T) if layout == "bnb" else np.asarray
    g0 = jax.jit(jax.grad(functools.partial(loss, ste=False)))(p)
    for x, a in zip(jax.tree.leaves(p), jax.tree.leaves(g0)):
        xb, ab = view(x).reshape(-1, 16), view(a).reshape(-1, 16)
        top = np.zeros_like(xb, dtype=bool)
        top[np.arange(len(xb)), np.abs(xb).argmax(axis=1)] = True
        assert np.all(ab[~top] == 0) and np.all(ab[top] != 0)
    # the STE value is exactly the quantised value, in every scheme
    for scheme in ("int8", "int4", "nf4", "fp4"):
        fq = jax.jit(lambda p: (fake_quantize(p, scheme, block_size=16, ste=True, layout=layout),
                                fake_quantize(p, scheme, block_size=16, layout=layout)))
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
    with pytest.raises(ValueError, match="unknown quantisation scheme 'int3'.*'fp4'"):
        fake_quantize({"w": jnp.ones((2, 2))}, "int3")
    with pytest.raises(ValueError, match="block_size"):
        fake_quantize({"w": jnp.ones((2, 2))}, "int4", block_size=0)
    with pytest.raises(TypeError, match="not floating"):
        quantize_leaf(jnp.ones((2, 2), jnp.int32), "int8")
    with pytest.raises(ValueError, match="layout='hf'"):
        fake_quantize({"w": jnp.ones((2, 2))}, "nf4", layout="hf")
    with pytest.raises(ValueError, match="targets='linear'"):
        fake_quantize({"w": jnp.ones((2, 2))}, "nf4", targets="linear")
    with pytest.raises(ValueError, match="no decoder-block linear kernel"):
        fake_quantize({"w": jnp.ones((2, 2))}, "nf4", targets="blocks")
    with pytest.raises(ValueError, match=r"'layers/0/attn/q_proj/kernel'.*2-D.*\(2, 2, 2\)"):
        fake_quantize({"layers": [{"attn": {"q_proj": {"kernel": jnp.ones((2, 2, 2))}}}]}, "nf4")


# ------------------------------------------------------------------ the deployment (bnb) layout


def _np_bnb(x, scheme, bs=64):
    """Independent float32 reference of the bitsandbytes layout: the HF weight ``x.T`` flattened
    row-major, blocks of ``bs`` (the last one partial), nearest level (4-bit) or LLM.int8 rows."""
    w = np.asarray(x, np.float32).T
    if scheme == "int8":  # float16 first (Int8Params), row absmax, round(w * (1/a * 127)), code * a / 127
        w16 = w.astype(np.float16).astype(np.float32)
        a = np.abs(w16).max(axis=1, keepdims=True)
        codes = np.round(w16 * ((np.float32(1) / a) * np.float32(127)))
        return ((codes * a) * np.float32(1 / 127)).T
    flat = w.reshape(-1)
    out = np.empty_like(flat)
    for i in range(0, flat.size, bs):
        b = flat[i:i + bs]
        a = np.abs(b).max()
        if scheme == "int4":
            s = a / np.float32(7)
            out[i:i + bs] = np.clip(np.round(b / s), -7, 7) * s
            continue
        u = np.clip(b * (np.float32(1) / a) if b.size == bs else b / a, -1, 1)
        levels = (_NF4 if scheme == "nf4" else _FP4).astype(np.float32)
        out[i:i + bs] = levels[np.argmin(np.abs(u[:, None] - levels), axis=1)] * a
    return out.reshape(w.shape).T


@pytest.mark.parametrize("shape", [(128, 3), (96, 5), (70, 3)])  # in = 2 blocks; straddling; tail block
@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "fp4"])
def test_bnb_layout_vs_numpy(shape, scheme):
    x = _x(shape, seed=11) * np.exp(_x(shape[1:], seed=12))  # columns (output units) of varied scale
    q = jax.jit(functools.partial(fake_quantize_leaf, scheme=scheme))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(q), _np_bnb(x, scheme), rtol=1e-6, atol=1e-7)


def test_bnb_blocks_are_64_input_features_of_one_output_unit():
    """A small output unit next to a large one keeps its own scales in the bnb layout, not in the flat one."""
    x = _x((128, 2), seed=13)
    x[:, 0] *= 1e-3
    bnb_q = np.asarray(fake_quantize_leaf(jnp.asarray(x), "nf4"))
    flat_q = np.asarray(fake_quantize_leaf(jnp.asarray(x), "nf4", layout="flat"))
    for half in (slice(0, 64), slice(64, 128)):  # each (64 inputs, 1 output) block: its own absmax
        for j in range(2):
            a = np.abs(x[half, j]).max()
            u = bnb_q[half, j] / a
            assert np.all(np.min(np.abs(u[:, None] - _NF4), axis=1) < 1e-6)
    half_gap = np.max(np.diff(_NF4)) / 2  # the worst NF4 rounding error, relative to the block absmax
    assert np.abs(bnb_q[:, 0] - x[:, 0]).max() <= half_gap * np.abs(x[:, 0]).max() * (1 + 1e-5)
    assert np.all(flat_q[:, 0] == 0)  # flattened as stored, the large unit's absmax zeroes the small one
    codes, scales = quantize_leaf(jnp.asarray(x), "nf4")
    assert codes.shape == (4, 64) and scales.shape == (4, 1)
    np.testing.assert_allclose(scales[:, 0], np.abs(x.T.reshape(4, 64)).max(axis=1), rtol=0)


def test_fp4_table():
    np.testing.assert_allclose(FP4_LEVELS, _FP4, rtol=1e-7)
    assert FP4_LEVELS.dtype == np.float32 and FP4_LEVELS.shape == (15,) and np.all(np.diff(FP4_LEVELS) > 0)
    # exact levels are fixed points; 0.0052 (=1/192) is the smallest non-zero magnitude
    x = jnp.asarray(np.concatenate([FP4_LEVELS, np.zeros(1, np.float32)]).reshape(16, 1))
    np.testing.assert_array_equal(fake_quantize_leaf(x, "fp4"), x)


def _decoder_tree(seed=0):
    return {
        "embed": {"embedding": jnp.asarray(_x((40, 64), seed))},
        "layers": [{"attn": {"q_proj": {"kernel": jnp.asarray(_x((64, 64), seed + 1)),
                                        "bias": jnp.asarray(_x((64,), seed + 2))}},
                    "attn_norm": {"scale": jnp.asarray(_x((64,), seed + 3))},
                    "mlp": {"down_proj": {"kernel": jnp.asarray(_x((96, 64), seed + 4))}}}],
        "norm": {"scale": jnp.asarray(_x((64,), seed + 5))},
        "lm_head": {"kernel": jnp.asarray(_x((64, 40), seed + 6))},
        "step": jnp.int32(7),
    }


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "fp4"])
def test_default_is_the_deployment_and_flat_all_is_the_earlier_behaviour(scheme):
    p = _decoder_tree()
    q = jax.jit(functools.partial(fake_quantize, scheme=scheme))(p)
    blocks = {"layers/0/attn/q_proj/kernel", "layers/0/mlp/down_proj/kernel"}
    from jaxunlearn.tree import path_str

    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p)[0], jax.tree.leaves(q)):
        if path_str(path) in blocks:
            np.testing.assert_allclose(b, _np_bnb(a, scheme), rtol=1e-6, atol=1e-7)
        else:  # embedding, lm_head, norms, bias, integer step: untouched
            np.testing.assert_array_equal(b, a)
    assert quant_targets(p, "blocks") == quant_targets(p) and quant_targets(p, "all")["embed"]["embedding"]
    # the earlier behaviour: every leaf with ndim >= 2 (embedding and lm_head too), flat blocks
    old = jax.jit(functools.partial(fake_quantize, scheme=scheme, **FLAT))(p)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p)[0], jax.tree.leaves(old)):
        if jnp.ndim(a) < 2:
            np.testing.assert_array_equal(b, a)
            continue
        x = np.asarray(a)
        if scheme == "int8":
            s = np.abs(x.astype(np.float64)).max(axis=0, keepdims=True) / 127
            ref = np.round(x / s) * s
        elif scheme == "int4":
            ref = _np_int4(x, 64)[0]
        elif scheme == "nf4":
            ref = _np_nf4(x, 64)
        else:
            b_, _ = _np_blocks(x, 64)
            am = np.abs(b_).max(axis=1, keepdims=True)
            ref = (_FP4[np.argmin(np.abs((b_ / am)[..., None] - _FP4), axis=-1)] * am).reshape(-1)[: x.size]
            ref = ref.reshape(x.shape)
        np.testing.assert_allclose(b, ref, rtol=1e-6, atol=1e-7, err_msg=path_str(path))


def test_sharded_input_matches_unsharded():
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jnp.asarray(_x((16, 24), seed=10))
    xs = jax.device_put(x, NamedSharding(mesh, P("d", None)))
    for scheme in ("int8", "int4", "nf4", "fp4"):
        for layout in ("bnb", "flat"):
            f = jax.jit(functools.partial(fake_quantize, scheme=scheme, block_size=32, layout=layout))
            np.testing.assert_array_equal(f({"w": xs})["w"], f({"w": x})["w"])
