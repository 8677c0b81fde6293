import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.losses import (
    grad_diff,
    gradient_ascent,
    kl_to_reference,
    npo,
    sequence_nll,
    simnpo,
)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_gradient_ascent_and_grad_diff_vs_numpy():
    f, r = _rng().uniform(1, 10, size=5), _rng(1).uniform(1, 10, size=3)
    np.testing.assert_allclose(jax.jit(gradient_ascent)(jnp.asarray(f, jnp.float32)), -f.mean(), rtol=1e-6)
    out = jax.jit(functools.partial(grad_diff, gamma=0.5, alpha=2.0))(jnp.asarray(f, jnp.float32), jnp.asarray(r, jnp.float32))
    np.testing.assert_allclose(out, -0.5 * f.mean() + 2.0 * r.mean(), rtol=1e-6)
    g = jax.grad(gradient_ascent)(jnp.asarray(f, jnp.float32))
    np.testing.assert_allclose(g, -np.ones(5) / 5, rtol=1e-6)  # descent raises every NLL


def test_npo_value_and_gradient_closed_form():
    beta = 0.1
    lp = _rng(2).normal(-20, 5, size=6)
    ref = _rng(3).normal(-20, 5, size=6)
    d = lp - ref
    val, (g, gref) = jax.jit(jax.value_and_grad(functools.partial(npo, beta=beta), argnums=(0, 1)))(
        jnp.asarray(lp, jnp.float32), jnp.asarray(ref, jnp.float32)
    )
    # -(2/b) log sigmoid(-b d) = (2/b) log(1 + exp(b d))
    np.testing.assert_allclose(val, (2 / beta) * np.mean(np.logaddexp(0.0, beta * d)), rtol=1e-5)
    np.testing.assert_allclose(g, (2 / 6) * _sigmoid(beta * d), rtol=1e-5)
    np.testing.assert_array_equal(gref, np.zeros(6))  # the reference is a constant


def test_npo_at_reference_equals_gradient_ascent():
    lp = jnp.asarray(_rng(4).normal(-15, 3, size=4), jnp.float32)
    val, g = jax.value_and_grad(functools.partial(npo, beta=0.1))(lp, lp)
    np.testing.assert_allclose(val, 20 * np.log(2.0), rtol=1e-6)
    # GA in terms of log p: L = -mean(NLL) = mean(log p), gradient 1/B
    g_ga = jax.grad(lambda l: gradient_ascent(-l))(lp)
    np.testing.assert_allclose(g, g_ga, rtol=1e-6)
    np.testing.assert_allclose(g, np.full(4, 0.25), rtol=1e-6)


def test_npo_is_stable_for_large_ratios():
    lp = jnp.array([1e4, -1e4, 0.0], jnp.float32)
    val, g = jax.value_and_grad(functools.partial(npo, beta=1.0))(lp, jnp.zeros(3))
    assert np.isfinite(val) and np.all(np.isfinite(g))
    np.testing.assert_allclose(val, 2 * (1e4 + 0.0 + np.log(2.0)) / 3, rtol=1e-5)


def test_simnpo_value_gradient_and_direction():
    beta, delta = 4.5, 0.3
    nll = _rng(5).uniform(0.5, 6, size=5)
    n = np.array([3, 7, 1, 12, 5], np.float64)
    x = nll / n
    f = jax.jit(jax.value_and_grad(functools.partial(simnpo, beta=beta, delta=delta)))
    val, g = f(jnp.asarray(nll, jnp.float32), jnp.asarray(n, jnp.int32))
    # -(2/b) log sigmoid(b (x - delta)) = (2/b) log(1 + exp(-b (x - delta)))
    np.testing.assert_allclose(val, (2 / beta) * np.mean(np.logaddexp(0.0, -beta * (x - delta))), rtol=1e-5)
    np.testing.assert_allclose(g, -(2 / (5 * n)) * _sigmoid(-beta * (x - delta)), rtol=1e-5)
    assert np.all(np.asarray(g) < 0)
    # one gradient-descent step on the loss increases every example's NLL and lowers the loss
    nll32 = jnp.asarray(nll, jnp.float32)
    nll2 = nll32 - 1.0 * g
    assert np.all(np.asarray(nll2) > np.asarray(nll32))
    assert f(nll2, jnp.asarray(n, jnp.int32))[0] < val


def test_simnpo_paper_parametrisation():
    # paper: -(2/b) log sigmoid(-(b/|y|) log p - gamma) with gamma = b * delta and log p = -NLL
    beta, delta = 2.5, 0.2
    nll, n = np.array([4.0, 9.0]), np.array([2.0, 3.0])
    logp = -nll
    paper = -(2 / beta) * np.mean(np.log(_sigmoid(-(beta / n) * logp - beta * delta)))
    np.testing.assert_allclose(simnpo(jnp.asarray(nll, jnp.float32), jnp.asarray(n, jnp.float32), beta=beta, delta=delta), paper, rtol=1e-5)


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kl_to_reference_vs_numpy_loop(dtype):
    B, T, V = 2, 5, 7
    logits = _rng(6).normal(size=(B, T, V)) * 2
    ref_logits = _rng(7).normal(size=(B, T, V)) * 2
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], np.float32)
    lj, rj = jnp.asarray(logits, dtype), jnp.asarray(ref_logits, dtype)
    out = jax.jit(kl_to_reference)(lj, rj, jnp.asarray(mask))
    L = _np_log_softmax(np.asarray(lj, np.float64))
    R = _np_log_softmax(np.asarray(rj, np.float64))
    num, den = 0.0, 0.0
    for b in range(B):
        for t in range(1, T):  # token t is predicted by position t - 1
            if mask[b, t]:
                num += np.sum(np.exp(R[b, t - 1]) * (R[b, t - 1] - L[b, t - 1]))
                den += 1
    np.testing.assert_allclose(out, num / den, rtol=1e-5)
    # direction: KL(p_ref || p_theta), not KL(p_theta || p_ref)
    rev = sum(np.sum(np.exp(L[b, t - 1]) * (L[b, t - 1] - R[b, t - 1])) for b in range(B) for t in range(1, T) if mask[b, t]) / den
    assert abs(rev - num / den) > 1e-2


def test_kl_zero_at_reference_and_gradient_only_through_model():
    logits = jnp.asarray(_rng(8).normal(size=(1, 4, 5)), jnp.float32)
    mask = jnp.ones((1, 4))
    np.testing.assert_allclose(kl_to_reference(logits, logits + 3.0, mask), 0.0, atol=1e-6)
    g_ref = jax.grad(kl_to_reference, argnums=1)(logits, logits * 2, mask)
    np.testing.assert_array_equal(g_ref, np.zeros((1, 4, 5)))


def test_npo_from_sequence_nll():
    # the documented wiring: log p = -sequence_nll
    B, T, V = 2, 4, 6
    logits = jnp.asarray(_rng(9).normal(size=(B, T, V)), jnp.float32)
    ref_logits = jnp.asarray(_rng(10).normal(size=(B, T, V)), jnp.float32)
    ids = jnp.asarray(_rng(11).integers(0, V, size=(B, T)), jnp.int32)
    m = jnp.asarray([[0, 1, 1, 1], [0, 0, 1, 1]], jnp.float32)
    lp, rp = -sequence_nll(logits, ids, m), -sequence_nll(ref_logits, ids, m)
    L, R = _np_log_softmax(np.asarray(logits, np.float64)), _np_log_softmax(np.asarray(ref_logits, np.float64))
    idn, mn = np.asarray(ids), np.asarray(m)
    lpn = np.array([sum(L[b, t - 1, idn[b, t]] * mn[b, t] for t in range(1, T)) for b in range(B)])
    rpn = np.array([sum(R[b, t - 1, idn[b, t]] * mn[b, t] for t in range(1, T)) for b in range(B)])
    np.testing.assert_allclose(npo(lp, rp, beta=0.5), 4 * np.mean(np.logaddexp(0, 0.5 * (lpn - rpn))), rtol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        npo(jnp.zeros(3), jnp.zeros(4))
    with pytest.raises(ValueError, match="beta"):
        npo(jnp.zeros(3), jnp.zeros(3), beta=0.0)
    with pytest.raises(ValueError, match="same shape"):
        simnpo(jnp.zeros(3), jnp.ones(2))
    with pytest.raises(ValueError, match="empty batch"):
        gradient_ascent(jnp.zeros((0,)))
    with pytest.raises(ValueError, match="ref_logits"):
        kl_to_reference(jnp.zeros((1, 3, 4)), jnp.zeros((1, 3, 5)), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="loss_mask"):
        kl_to_reference(jnp.zeros((1, 3, 4)), jnp.zeros((1, 3, 4)), jnp.ones((1, 4)))
