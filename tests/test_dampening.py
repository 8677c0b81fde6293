import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.dampening import ssd, ssd_factors


def test_hand_computed_case():
    params = {"w": jnp.array([2.0, 2.0, 2.0, 2.0, -4.0, 3.0])}
    i_f = {"w": jnp.array([10.0, 10.0, 10.0, 0.0, 50.0, 5.0])}
    i_d = {"w": jnp.array([0.5, 1.0, 2.0, 0.0, 4.0, 0.0])}
    # alpha = 4, lam = 2:
    #  0: 10 > 2   -> beta = min(2*0.5/10, 1) = 0.1 -> 0.2
    #  1: 10 > 4   -> beta = min(2*1/10, 1)   = 0.2 -> 0.4
    #  2: 10 > 8   -> beta = min(2*2/10, 1)   = 0.4 -> 0.8
    #  3: 0 > 0 false -> unchanged
    #  4: 50 > 16  -> beta = min(2*4/50, 1)   = 0.16 -> -0.64
    #  5: 5 > 0    -> beta = min(0/5, 1)      = 0   -> 0
    out = jax.jit(functools.partial(ssd, alpha=4.0, lam=2.0))(params, i_f, i_d)
    np.testing.assert_allclose(out["w"], [0.2, 0.4, 0.8, 2.0, -0.64, 0.0], rtol=1e-6)
    # lam large enough that min(., 1) clips: selected but not dampened
    out = ssd(params, i_f, i_d, alpha=4.0, lam=100.0)
    np.testing.assert_allclose(out["w"], [2.0, 2.0, 2.0, 2.0, -4.0, 0.0], rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_loop_reference(dtype):
    rng = np.random.default_rng(0)
    shapes = {"k": (5, 6), "b": (6,)}
    p = {k: rng.normal(size=s) for k, s in shapes.items()}
    f = {k: rng.exponential(size=s) ** 3 for k, s in shapes.items()}
    d = {k: rng.exponential(size=s) * 0.05 for k, s in shapes.items()}
    out = jax.jit(ssd)(
        {k: jnp.asarray(v, dtype) for k, v in p.items()},
        {k: jnp.asarray(v, jnp.float32) for k, v in f.items()},
        {k: jnp.asarray(v, jnp.float32) for k, v in d.items()},
    )
    fac = ssd_factors(
        {k: jnp.asarray(v, jnp.float32) for k, v in f.items()},
        {k: jnp.asarray(v, jnp.float32) for k, v in d.items()},
    )
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    for k in shapes:
        assert out[k].dtype == dtype
        pf = np.asarray(jnp.asarray(p[k], dtype), np.float64).ravel()
        ff = np.asarray(jnp.asarray(f[k], jnp.float32), np.float64).ravel()
        dd = np.asarray(jnp.asarray(d[k], jnp.float32), np.float64).ravel()
        ref, beta = pf.copy(), np.ones_like(pf)
        for i in range(pf.size):
            if ff[i] > 10.0 * dd[i]:
                beta[i] = min(1.0 * dd[i] / ff[i], 1.0)
                ref[i] = pf[i] * beta[i]
        np.testing.assert_allclose(np.asarray(out[k], np.float64).ravel(), ref, rtol=tol, atol=1e-7)
        np.testing.assert_allclose(np.asarray(fac[k]).ravel(), beta, rtol=1e-5)
        assert 0 < np.sum(beta < 1) < pf.size  # the case exercises both branches


def test_bad_input():
    p = {"a": jnp.ones((3,)), "b": jnp.ones((2, 2))}
    i = {"a": jnp.ones((3,)), "b": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="shape mismatch at 'b'"):
        ssd(p, dict(i, b=jnp.ones((4,))), i)
    with pytest.raises(ValueError, match="params has leaf 'a' that importance_full lacks"):
        ssd(p, i, {"b": jnp.ones((2, 2))})
    with pytest.raises(FloatingPointError, match="importance_forget has Inf values at 'a'"):
        ssd(p, dict(i, a=jnp.array([1.0, jnp.inf, 0.0])), i)
    with pytest.raises(ValueError, match="importance_full must be >= 0.*'b'"):
        ssd(p, i, dict(i, b=-jnp.ones((2, 2))))
    with pytest.raises(ValueError, match="alpha"):
        ssd(p, i, i, alpha=-1.0)
