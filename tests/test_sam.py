import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxunlearn.estimators import plain_estimator, saf_estimator, sam_estimator
from jaxunlearn.quant import fake_quantize
from jaxunlearn.sam import (
    saf_loss,
    saf_perturbation_radius,
    sam,
    sam_gradient,
    sam_perturbation,
)


def _params(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(4, 8)), dtype), "b": jnp.asarray(rng.normal(size=(8,)), dtype)}


def _np(t):
    return {k: np.asarray(v, np.float64) for k, v in t.items()}


# A loss with a hand-written gradient (the independent reference):
#   L(w, b) = sum(w^3) / 3 + sum(sin(b)) * c,   dL/dw = w^2,  dL/db = c cos(b).
def _loss(p, c):
    return jnp.sum(p["w"].astype(jnp.float32) ** 3) / 3 + c * jnp.sum(jnp.sin(p["b"].astype(jnp.float32)))


def _grad_np(p, c):
    return {"w": p["w"] ** 2, "b": c * np.cos(p["b"])}


def _norm_np(t):
    return np.sqrt(sum(np.sum(v**2) for v in t.values()))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_perturbation_has_norm_rho_along_g(dtype):
    g = _params(1, dtype)
    e = jax.jit(functools.partial(sam_perturbation, rho=0.3))(g)
    assert all(x.dtype == dtype for x in jax.tree.leaves(e))
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(_norm_np(_np(e)), 0.3, rtol=tol)
    gn = _np(g)
    for k in gn:
        np.testing.assert_allclose(_np(e)[k], 0.3 * gn[k] / _norm_np(gn), rtol=tol, atol=tol)


def test_adaptive_perturbation_closed_form():
    g, p = _params(1), _params(2)
    e = jax.jit(functools.partial(sam_perturbation, rho=0.2, adaptive=True, eta=0.01))(g, params=p)
    gn, pn = _np(g), _np(p)
    T = {k: np.abs(pn[k]) + 0.01 for k in pn}
    denom = _norm_np({k: T[k] * gn[k] for k in gn})
    for k in gn:
        np.testing.assert_allclose(e[k], 0.2 * T[k] ** 2 * gn[k] / denom, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_norm_np({k: np.asarray(e[k]) / T[k] for k in gn}), 0.2, rtol=1e-5)
    with pytest.raises(ValueError, match="params"):
        sam_perturbation(g, rho=0.2, adaptive=True)


def test_zero_gradient_gives_zero_perturbation():
    z = jax.tree.map(jnp.zeros_like, _params())
    e = sam_perturbation(z, rho=0.5)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(e))


def test_sam_gradient_equals_hand_computed():
    p, c, rho = _params(3), 0.7, 0.15
    f = jax.jit(functools.partial(sam_gradient, functools.partial(lambda p, b, c: _loss(p, c), c=c), rho=rho))
    loss, g = f(p, None)
    pn = _np(p)
    g0 = _grad_np(pn, c)
    pe = {k: pn[k] + rho * g0[k] / _norm_np(g0) for k in pn}
    ref = _grad_np(pe, c)
    for k in pn:
        np.testing.assert_allclose(g[k], ref[k], rtol=1e-5, atol=1e-6)
    ref_loss = np.sum(pe["w"] ** 3) / 3 + c * np.sum(np.sin(pe["b"]))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)


def test_sam_gradient_rho_zero_is_plain_gradient_and_aux():
    p, c = _params(4), 1.3

    def loss_aux(p, batch):
        return _loss(p, c), {"n": batch}

    (loss, aux), g = jax.jit(functools.partial(sam_gradient, loss_aux, rho=0.0, has_aux=True))(p, 5)
    ref = _grad_np(_np(p), c)
    for k in ref:
        np.testing.assert_allclose(g[k], ref[k], rtol=1e-5, atol=1e-6)
    assert aux["n"] == 5
    np.testing.assert_allclose(loss, _loss(p, c), rtol=1e-6)


@pytest.mark.parametrize("opaque", [False, True])
def test_sam_optax_wrapper_one_step(opaque):
    p, c, rho, lr = _params(5), 0.4, 0.1, 0.05
    tx = sam(optax.sgd(lr), rho=rho, opaque_mode=opaque)
    state = tx.init(p)
    grad_fn = jax.grad(lambda q: _loss(q, c))

    @jax.jit
    def step(p, state):
        g = grad_fn(p)
        if opaque:
            u, state = tx.update(g, state, p, grad_fn=lambda q, _: grad_fn(q))
        else:
            u, state = tx.update(g, state, p)
        return optax.apply_updates(p, u), state

    p1, state = step(p, state)
    if not opaque:  # transparent mode: first call moves to theta + e, second does the update
        p1, state = step(p1, state)
    pn = _np(p)
    g0 = _grad_np(pn, c)
    pe = {k: pn[k] + rho * g0[k] / _norm_np(g0) for k in pn}
    ge = _grad_np(pe, c)
    for k in pn:
        np.testing.assert_allclose(p1[k], pn[k] - lr * ge[k], rtol=1e-5, atol=1e-6)


def test_saf_loss_value_and_gradient_at_quantised_perturbed_point():
    p, c, rho = _params(6), 0.9, 0.05
    f = functools.partial(saf_loss, lambda q, b: _loss(q, c), scheme="int4", block_size=8, rho=rho, min_ndim=1)
    val, g = jax.jit(jax.value_and_grad(f))(p, None)
    q = _np(fake_quantize(p, "int4", block_size=8, min_ndim=1))
    gq = _grad_np(q, c)
    qe = {k: q[k] + rho * gq[k] / _norm_np(gq) for k in q}
    ref = _grad_np(qe, c)
    for k in q:
        assert np.all(np.isfinite(g[k]))
        np.testing.assert_allclose(g[k], ref[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(val, np.sum(qe["w"] ** 3) / 3 + c * np.sum(np.sin(qe["b"])), rtol=1e-5)


def test_saf_default_radius_and_rho_zero():
    p, c = _params(7), 0.5
    r = saf_perturbation_radius(p, scheme="nf4", block_size=16)
    q = _np(fake_quantize(p, "nf4", block_size=16))
    pn = _np(p)
    # b is 1-D: unquantised; the radius is the uniform-quantiser step with the same RMS error
    n = pn["w"].size
    np.testing.assert_allclose(r, np.sqrt(12 / n) * np.sqrt(np.sum((q["w"] - pn["w"]) ** 2)), rtol=1e-5)
    loss = lambda q, b: _loss(q, c)  # noqa: E731
    g_def = jax.jit(jax.grad(functools.partial(saf_loss, loss, scheme="nf4", block_size=16)))(p, None)
    g_exp = jax.jit(jax.grad(functools.partial(saf_loss, loss, scheme="nf4", block_size=16, rho=r)))(p, None)
    for k in pn:
        np.testing.assert_allclose(g_def[k], g_exp[k], rtol=1e-6, atol=1e-7)
    g0 = jax.jit(jax.grad(functools.partial(saf_loss, loss, scheme="nf4", block_size=16, rho=0.0)))(p, None)
    ref = _grad_np(q, c)
    for k in pn:
        np.testing.assert_allclose(g0[k], ref[k], rtol=1e-5, atol=1e-6)


def test_saf_bfloat16():
    p, c = _params(8, jnp.bfloat16), 0.5
    g = jax.jit(jax.grad(functools.partial(saf_loss, lambda q, b: _loss(q, c), rho=0.01)))(p, None)
    assert all(x.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(g))


def test_bad_input():
    with pytest.raises(ValueError, match="unknown quantisation scheme"):
        saf_loss(lambda q, b: _loss(q, 1.0), _params(), None, scheme="fp3")
    with pytest.raises(ValueError, match="shape mismatch at 'w'"):
        sam_perturbation(_params(), rho=0.1, adaptive=True, params={"w": jnp.ones((2, 2)), "b": jnp.ones(8)})


def test_saf_default_radius_estimates_the_int4_step():
    # uniform weights in blocks of 64: absmax ~ 1, int4 step = absmax / 7 ~ 1/7
    x = jax.random.uniform(jax.random.key(3), (256, 64), minval=-1.0, maxval=1.0)
    r = float(saf_perturbation_radius({"w": x}, scheme="int4", block_size=64))
    # x is an (in, out) kernel: its blocks are 64 consecutive input features (rows of x.T)
    absmax = np.abs(np.asarray(x)).T.reshape(-1, 64).max(axis=1)
    np.testing.assert_allclose(r, np.mean(absmax / 7), rtol=0.05)


def test_saf_uses_the_deployment_quantiser_on_a_decoder_tree():
    """On decoder-shaped params SAF quantises only the blocks' linear kernels (as bitsandbytes does),
    and the default radius counts only those weights."""
    rng = np.random.default_rng(10)
    p = {"embed": {"embedding": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)},
         "layers": [{"mlp": {"up_proj": {"kernel": jnp.asarray(rng.normal(size=(8, 12)), jnp.float32)}}}]}

    def loss(q, b):
        return jnp.sum(q["embed"]["embedding"] ** 3) / 3 + jnp.sum(q["layers"][0]["mlp"]["up_proj"]["kernel"] ** 3) / 3

    g = jax.jit(jax.grad(functools.partial(saf_loss, loss, scheme="fp4", rho=0.0)))(p, None)
    q = fake_quantize(p, "fp4")
    np.testing.assert_array_equal(q["embed"]["embedding"], p["embed"]["embedding"])
    kq = np.asarray(q["layers"][0]["mlp"]["up_proj"]["kernel"], np.float64)
    k = np.asarray(p["layers"][0]["mlp"]["up_proj"]["kernel"], np.float64)
    assert not np.array_equal(kq, k)
    np.testing.assert_allclose(g["layers"][0]["mlp"]["up_proj"]["kernel"], kq ** 2, rtol=1e-5)
    np.testing.assert_allclose(g["embed"]["embedding"], np.asarray(p["embed"]["embedding"]) ** 2, rtol=1e-5)
    r = saf_perturbation_radius(p, scheme="fp4")
    np.testing.assert_allclose(r, np.sqrt(12 / k.size) * np.linalg.norm(kq - k), rtol=1e-5)
    with pytest.raises(ValueError, match="layout must be one of"):
        saf_estimator("nf4", layout="rows")


def test_estimators_give_the_plain_sam_and_saf_gradients():
    """The estimators of the unlearning step against the hand-written gradients above."""
    p, c, rho = _params(9), 0.8, 0.15
    loss = lambda q, b: _loss(q, c)  # noqa: E731
    pn = _np(p)
    g0 = _grad_np(pn, c)
    v, g = jax.jit(lambda q: plain_estimator()(loss, q, None))(p)
    np.testing.assert_allclose(v, _loss(p, c), rtol=1e-6)
    for k in pn:
        np.testing.assert_allclose(g[k], g0[k], rtol=1e-5, atol=1e-6)
    v, g = jax.jit(lambda q: sam_estimator(rho)(loss, q, None))(p)
    pe = {k: pn[k] + rho * g0[k] / _norm_np(g0) for k in pn}
    for k in pn:
        np.testing.assert_allclose(g[k], _grad_np(pe, c)[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v, np.sum(pe["w"] ** 3) / 3 + c * np.sum(np.sin(pe["b"])), rtol=1e-5)
    v, g = jax.jit(lambda q: saf_estimator("int4", 8, 0.05, min_ndim=1)(loss, q, None))(p)
    q = _np(fake_quantize(p, "int4", block_size=8, min_ndim=1))
    gq = _grad_np(q, c)
    qe = {k: q[k] + 0.05 * gq[k] / _norm_np(gq) for k in q}
    for k in q:
        np.testing.assert_allclose(g[k], _grad_np(qe, c)[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v, np.sum(qe["w"] ** 3) / 3 + c * np.sum(np.sin(qe["b"])), rtol=1e-5)
