import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxunlearn import tree as jt


def _trees(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    a = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,)), "nested": (rng.normal(size=(2,)),)}
    b = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,)), "nested": (rng.normal(size=(2,)),)}
    cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)  # noqa: E731
    return cast(a), cast(b), a, b


def _flat_np(t):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])


def test_arithmetic_matches_numpy():
    a, b, na, nb = _trees()
    f = jax.jit(lambda a, b: (jt.add(a, b), jt.sub(a, b), jt.mul(a, b), jt.div(a, b), jt.scale(a, 2.5),
                              jt.axpy(-0.5, a, b), jt.neg(a)))
    add, sub, mul, div, sc, ax, ng = f(a, b)
    fa, fb = _flat_np(na), _flat_np(nb)
    np.testing.assert_allclose(_flat_np(add), fa + fb, rtol=1e-6)
    np.testing.assert_allclose(_flat_np(sub), fa - fb, rtol=1e-6)
    np.testing.assert_allclose(_flat_np(mul), fa * fb, rtol=1e-6)
    np.testing.assert_allclose(_flat_np(div), fa / fb, rtol=1e-5)
    np.testing.assert_allclose(_flat_np(sc), 2.5 * fa, rtol=1e-6)
    np.testing.assert_allclose(_flat_np(ax), -0.5 * fa + fb, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_flat_np(ng), -fa)


def test_reductions_match_numpy_and_accumulate_in_f32():
    a, b, na, nb = _trees()
    fa, fb = _flat_np(na), _flat_np(nb)
    np.testing.assert_allclose(jax.jit(jt.dot)(a, b), fa @ fb, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(jt.global_norm)(a), np.linalg.norm(fa), rtol=1e-5)
    np.testing.assert_allclose(jax.jit(jt.sum)(a), fa.sum(), rtol=1e-5, atol=1e-5)
    assert jt.size(a) == fa.size == 18
    # bf16 leaves: result is float32 and close to the float64 value of the rounded inputs.
    ab, bb = jt.cast(a, jnp.bfloat16), jt.cast(b, jnp.bfloat16)
    d = jax.jit(jt.dot)(ab, bb)
    assert d.dtype == jnp.float32
    ref = _flat_np(jt.cast(ab, jnp.float32)) @ _flat_np(jt.cast(bb, jnp.float32))
    np.testing.assert_allclose(d, ref, rtol=1e-5)


def test_scale_keeps_dtype():
    a, _, _, _ = _trees(dtype=jnp.bfloat16)
    out = jt.scale(a, jnp.float32(3.0))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


def test_ravel_roundtrip_and_unravel_like():
    a, _, na, _ = _trees()
    vec, unravel = jt.ravel(a)
    assert vec.shape == (18,)
    np.testing.assert_allclose(np.sort(vec), np.sort(_flat_np(na)), rtol=1e-6)
    back = unravel(vec)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), back, a)
    back2 = jt.unravel_like(vec * 2, a)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, 2 * y), back2, a)
    with pytest.raises(ValueError, match="18 elements"):
        jt.unravel_like(jnp.zeros(5), a)


def test_structure_mismatch_names_path():
    a = {"layer": {"w": jnp.zeros(3), "b": jnp.zeros(2)}}
    b = {"layer": {"w": jnp.zeros(3)}}
    with pytest.raises(ValueError, match="layer/b"):
        jt.check_same_structure(a, b, ("base", "finetuned"))
    with pytest.raises(ValueError, match="finetuned"):
        jt.check_same_structure(b, a, ("finetuned", "base"))


def test_shape_and_dtype_mismatch_names_path():
    a = {"x": [jnp.zeros((2, 3)), jnp.zeros(4)]}
    b = {"x": [jnp.zeros((2, 3)), jnp.zeros(5)]}
    with pytest.raises(ValueError, match=r"x/1.*\(4,\).*\(5,\)"):
        jt.check_same_shapes(a, b)
    c = {"x": [jnp.zeros((2, 3)), jnp.zeros(4, jnp.bfloat16)]}
    jt.check_same_shapes(a, c)  # dtypes not checked by default
    with pytest.raises(ValueError, match="dtype mismatch at 'x/1'"):
        jt.check_same_shapes(a, c, dtypes=True)


def test_check_finite_and_nonempty():
    good = {"a": jnp.ones(3), "i": jnp.arange(3)}
    jt.check_finite(good)
    with pytest.raises(FloatingPointError, match="NaN values at 'b'"):
        jt.check_finite({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.nan])}, "grads")
    with pytest.raises(FloatingPointError, match="Inf"):
        jt.check_finite({"a": jnp.array([jnp.inf])})
    with pytest.raises(ValueError, match="empty"):
        jt.check_nonempty({})
    # inside jit the check is skipped rather than failing on tracers
    jax.jit(lambda t: (jt.check_finite(t), t)[1])(good)


def test_works_on_nnx_state():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    _, params = nnx.split(model, nnx.Param)
    doubled = jt.scale(params, 2.0)
    np.testing.assert_allclose(doubled["kernel"][...], 2 * params["kernel"][...])
    names = [p for p, _ in jt.leaves_with_paths(params)]
    assert sorted(names) == ["bias", "kernel"]
    np.testing.assert_allclose(jt.sq_norm(params), jt.dot(params, params))
