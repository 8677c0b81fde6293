"""jaxunlearn.projection's core (project_tree) on the array kernels of jaxunlearn.kernels.projection.

The reference is the pure pytree core (``impl="jnp"``: ``tensordot`` per leaf, float32 at
``Precision.HIGHEST``) and, independently of both, ``np.linalg.lstsq`` in float64 on the
raveled vectors. Tolerances: float32 atol 1e-5 (inputs of norm ~5); bfloat16 atol
2e-2 * max|ref|. Everything runs under ``jax.jit``; Pallas in interpret mode on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as PS

from jaxunlearn import projection as pj
from jaxunlearn.kernels import projection as kp
from jaxunlearn.projection import project_tree

from f64_reference import TOL, as_f64 as _np, assert_close as _close  # noqa: F401

SHAPES = {"a": (3, 4), "b": {"c": (5,)}, "d": (2, 2, 2), "s": (2,)}  # "s" is shorter than k = 3


def rand_tree(rng, lead=(), dtype=jnp.float32, shapes=SHAPES):
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=lead + s), dtype), shapes, is_leaf=lambda x: isinstance(x, tuple)
    )


def vec(tree):
    return np.concatenate([np.asarray(jnp.asarray(x, jnp.float32), np.float64).ravel() for x in jax.tree.leaves(tree)])


def mat(stacked):
    leaves = jax.tree.leaves(stacked)
    k = leaves[0].shape[0]
    return np.concatenate([np.asarray(jnp.asarray(x, jnp.float32), np.float64).reshape(k, -1) for x in leaves], 1)


def lstsq_project(gv, rm):
    return gv - rm.T @ np.linalg.lstsq(rm.T, gv, rcond=None)[0]


project = jax.jit(pj.orthogonal_projection, static_argnames=("rcond", "per_tensor", "impl"))


# on CPU "auto" is the fused-XLA kernel path ("xla"); "pallas" (interpret mode) is run below.
@pytest.mark.parametrize("per_tensor", [False, True])
def test_kernel_core_equals_jnp_core(per_tensor):
    rng = np.random.default_rng(0)
    g, R = rand_tree(rng), rand_tree(rng, (3,))
    out = project(g, R, impl="auto", per_tensor=per_tensor)
    ref = project(g, R, impl="jnp", per_tensor=per_tensor)
    assert jax.tree.structure(out) == jax.tree.structure(g)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))
    np.testing.assert_allclose(vec(out), vec(ref), atol=1e-5)
    if per_tensor:  # every leaf against its own subspace (the 2-element leaf: rank 2 < k = 3)
        for x, gl, rl in zip(jax.tree.leaves(out), jax.tree.leaves(g), jax.tree.leaves(R)):
            rm = np.asarray(rl, np.float64).reshape(3, -1)
            np.testing.assert_allclose(np.asarray(x).ravel(), lstsq_project(np.asarray(gl).ravel(), rm), atol=1e-5)
    else:
        np.testing.assert_allclose(vec(out), lstsq_project(vec(g), mat(R)), atol=1e-5)


def test_pallas_kernel_body_runs_through_orthogonal_projection():
    # a leaf of 9000 > block_p = 8192 entries: one full Pallas block plus an XLA tail.
    rng = np.random.default_rng(1)
    shapes = {"w": (100, 90), "b": (7,)}
    g, R = rand_tree(rng, shapes=shapes), rand_tree(rng, (4,), shapes=shapes)
    for per_tensor in (False, True):
        out = project(g, R, impl="pallas", per_tensor=per_tensor)
        np.testing.assert_allclose(vec(out), vec(project(g, R, impl="jnp", per_tensor=per_tensor)), atol=1e-5)
    np.testing.assert_allclose(vec(out), np.concatenate(
        [lstsq_project(vec(g["b"]), mat(R["b"])), lstsq_project(vec(g["w"]), mat(R["w"]))]), atol=1e-5)


def test_retain_gradients_of_very_different_norms_are_kept():
    # one retain gradient is 1000x longer than the other: both directions are removed by
    # every core (the rank rule is on the cosine Gram), matching float64 lstsq.
    rng = np.random.default_rng(2)
    g, r1, r2 = rand_tree(rng), rand_tree(rng), rand_tree(rng)
    R = [jax.tree.map(lambda x: 1000.0 * x, r1), r2]
    ref = lstsq_project(vec(g), np.stack([vec(R[0]), vec(r2)]))
    for impl in ("auto", "jnp"):
        out = vec(project(g, R, impl=impl))
        np.testing.assert_allclose(out, ref, atol=1e-4)
        assert abs(out @ vec(r2)) <= 1e-5 * np.linalg.norm(vec(g)) * np.linalg.norm(vec(r2))


def test_bfloat16_kernel_core():
    rng = np.random.default_rng(3)
    g, R = rand_tree(rng, dtype=jnp.bfloat16), rand_tree(rng, (3,), dtype=jnp.bfloat16)
    out, ref = project(g, R, impl="auto"), project(g, R, impl="jnp")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
    np.testing.assert_allclose(vec(out), vec(ref), atol=2e-2 * np.abs(vec(ref)).max())


@pytest.mark.parametrize("per_tensor", [False, True])
def test_adam_metric_transform_default_kernel_equals_jnp(per_tensor):
    # the default impl ("auto", kernel-backed) in optax.chain under jit == the jnp core.
    rng = np.random.default_rng(4)
    kw = dict(metric="adam", b2=0.9, per_tensor=per_tensor, retain_scale=0.1)
    tx = optax.chain(pj.project_orthogonal(**kw), optax.sgd(1.0))
    tx_ref = optax.chain(pj.project_orthogonal(impl="jnp", **kw), optax.sgd(1.0))
    params = rand_tree(rng)
    s, s_ref = tx.init(params), tx_ref.init(params)
    step, step_ref = jax.jit(tx.update), jax.jit(tx_ref.update)
    for _ in range(2):
        g = jax.tree.map(lambda x: x * jnp.float32(rng.uniform(0.1, 3.0)), rand_tree(rng))
        R = rand_tree(rng, (2,))
        u, s = step(g, s, params, retain_grads=R)
        u_ref, s_ref = step_ref(g, s_ref, params, retain_grads=R)
        np.testing.assert_allclose(vec(u), vec(u_ref), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(vec(s[0].nu), vec(s_ref[0].nu), rtol=1e-6)


def test_auto_falls_back_to_jnp_where_kernels_do_not_apply():
    rng = np.random.default_rng(6)
    # float16 leaves: the kernels take float32/bfloat16 only; "auto" uses the jnp core.
    g16, R16 = rand_tree(rng, dtype=jnp.float16), rand_tree(rng, (3,), dtype=jnp.float16)
    out = project(g16, R16)
    assert all(x.dtype == jnp.float16 for x in jax.tree.leaves(out))
    np.testing.assert_allclose(vec(out), vec(project(g16, R16, impl="jnp")), atol=1e-6)
    with pytest.raises(TypeError, match="float32 and bfloat16"):
        project(g16, R16, impl="xla")
    # k = 3 retain gradients of a 2-parameter update (global subspace): the whole space
    g2, R2 = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
    np.testing.assert_allclose(vec(project(g2, R2)), [0.0, 0.0], atol=1e-5)
    with pytest.raises(ValueError, match="exceed"):
        project(g2, R2, impl="xla")
    with pytest.raises(ValueError, match="unknown projection impl"):
        pj.orthogonal_projection(g2, R2, impl="reference")


def test_single_rank_rule_shared_by_all_cores():
    # gram_pinv_coefficients is the kernel module's pinv_solve (one implementation).
    assert pj.gram_pinv_coefficients is kp.pinv_solve
    assert pj.DEFAULT_RCOND == kp.DEFAULT_RCOND == 1e-6


# ---------------------------------------------------------------- project_tree, the core
# Tolerances against float64 numpy: float32 rtol 1e-5 (atol 1e-5 * max|ref|); bfloat16
# rtol 2e-2 (atol 2e-2 * max|ref|), the reference from the same bf16 values.




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
    return lstsq_project(g, R)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_project_tree_orthogonal_idempotent_and_dense(impl):
    g, r = _trees(3)
    out = project_tree(g, r, impl=impl, block_p=32)
    assert jax.tree.structure(out) == jax.tree.structure(g)
    for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
        assert o.shape == x.shape and o.dtype == x.dtype
    gf, Rf, of = _flat(g), _flat(r, 3), _flat(out)
    rel = np.abs(Rf @ of) / (np.linalg.norm(gf) * np.linalg.norm(Rf, axis=1))
    assert rel.max() <= 1e-5, rel
    _close(of, _dense_projection(gf, Rf), jnp.float32)
    twice = _flat(project_tree(out, r, impl=impl, block_p=32))
    np.testing.assert_allclose(twice, of, atol=1e-5 * np.abs(of).max())


def test_project_tree_k1_formula():
    g, r = _trees(1)
    out = _flat(project_tree(g, r, impl="pallas", block_p=32))
    gf, rf = _flat(g), _flat(r, 1)[0]
    _close(out, gf - (gf @ rf) / (rf @ rf) * rf, jnp.float32)


def test_project_tree_duplicated_and_zero_retain_vectors():
    g, r = _trees(2)
    dup = jax.tree.map(lambda x: jnp.concatenate([x, x[:1], 2.0 * x[1:]], axis=0), r)  # rows r0, r1, r0, 2 r1
    out = project_tree(g, dup, impl="pallas", block_p=32)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    # the same as projecting on the two distinct vectors
    _close(_flat(out), _dense_projection(_flat(g), _flat(r, 2)), jnp.float32)
    zero = jax.tree.map(jnp.zeros_like, r)
    same = project_tree(g, zero, impl="xla")
    for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(g)):
        np.testing.assert_array_equal(x, y)


def test_project_tree_bfloat16():
    g, r = _trees(3, jnp.bfloat16)
    out = project_tree(g, r, impl="pallas", block_p=32)
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
            lambda g, r: project_tree(g, r, impl=impl, block_p=8, axis_name="x"),
            mesh=mesh,
            in_specs=(specs_g, specs_r),
            out_specs=specs_g,
            check_vma=check_vma,
        )
    )
    out = f(g, r)
    _close(_flat(out), _dense_projection(_flat(g), _flat(r, 2)), jnp.float32)


def test_tree_errors():
    g, r = _trees(3)
    with pytest.raises(ValueError, match="empty pytree"):
        project_tree({}, {})
    with pytest.raises(ValueError, match="pytree mismatch"):
        project_tree(g, {"w": r["w"]})
    with pytest.raises(ValueError, match=r"must have shape \(k, "):
        project_tree(g, {**r, "w": r["w"][:, :5]})
    with pytest.raises(ValueError, match="same leading k"):
        project_tree(g, {**r, "w": r["w"][:2]})
    with pytest.raises(ValueError, match="exceed the number of parameters"):  # "auto" takes the jnp core there
        project_tree({"a": jnp.ones(2)}, {"a": jnp.ones((3, 2))}, impl="xla")
    with pytest.raises(ValueError, match="rcond"):
        project_tree(g, r, rcond=1.5)
    with pytest.raises(TypeError, match="only float32 and bfloat16"):
        project_tree({"a": jnp.ones(4, jnp.float16)}, {"a": jnp.ones((1, 4), jnp.float16)}, impl="pallas")
    with pytest.raises(ValueError, match="unknown projection impl"):
        project_tree(g, r, impl="cuda")
    with pytest.raises(ValueError, match="one per leaf"):
        project_tree(g, r, axis_name=["x"])
    with pytest.raises(ValueError, match="axis_name entries"):
        project_tree(g, r, axis_name=3)
    with pytest.raises(ValueError, match="callable"):
        project_tree(g, r, impl=lambda g, r, *, rcond: g, axis_name="x")


def test_project_tree_per_leaf_axes_under_shard_map():
    # one leaf split over "x", one replicated: only the split leaf's partials are psum-ed
    # (a psum of the replicated one would count it 4 times), and the row maxima likewise.
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(5)
    g = {"a": jnp.asarray(rng.standard_normal(64), jnp.float32), "b": jnp.asarray(rng.standard_normal(6), jnp.float32)}
    r = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal((2, *x.shape)) * 1e19, jnp.float32), g)
    for per_tensor in (False, True):
        f = jax.jit(jax.shard_map(
            lambda g, r: project_tree(g, r, impl="xla", per_tensor=per_tensor, axis_name=["x", None]),
            mesh=mesh, in_specs=({"a": PS("x"), "b": PS()}, {"a": PS(None, "x"), "b": PS()}),
            out_specs={"a": PS("x"), "b": PS()}))
        ref = project_tree(g, r, impl="jnp", per_tensor=per_tensor)
        np.testing.assert_allclose(_flat(f(g, r)), _flat(ref), rtol=1e-5, atol=1e-5 * np.abs(_flat(ref)).max())
    np.testing.assert_allclose(_flat(ref)[:64], _dense_projection(_flat(g)[:64], _flat(r, 2)[:, :64]), atol=1e-5)
