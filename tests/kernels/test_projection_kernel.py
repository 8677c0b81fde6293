"""Tests for jaxunlearn.kernels.projection (Pallas in interpret mode, inside jax.jit).

Tolerances against float64 numpy: float32 rtol 1e-5 (atol 1e-5 * max|ref|);
bfloat16 inputs rtol 2e-2 (atol 2e-2 * max|ref|), the reference computed from
the same bf16 values. Orthogonality: |<out, r_i>| <= 1e-5 ||g|| ||r_i||.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.kernels import projection as kp

from f64_reference import TOL, as_f64 as _np, assert_close as _close  # noqa: F401
ON_ACCELERATOR = jax.default_backend() in ("tpu", "gpu", "cuda", "rocm")




def _arrays(k, P, dtype, seed=0):
    rng = np.random.default_rng(seed)
    R = jnp.asarray(rng.standard_normal((k, P)), jnp.float32).astype(dtype)
    g = jnp.asarray(rng.standard_normal(P), jnp.float32).astype(dtype)
    c = jnp.asarray(rng.standard_normal(k), jnp.float32)
    return R, g, c


# P = 256: four full blocks of 64 (splits=2 -> two partial sums of two blocks);
# P = 300: four full blocks + a 44-column tail; P = 50: shorter than one block (all tail).
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("P,splits", [(256, 2), (300, None), (50, None)])
def test_pallas_kernels_match_numpy(dtype, P, splits):
    R, g, c = _arrays(3, P, dtype)
    Rn, gn, cn = _np(R), _np(g), _np(c)
    opts = dict(impl="pallas", block_p=64, interpret=True)
    G, d = kp.gram_and_dots(R, g, splits=splits, **opts)
    assert G.dtype == d.dtype == jnp.float32 and G.shape == (3, 3) and d.shape == (3,)
    _close(G, Rn @ Rn.T, dtype)
    _close(d, Rn @ gn, dtype)
    _close(kp.gram(R, **opts), Rn @ Rn.T, dtype)
    _close(kp.dots(R, g, **opts), Rn @ gn, dtype)
    out = kp.subtract(g, R, c, **opts)
    assert out.dtype == dtype and out.shape == (P,)
    _close(out, gn - Rn.T @ cn, dtype)


@pytest.mark.parametrize("impl", ["xla", "reference", "auto"])
def test_other_paths_match_numpy(impl):
    R, g, c = _arrays(4, 300, jnp.float32)
    Rn, gn, cn = _np(R), _np(g), _np(c)
    G, d = kp.gram_and_dots(R, g, impl=impl)
    _close(G, Rn @ Rn.T, jnp.float32)
    _close(d, Rn @ gn, jnp.float32)
    _close(kp.subtract(g, R, c, impl=impl), gn - Rn.T @ cn, jnp.float32)


def test_public_xla_path_takes_more_rows_than_columns():
    # the XLA path as public functions: any k, also k > P (a pytree leaf shorter than k)
    R, g, c = _arrays(5, 3, jnp.float32)
    Rn, gn, cn = _np(R), _np(g), _np(c)
    s = jnp.array([0.5, 2.0, 1.0, 4.0, 0.25])
    G, d = kp.gram_and_dots_xla(R, g, s)
    RS = _np(s)[:, None] * Rn
    _close(G, RS @ RS.T, jnp.float32)
    _close(d, RS @ gn, jnp.float32)
    _close(kp.subtract_xla(g, R, c, s), gn - RS.T @ cn, jnp.float32)
    G2, d2 = kp.gram_and_dots(*_arrays(4, 300, jnp.float32)[:2], impl="xla")
    G3, d3 = kp.gram_and_dots_xla(*_arrays(4, 300, jnp.float32)[:2])
    np.testing.assert_array_equal(G2, G3)
    np.testing.assert_array_equal(d2, d3)
    with pytest.raises(ValueError, match="g must have shape"):
        kp.gram_and_dots_xla(R, g[:2])
    with pytest.raises(TypeError, match="only float32 and bfloat16"):
        kp.subtract_xla(g.astype(jnp.float16), R, c)


def test_mixed_dtypes_read_as_float32():
    R, _, c = _arrays(2, 200, jnp.bfloat16)
    _, g, _ = _arrays(2, 200, jnp.float32, seed=1)
    Rn, gn = _np(R), _np(g)
    G, d = kp.gram_and_dots(R, g, impl="pallas", block_p=64, interpret=True)
    _close(d, Rn @ gn, jnp.float32)
    out = kp.subtract(g, R, c, impl="pallas", block_p=64, interpret=True)
    assert out.dtype == jnp.float32
    _close(out, gn - Rn.T @ _np(c), jnp.float32)


def test_hand_checked_tiny_case():
    R = jnp.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    g = jnp.array([1.0, 1.0, 1.0])
    G, d = kp.gram_and_dots(R, g, impl="pallas", block_p=2, interpret=True)
    np.testing.assert_array_equal(G, [[5.0, 0.0], [0.0, 9.0]])
    np.testing.assert_array_equal(d, [3.0, 3.0])
    out = kp.subtract(g, R, jnp.array([1.0, 2.0]), impl="pallas", block_p=2, interpret=True)
    np.testing.assert_array_equal(out, [0.0, -5.0, -1.0])  # g - 1 * r0 - 2 * r1


def test_pinv_solve_angle_based_rank_rule():
    # orthogonal rows of norms 2 and ~3.2e-5 plus a zero row: G = diag(4, 1e-9, 0). The rank
    # rule looks at the cosine Gram diag(1, 1, 0), so the short row is kept (a raw-Gram
    # threshold would drop it) and only the zero row is dropped: c = (8/4, 1/1e-9, 0).
    G = jnp.diag(jnp.array([4.0, 1e-9, 0.0]))
    c = kp.pinv_solve(G, jnp.array([8.0, 1.0, 1.0]))
    np.testing.assert_allclose(c, [2.0, 1e9, 0.0], rtol=1e-5)
    np.testing.assert_array_equal(kp.pinv_solve(jnp.zeros((2, 2)), jnp.ones(2)), [0.0, 0.0])
    # full rank: the exact solve
    A = jnp.array([[2.0, 1.0], [1.0, 3.0]])
    expected = np.linalg.solve(_np(A), [1.0, 2.0])
    np.testing.assert_allclose(kp.pinv_solve(A, jnp.array([1.0, 2.0])), expected, rtol=1e-5)


def test_pinv_solve_keeps_retain_vectors_of_very_different_norms():
    # r0 = 1000 (1, 0.2, 0), r1 = (0.3, 1, 0.1): norms differ ~1000x, angle ~60 degrees.
    # raw-Gram eigenvalue ratio ~1e-6 < 1e-5 would drop r1; the cosine rule keeps both,
    # giving the exact projection of g onto span(r0, r1)^perp (float64 lstsq reference).
    R = np.array([[1000.0, 200.0, 0.0], [0.3, 1.0, 0.1]])
    g = np.array([1.0, -2.0, 3.0])
    G, d = jnp.asarray(R @ R.T, jnp.float32), jnp.asarray(R @ g, jnp.float32)
    lam = np.linalg.eigvalsh(R @ R.T)
    assert lam.min() / lam.max() < 1e-5
    out = g - R.T @ _np(kp.pinv_solve(G, d))
    np.testing.assert_allclose(out, _dense_projection(g, R), rtol=1e-3, atol=1e-4 * np.linalg.norm(g))
    assert abs(out @ R[1]) <= 1e-4 * np.linalg.norm(g) * np.linalg.norm(R[1])
    # a nearly parallel pair (cosine-Gram eigenvalue ~5e-9 <= 1e-6) is reduced to one direction
    near = np.array([[1.0, 0.0, 0.0], [1.0, 1e-4, 0.0]])
    c = kp.pinv_solve(jnp.asarray(near @ near.T, jnp.float32), jnp.asarray(near @ g, jnp.float32))
    out = g - near.T @ _np(c)
    u = near.sum(0) / np.linalg.norm(near.sum(0))  # the kept direction
    np.testing.assert_allclose(out, g - (g @ u) * u, atol=1e-5)


def _dense_projection(g, R):
    """float64 reference: g - R^T lstsq(R^T, g) (minimum-norm least squares)."""
    coef = np.linalg.lstsq(R.T, g, rcond=None)[0]
    return g - R.T @ coef


@pytest.mark.skipif(not ON_ACCELERATOR, reason="compiled Pallas needs a TPU or GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_pallas_on_hardware(dtype):
    R, g, c = _arrays(16, 100_000, dtype)
    Rn, gn = _np(R), _np(g)
    G, d = kp.gram_and_dots(R, g, impl="pallas", interpret=False)
    _close(G, Rn @ Rn.T, dtype)
    _close(d, Rn @ gn, dtype)
    _close(kp.subtract(g, R, c, impl="pallas", interpret=False), gn - Rn.T @ _np(c), dtype)


# ---------------------------------------------------------------- errors


def test_array_errors():
    R, g, c = _arrays(3, 20, jnp.float32)
    with pytest.raises(ValueError, match="exceed their length"):
        kp.gram(jnp.ones((5, 4)))
    with pytest.raises(ValueError, match="R must have shape"):
        kp.gram(g)
    with pytest.raises(ValueError, match="R is empty"):
        kp.gram(jnp.ones((0, 4)))
    with pytest.raises(ValueError, match="g must have shape"):
        kp.dots(R, g[:-1])
    with pytest.raises(ValueError, match="c must have shape"):
        kp.subtract(g, R, c[:2])
    with pytest.raises(TypeError, match="only float32 and bfloat16"):
        kp.gram(R.astype(jnp.int32))
    with pytest.raises(TypeError, match="c must be a float"):
        kp.subtract(g, R, jnp.ones(3, jnp.int32))
    with pytest.raises(ValueError, match="splits must be a positive divisor"):
        kp.gram(jnp.ones((2, 24)), impl="pallas", block_p=8, splits=2, interpret=True)
    with pytest.raises(ValueError, match="unknown impl"):
        kp.gram(R, impl="gpu")
    with pytest.raises(ValueError, match="block_p must be a positive int"):
        kp.gram(R, impl="pallas", block_p=-1)
    with pytest.raises(ValueError, match="pinv_solve needs"):
        kp.pinv_solve(jnp.ones((2, 3)), jnp.ones(2))


def test_gpu_default_block_fits_shared_memory():
    # H200, k = 16, block_p = 2048: Triton asked for 2 * 16 * 2048 * 4 = 262144 bytes of shared
    # memory and the device had 232448. The default now keeps the two float32 dot operands
    # within GPU_DOT_SMEM_BYTES, as a power of two (Triton) in [16, 2048].
    assert kp.default_block_p("gpu", 16) == 512
    assert kp.default_block_p("gpu", 64) == 128
    assert kp.default_block_p("gpu", 1) == 2048
    assert kp.default_block_p("gpu", 4096) == 16
    for k in (16, 32, 64, 128, 256, 512):
        bp = kp.default_block_p("gpu", k)
        assert bp & (bp - 1) == 0 and 2 * k * bp * 4 <= kp.GPU_DOT_SMEM_BYTES < 2 * k * (2 * bp) * 4
    assert kp.default_block_p("tpu", 16) == kp.default_block_p("cpu", 16) == 8192
