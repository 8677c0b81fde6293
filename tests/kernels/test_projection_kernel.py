"""Tests for jaxunlearn.kernels.projection (Pallas in interpret mode, inside jax.jit).

Tolerances against float64 numpy: float32 rtol 1e-5 (atol 1e-5 * max|ref|);
bfloat16 inputs rtol 2e-2 (atol 2e-2 * max|ref|), the reference computed from
the same bf16 values. Orthogonality: |<out, r_i>| <= 1e-5 ||g|| ||r_i||.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

from jaxunlearn.kernels import projection as kp

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
ON_ACCELERATOR = jax.default_backend() in ("tpu", "gpu", "cuda", "rocm")


def _np(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _close(out, ref, dtype):
    tol = TOL[dtype]
    ref = np.asarray(ref)
    np.testing.assert_allclose(_np(out), ref, rtol=tol, atol=tol * np.abs(ref).max())


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


def test_mixed_dtypes_read_as_float32():
    R, _, c = _arrays(2, 200, jnp.bfloat16)
    _, g, _ = _arrays(2, 200, jnp.float32, seed=1)
    Rn, gn = _np(R), _np(g)
    G, d = kp.gram_and_dots(R, g, impl="pallas", block_p=64)
    _close(d, Rn @ gn, jnp.float32)
    out = kp.subtract(g, R, c, impl="pallas", block_p=64)
    assert out.dtype == jnp.float32
    _close(out, gn - Rn.T @ _np(c), jnp.float32)


def test_hand_checked_tiny_case():
    R = jnp.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    g = jnp.array([1.0, 1.0, 1.0])
    G, d = kp.gram_and_dots(R, g, impl="pallas", block_p=2)
    np.testing.assert_array_equal(G, [[5.0, 0.0], [0.0, 9.0]])
    np.testing.assert_array_equal(d, [3.0, 3.0])
    out = kp.subtract(g, R, jnp.array([1.0, 2.0]), impl="pallas", block_p=2)
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


# ---------------------------------------------------------------- project_tree


def _trees(k, dtype=jnp.float32, seed=0):
    """A pytree with a matrix, a vector and a 2-element leaf (shorter than k=3)."""
    rng = np.random.default_rng(seed)
    shapes = {"w": (10, 13), "b": (70,), "s": (2,)}

    def draw(shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    g = {"w": draw(shapes["w"]), "rest": (draw(shapes["b"]), draw(shapes["s"]))}
    r = {"w": draw((k, *shapes["w"])), "rest": (draw((k, *shapes["b"])), draw((k, *shapes["s"])))}
    return g, r


def _flat(tree, k=None):
    leaves = jax.tree.leaves(tree)
    if k is None:
        return np.concatenate([_np(x).reshape(-1) for x in leaves])
    return np.concatenate([_np(x).reshape(k, -1) for x in leaves], axis=1)


def _dense_projection(g, R):
    """float64 reference: g - R^T lstsq(R^T, g) (minimum-norm least squares)."""
    coef = np.linalg.lstsq(R.T, g, rcond=None)[0]
    return g - R.T @ coef


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_project_tree_orthogonal_idempotent_and_dense(impl):
    g, r = _trees(3)
    out = kp.project_tree(g, r, impl=impl, block_p=32)
    assert jax.tree.structure(out) == jax.tree.structure(g)
    for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
        assert o.shape == x.shape and o.dtype == x.dtype
    gf, Rf, of = _flat(g), _flat(r, 3), _flat(out)
    rel = np.abs(Rf @ of) / (np.linalg.norm(gf) * np.linalg.norm(Rf, axis=1))
    assert rel.max() <= 1e-5, rel
    _close(of, _dense_projection(gf, Rf), jnp.float32)
    twice = _flat(kp.project_tree(out, r, impl=impl, block_p=32))
    np.testing.assert_allclose(twice, of, atol=1e-5 * np.abs(of).max())


def test_project_tree_k1_formula():
    g, r = _trees(1)
    out = _flat(kp.project_tree(g, r, impl="pallas", block_p=32))
    gf, rf = _flat(g), _flat(r, 1)[0]
    _close(out, gf - (gf @ rf) / (rf @ rf) * rf, jnp.float32)


def test_project_tree_duplicated_and_zero_retain_vectors():
    g, r = _trees(2)
    dup = jax.tree.map(lambda x: jnp.concatenate([x, x[:1], 2.0 * x[1:]], axis=0), r)  # rows r0, r1, r0, 2 r1
    out = kp.project_tree(g, dup, impl="pallas", block_p=32)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    # the same as projecting on the two distinct vectors
    _close(_flat(out), _dense_projection(_flat(g), _flat(r, 2)), jnp.float32)
    zero = jax.tree.map(jnp.zeros_like, r)
    same = kp.project_tree(g, zero, impl="xla")
    for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(g)):
        np.testing.assert_array_equal(x, y)


def test_project_tree_bfloat16():
    g, r = _trees(3, jnp.bfloat16)
    out = kp.project_tree(g, r, impl="pallas", block_p=32)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
    _close(_flat(out), _dense_projection(_flat(g), _flat(r, 3)), jnp.bfloat16)


# Pallas interpret mode evaluates the kernel on values that vary over "x" while the kernel
# was traced as invariant: jax 0.10.2's interpreter then needs check_vma=False.
@pytest.mark.parametrize("impl,check_vma", [("xla", True), ("pallas", False)])
def test_project_tree_sharded_with_axis_name(impl, check_vma):
    # each of 4 devices holds a quarter of every leaf; Gram and dots are psum-ed over "x".
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(3)
    def draw(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    g = {"a": draw(64), "b": draw(8, 6)}
    r = {"a": draw(2, 64), "b": draw(2, 8, 6)}
    specs_g = {"a": PS("x"), "b": PS("x", None)}
    specs_r = {"a": PS(None, "x"), "b": PS(None, "x", None)}
    f = jax.jit(
        jax.shard_map(
            lambda g, r: kp.project_tree(g, r, impl=impl, block_p=8, axis_name="x"),
            mesh=mesh,
            in_specs=(specs_g, specs_r),
            out_specs=specs_g,
            check_vma=check_vma,
        )
    )
    out = f(g, r)
    _close(_flat(out), _dense_projection(_flat(g), _flat(r, 2)), jnp.float32)


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
        kp.gram(jnp.ones((2, 24)), impl="pallas", block_p=8, splits=2)
    with pytest.raises(ValueError, match="unknown impl"):
        kp.gram(R, impl="gpu")
    with pytest.raises(ValueError, match="block_p must be a positive int"):
        kp.gram(R, impl="pallas", block_p=-1)
    with pytest.raises(ValueError, match="pinv_solve needs"):
        kp.pinv_solve(jnp.ones((2, 3)), jnp.ones(2))


def test_tree_errors():
    g, r = _trees(3)
    with pytest.raises(ValueError, match="empty pytree"):
        kp.project_tree({}, {})
    with pytest.raises(ValueError, match="pytree mismatch"):
        kp.project_tree(g, {"w": r["w"]})
    with pytest.raises(ValueError, match=r"must have shape \(k, "):
        kp.project_tree(g, {**r, "w": r["w"][:, :5]})
    with pytest.raises(ValueError, match="same leading k"):
        kp.project_tree(g, {**r, "w": r["w"][:2]})
    with pytest.raises(ValueError, match="exceed the number of parameters"):
        kp.project_tree({"a": jnp.ones(2)}, {"a": jnp.ones((3, 2))})
    with pytest.raises(ValueError, match="rcond"):
        kp.project_tree(g, r, rcond=1.5)
    with pytest.raises(TypeError, match="only float32 and bfloat16"):
        kp.project_tree({"a": jnp.ones(4, jnp.float16)}, {"a": jnp.ones((1, 4), jnp.float16)})
