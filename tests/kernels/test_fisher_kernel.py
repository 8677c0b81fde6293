"""Tests for jaxunlearn.kernels.fisher (Pallas in interpret mode, inside jax.jit).

Tolerances: float32 rtol 1e-5 (atol 1e-5 * max|F|); bfloat16 inputs rtol 2e-2
(atol 2e-2 * max|F|) against the float32 reference of the same bf16 values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.kernels import fisher as kf

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
ON_ACCELERATOR = jax.default_backend() in ("tpu", "gpu", "cuda", "rocm")


def _inputs(B, T, d_in, d_out, dtype, with_mask, seed=0):
    # numpy draws: no per-shape compilation of jax.random kernels
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.standard_normal((B, T, d_in)), jnp.float32).astype(dtype)
    g = jnp.asarray(rng.standard_normal((B, T, d_out)), jnp.float32).astype(dtype)
    mask = jnp.asarray(rng.random((B, T)) < 0.7) if with_mask else None
    return a, g, mask


def _loop_fisher(a, g, mask=None):
    """Independent float64 reference: a Python loop of squared sums of outer products."""
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    g = np.asarray(jnp.asarray(g, jnp.float32), np.float64)
    B, T, d_in = a.shape
    F = np.zeros((d_in, g.shape[2]))
    for b in range(B):
        grad = np.zeros_like(F)
        for t in range(T):
            w = 1.0 if mask is None else float(mask[b, t])
            grad += w * np.outer(a[b, t], g[b, t])
        F += grad**2
    return F


def _close(out, ref, dtype):
    tol = TOL[dtype]
    ref = np.asarray(ref)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_hand_checked_tiny_case():
    # example 1: a=[1,2], g=[1] -> grad [[1],[2]]; example 2: a=[3,0], g=[2] -> [[6],[0]]
    a = jnp.array([[[1.0, 2.0]], [[3.0, 0.0]]])
    g = jnp.array([[[1.0]], [[2.0]]])
    expected = np.array([[1.0 + 36.0], [4.0 + 0.0]])
    for impl in ("reference", "xla", "pallas"):
        np.testing.assert_allclose(kf.dense_fisher(a, g, impl=impl), expected, rtol=1e-6)


def test_sequence_tokens_sum_before_squaring():
    # T = 2: the per-example gradient is 1*1 + 1*(-1) = 0, so F = 0; the T=1-only shortcut
    # (A**2)^T (G**2) would give 2 -- the kernels must not use it.
    a = jnp.ones((1, 2, 1))
    g = jnp.array([[[1.0], [-1.0]]])
    for impl in ("reference", "xla", "pallas"):
        np.testing.assert_allclose(kf.dense_fisher(a, g, impl=impl), [[0.0]], atol=1e-7)
    shortcut = jnp.einsum("bti,bto->io", a**2, g**2)
    assert float(shortcut[0, 0]) == 2.0


def test_reference_matches_python_loop():
    a, g, mask = _inputs(3, 5, 7, 6, jnp.float32, True)
    _close(kf.dense_fisher_reference(a, g, mask), _loop_fisher(a, g, mask), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_mask", [False, True])
def test_xla_path_matches_loop(dtype, with_mask):
    a, g, mask = _inputs(3, 5, 40, 24, dtype, with_mask)
    out = kf.dense_fisher(a, g, mask, impl="xla")
    assert out.dtype == jnp.float32 and out.shape == (40, 24)
    _close(out, _loop_fisher(a, g, mask), dtype)
    # impl="auto" on CPU is the XLA path: the same numbers.
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(kf.dense_fisher(a, g, mask), out)


# d 40x24 with blocks 16/8: d_in is padded (40 -> 48), d_out is a block multiple.
# block_t None: one T chunk; block_t 2: T=5 padded to 6, three chunks (the scratch path).
@pytest.mark.parametrize("schedule", ["grid", "loop"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_mask,block_t", [(False, None), (True, 2)])
def test_pallas_matches_reference_and_loop(schedule, dtype, with_mask, block_t):
    a, g, mask = _inputs(3, 5, 40, 24, dtype, with_mask)
    out = kf.dense_fisher_pallas(
        a, g, mask, block_in=16, block_out=8, block_t=block_t, schedule=schedule, interpret=True
    )
    assert out.dtype == jnp.float32 and out.shape == (40, 24)
    _close(out, kf.dense_fisher_reference(a, g, mask), dtype)
    _close(out, _loop_fisher(a, g, mask), dtype)


@pytest.mark.parametrize(
    "B,T,d_in,d_out",
    [
        (1, 4, 32, 16),  # B = 1, every dimension a block multiple
        (4, 1, 32, 16),  # T = 1
        (2, 3, 5, 3),  # dimensions smaller than one block
    ],
)
def test_pallas_edge_shapes(B, T, d_in, d_out):
    a, g, mask = _inputs(B, T, d_in, d_out, jnp.float32, True)
    out = kf.dense_fisher(a, g, mask, impl="pallas", block_in=16, block_out=8, interpret=True)
    _close(out, _loop_fisher(a, g, mask), jnp.float32)


def test_mask_equals_dropping_tokens():
    # a 0/1 mask is the same as deleting the masked tokens (here: the last two of each example)
    a, g, _ = _inputs(2, 6, 16, 8, jnp.float32, False)
    mask = jnp.ones((2, 6), bool).at[:, 4:].set(False)
    out = kf.dense_fisher(a, g, mask, impl="pallas", block_in=8, block_out=8, block_t=2, interpret=True)
    _close(out, kf.dense_fisher_reference(a[:, :4], g[:, :4]), jnp.float32)


def test_bfloat16_accumulates_in_float32():
    # 4096 identical examples with per-example gradient 1: bf16 accumulation would stall
    # at 256 (bf16 has 8 mantissa bits); float32 accumulation gives 4096 exactly.
    a = jnp.ones((4096, 1, 8), jnp.bfloat16)
    g = jnp.ones((4096, 1, 8), jnp.bfloat16)
    for impl in ("xla", "pallas"):
        out = kf.dense_fisher(a, g, impl=impl)
        assert out.dtype == jnp.float32
        np.testing.assert_array_equal(out, np.full((8, 8), 4096.0))


def test_jit_composes():
    a, g, mask = _inputs(2, 3, 8, 8, jnp.float32, True)

    @jax.jit
    def mean_fisher(a, g, m):
        return kf.dense_fisher(a, g, m, impl="pallas", block_in=8, block_out=8, interpret=True) / a.shape[0]

    _close(mean_fisher(a, g, mask), _loop_fisher(a, g, mask) / 2, jnp.float32)


@pytest.mark.skipif(not ON_ACCELERATOR, reason="compiled Pallas needs a TPU or GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_pallas_on_hardware(dtype):
    a, g, mask = _inputs(4, 64, 256, 128, dtype, True)
    out = kf.dense_fisher(a, g, mask, impl="pallas", interpret=False)
    _close(out, kf.dense_fisher_reference(a, g, mask), dtype)


@pytest.mark.parametrize(
    "a_shape,g_shape,mask_shape,err,match",
    [
        ((2, 3), (2, 3, 4), None, ValueError, "a must have shape"),
        ((2, 3, 4), (2, 3), None, ValueError, "g must have shape"),
        ((2, 3, 4), (3, 3, 4), None, ValueError, "batch size mismatch"),
        ((2, 3, 4), (2, 5, 4), None, ValueError, "sequence length mismatch"),
        ((2, 3, 4), (2, 3, 4), (2, 4), ValueError, "mask must have shape"),
        ((0, 3, 4), (0, 3, 4), None, ValueError, "empty input"),
    ],
)
def test_shape_errors(a_shape, g_shape, mask_shape, err, match):
    a, g = jnp.ones(a_shape), jnp.ones(g_shape)
    mask = None if mask_shape is None else jnp.ones(mask_shape)
    for impl in ("xla", "pallas", "reference"):
        with pytest.raises(err, match=match):
            kf.dense_fisher(a, g, mask, impl=impl)


def test_dtype_and_option_errors():
    a = jnp.ones((2, 3, 4))
    with pytest.raises(TypeError, match="only float32 and bfloat16"):
        kf.dense_fisher(a.astype(jnp.float16), a.astype(jnp.float16))
    with pytest.raises(TypeError, match="only float32 and bfloat16"):
        kf.dense_fisher(a.astype(jnp.int32), a)
    with pytest.raises(TypeError, match="same dtype"):
        kf.dense_fisher(a, a.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="mask must be"):
        kf.dense_fisher(a, a, jnp.ones((2, 3), jnp.complex64))
    with pytest.raises(ValueError, match="unknown impl"):
        kf.dense_fisher(a, a, impl="cuda")
    with pytest.raises(ValueError, match="block_in must be a positive int"):
        kf.dense_fisher(a, a, impl="pallas", block_in=0)
    with pytest.raises(ValueError, match="unknown schedule"):
        kf.dense_fisher_pallas(a, a, schedule="diagonal")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="interpret=True"):
            kf.dense_fisher(a, a, impl="pallas", interpret=False)
