import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxunlearn.task_vector import (
    apply_task_vector,
    perta,
    perta_weights,
    ratio_weight_fn,
    task_vector,
)

SHAPES = {"w": (3, 4), "b": (4,), "nested": ((2, 2),)}


def _np_tree(seed, positive=False):
    rng = np.random.default_rng(seed)
    f = (lambda s: rng.uniform(0.0, 2.0, size=s)) if positive else (lambda s: rng.normal(size=s))
    return {"w": f((3, 4)), "b": f((4,)), "nested": (f((2, 2)),)}


def _j(t, dtype=jnp.float32):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), t)


def _flat(t):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_task_vector_and_negation_match_numpy(dtype):
    nb, nf = _np_tree(0), _np_tree(1)
    base, ft = _j(nb, dtype), _j(nf, dtype)
    tau = jax.jit(task_vector)(ft, base)
    out = jax.jit(apply_task_vector)(base, tau, -1.5)
    for x in jax.tree.leaves((tau, out)):
        assert x.dtype == dtype
    b64 = _flat(jax.tree.map(lambda x: np.asarray(x, np.float64), base))
    f64 = _flat(jax.tree.map(lambda x: np.asarray(x, np.float64), ft))
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(_flat(tau), f64 - b64, rtol=tol, atol=tol)
    np.testing.assert_allclose(_flat(out), b64 - 1.5 * _flat(tau), rtol=tol, atol=tol)


def test_apply_task_vector_pytree_scale_vs_numpy():
    nb, nt, ns = _np_tree(0), _np_tree(1), _np_tree(2)
    ns["b"] = np.float32(0.7)  # a scalar leaf broadcasts to its parameter
    ns["nested"] = (np.asarray([[0.5], [-2.0]]),)  # broadcasting leaf, shape (2, 1)
    out = jax.jit(apply_task_vector)(_j(nb), _j(nt), _j(ns))
    np.testing.assert_allclose(out["w"], nb["w"] + ns["w"] * nt["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["b"], nb["b"] + 0.7 * nt["b"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        out["nested"][0], nb["nested"][0] + ns["nested"][0] * nt["nested"][0], rtol=1e-5, atol=1e-6
    )


def test_apply_task_vector_traced_scalar_scale():
    nb, nt = _np_tree(0), _np_tree(1)
    out = jax.jit(apply_task_vector)(_j(nb), _j(nt), jnp.float32(-0.25))
    np.testing.assert_allclose(_flat(out), _flat(nb) - 0.25 * _flat(nt), rtol=1e-5, atol=1e-6)


def test_works_on_nnx_state():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 2, rngs=rngs)

    base = nnx.state(M(nnx.Rngs(0)), nnx.Param)
    ft = nnx.state(M(nnx.Rngs(1)), nnx.Param)
    tau = jax.jit(task_vector)(ft, base)
    out = jax.jit(apply_task_vector)(base, tau, 1.0)  # base + (ft - base) = ft
    np.testing.assert_allclose(_flat(out), _flat(ft), rtol=1e-6, atol=1e-6)


def test_perta_weights_closed_form_and_range():
    nf, nr = _np_tree(3, positive=True), _np_tree(4, positive=True)
    w = jax.jit(functools.partial(perta_weights, retain_scale=2.0, eps=1e-6))(_j(nf), _j(nr))
    ref = _flat(nf) / (_flat(nf) + 2.0 * _flat(nr) + 1e-6)
    np.testing.assert_allclose(_flat(w), ref, rtol=1e-6)
    assert np.all((_flat(w) >= 0) & (_flat(w) <= 1))


def test_perta_weights_invariant_to_joint_scaling():
    f, r = _j(_np_tree(3, positive=True)), _j(_np_tree(4, positive=True))
    fn = jax.jit(functools.partial(perta_weights, eps=0.0))
    w1 = fn(f, r)
    w2 = fn(jax.tree.map(lambda x: 1e3 * x, f), jax.tree.map(lambda x: 1e3 * x, r))
    np.testing.assert_allclose(_flat(w1), _flat(w2), rtol=1e-6)


def test_perta_weights_zero_importances_give_zero_weight():
    z = _j(jax.tree.map(np.zeros_like, _np_tree(0)))
    w = perta_weights(z, z, eps=0.0)
    assert np.all(_flat(w) == 0.0)


def test_perta_all_weight_one_is_negation():
    base, ft = _j(_np_tree(0)), _j(_np_tree(1))
    tau = task_vector(ft, base)
    i_f = _j(_np_tree(3, positive=True))
    i_r = jax.tree.map(jnp.zeros_like, i_f)  # w = I_f / (I_f + 0 + 0) = 1 wherever I_f > 0
    out = jax.jit(functools.partial(perta, strength=3.5, eps=0.0))(base, tau, i_f, i_r)
    neg = apply_task_vector(base, tau, -3.5)
    np.testing.assert_allclose(_flat(out), _flat(neg), rtol=1e-6, atol=1e-6)


def test_perta_zero_forget_importance_is_base():
    base, ft = _j(_np_tree(0)), _j(_np_tree(1))
    tau = task_vector(ft, base)
    i_r = _j(_np_tree(4, positive=True))
    out = perta(base, tau, jax.tree.map(jnp.zeros_like, i_r), i_r, strength=3.5)
    np.testing.assert_array_equal(_flat(out), _flat(base))


def test_perta_matches_numpy_with_weight_fn():
    nb, nft = _np_tree(0), _np_tree(1)
    nf, nr = _np_tree(3, positive=True), _np_tree(4, positive=True)
    base, ft = _j(nb), _j(nft)
    tau = task_vector(ft, base)
    fn = ratio_weight_fn(power=2.0, retain_scale=0.5, eps=1e-9)
    out = jax.jit(functools.partial(perta, strength=2.0, weight_fn=fn))(base, tau, _j(nf), _j(nr))
    F, R = _flat(nf), _flat(nr)
    w = F**2 / (F**2 + (0.5 * R) ** 2 + 1e-9)
    ref = _flat(nb) - 2.0 * w * (_flat(nft) - _flat(nb))
    np.testing.assert_allclose(_flat(out), ref, rtol=1e-5, atol=1e-5)
    # default weights == ratio_weight_fn(power=1) == a perta_weights partial
    a = perta(base, tau, _j(nf), _j(nr), strength=2.0, retain_scale=0.5)
    b = perta(base, tau, _j(nf), _j(nr), strength=2.0, weight_fn=ratio_weight_fn(1.0, retain_scale=0.5))
    np.testing.assert_allclose(_flat(a), _flat(b), rtol=1e-6, atol=1e-7)


def test_perta_bfloat16_params_float32_importances():
    base, ft = _j(_np_tree(0), jnp.bfloat16), _j(_np_tree(1), jnp.bfloat16)
    tau = task_vector(ft, base)
    nf, nr = _np_tree(3, positive=True), _np_tree(4, positive=True)
    out = jax.jit(functools.partial(perta, strength=1.0))(base, tau, _j(nf), _j(nr))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
    w = _flat(nf) / (_flat(nf) + _flat(nr) + 1e-12)
    ref = _flat(base) - w * _flat(tau)
    np.testing.assert_allclose(_flat(out), ref, rtol=2e-2, atol=2e-2)


def test_errors_name_the_problem():
    base, ft = _j(_np_tree(0)), _j(_np_tree(1))
    bad = dict(ft, w=jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="'w'"):
        task_vector(bad, base)
    missing = {"w": ft["w"], "b": ft["b"]}
    with pytest.raises(ValueError, match="nested"):
        task_vector(missing, base)
    with pytest.raises(ValueError, match="dtype mismatch at 'b'"):
        task_vector(dict(ft, b=ft["b"].astype(jnp.bfloat16)), base)
    with pytest.raises(ValueError, match="does not broadcast"):
        apply_task_vector(base, ft, dict(ft, b=jnp.ones((3,))))
    i = _j(_np_tree(3, positive=True))
    with pytest.raises(FloatingPointError, match="importance_retain has NaN values at 'nested/0'"):
        perta_weights(i, dict(i, nested=(jnp.full((2, 2), jnp.nan),)))
    with pytest.raises(ValueError, match="importance_forget must be >= 0.*'b'"):
        perta_weights(dict(i, b=-i["b"]), i)
    with pytest.raises(ValueError, match="shape mismatch at 'w'"):
        perta(base, task_vector(ft, base), dict(i, w=jnp.ones((2, 2))), i, strength=1.0)
    with pytest.raises(ValueError, match="power"):
        ratio_weight_fn(0.0)


def test_sharded_perta_matches_unsharded():
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(5)
    mk = lambda: {"w": jnp.asarray(rng.uniform(0, 1, size=(8, 4)), jnp.float32)}  # noqa: E731
    base, ft, i_f, i_r = mk(), mk(), mk(), mk()
    sh = lambda t: {"w": jax.device_put(t["w"], NamedSharding(mesh, P("d", None)))}  # noqa: E731
    f = jax.jit(lambda b, t, f_, r: perta(b, task_vector(t, b), f_, r, strength=2.0))
    out = f(sh(base), sh(ft), sh(i_f), sh(i_r))
    np.testing.assert_allclose(out["w"], f(base, ft, i_f, i_r)["w"], rtol=1e-6)
    assert out["w"].sharding.spec == P("d", None) or len(out["w"].sharding.device_set) == 8
