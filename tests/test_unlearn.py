import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn import tree as jt
from jaxunlearn.losses import sequence_nll
from jaxunlearn.unlearn import UnlearnConfig, init_unlearn_state, make_unlearn_step
from toy_lm import bigram_apply as apply
from toy_lm import bigram_params, lm_batch

V, T = 11, 6


def _params(seed=0):
    return bigram_params(V, 5, seed=seed, bias=True)


def _batch(n, seed):
    return jax.tree.map(jnp.asarray, lm_batch(n, seed, vocab=V, seq=T, prompt=3))


def _mean_nll(p, b):
    return jnp.mean(sequence_nll(apply(p, b["input_ids"], None), b["input_ids"], b["loss_mask"]))


def _one_step(cfg, params, fb, rb, ref=None, **kw):
    step = make_unlearn_step(apply, cfg, **kw)
    state = init_unlearn_state(jt.cast(params, jnp.float32), cfg, kw.get("mask"))
    state, metrics = step(state, fb, rb, ref)
    return state.params, metrics


SGD = dict(optimizer="sgd", learning_rate=0.1, grad_clip=0.0, steps=1)


def test_ga_sgd_step_is_gradient_ascent():
    p, fb = _params(), _batch(4, 1)
    new, m = _one_step(UnlearnConfig(method="ga", **SGD), p, fb, None)
    g = jax.grad(_mean_nll)(p, fb)
    jax.tree.map(lambda a, b, c: np.testing.assert_allclose(a, b + 0.1 * c, rtol=1e-5, atol=1e-6), new, p, g)
    np.testing.assert_allclose(m["forget_loss"], -_mean_nll(p, fb), rtol=1e-6)


def test_grad_diff_combines_forget_and_retain():
    p, fb, rb = _params(), _batch(4, 1), _batch(6, 2)
    cfg = UnlearnConfig(method="grad_diff", gamma=0.5, alpha=2.0, **SGD)
    new, _ = _one_step(cfg, p, fb, rb)
    gf, gr = jax.grad(_mean_nll)(p, fb), jax.grad(_mean_nll)(p, rb)
    want = jax.tree.map(lambda x, a, b: x - 0.1 * (-0.5 * a + 2.0 * b), p, gf, gr)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new, want)


def test_npo_at_reference_equals_gradient_ascent_scaled():
    # At theta = theta_ref the NPO gradient is the GA gradient (d/dlogp = 1/B), for any beta.
    p, fb = _params(), _batch(4, 1)
    new_npo, m = _one_step(UnlearnConfig(method="npo", alpha=0.0, beta=0.3, **SGD), p, fb, None, ref=p)
    new_ga, _ = _one_step(UnlearnConfig(method="ga", **SGD), p, fb, None)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), new_npo, new_ga)
    np.testing.assert_allclose(m["forget_loss"], 2 / 0.3 * np.log(2), rtol=1e-5)


def test_projection_step_is_orthogonal_to_retain_gradient():
    p, fb, rb = _params(), _batch(4, 1), _batch(6, 2)
    cfg = UnlearnConfig(method="ga", project=True, alpha=0.0, retain_k=2, **SGD)
    new, _ = _one_step(cfg, p, fb, rb)
    delta = jt.sub(new, p)
    for half in (slice(0, None, 2), slice(1, None, 2)):  # strided micro-batches rows j::k
        r = jax.grad(_mean_nll)(p, jax.tree.map(lambda x: x[half], rb))
        cos = jt.dot(delta, r) / (jt.global_norm(delta) * jt.global_norm(r))
        assert abs(float(cos)) < 1e-5
    # and it differs from the plain GA step
    plain, _ = _one_step(UnlearnConfig(method="ga", **SGD), p, fb, None)
    assert float(jt.global_norm(jt.sub(plain, new))) > 1e-3


def test_salun_mask_freezes_masked_parameters():
    p, fb = _params(), _batch(4, 1)
    mask = jax.tree.map(lambda x: jnp.zeros_like(x), p)
    mask["W"] = jnp.ones_like(p["W"])
    new, _ = _one_step(UnlearnConfig(method="ga", **SGD), p, fb, None, mask=mask)
    np.testing.assert_array_equal(new["E"], p["E"])
    np.testing.assert_array_equal(new["b"], p["b"])
    assert not np.allclose(new["W"], p["W"])


@pytest.mark.parametrize("variant", [dict(method="simnpo"), dict(method="npo", retain_loss="kl"),
                                     dict(method="ga", sam_rho=0.05), dict(method="npo", saf=True),
                                     dict(method="grad_diff", project=True, projection_metric="adam")])
def test_variants_raise_forget_nll_over_steps(variant):
    p, fb, rb = _params(), _batch(4, 1), _batch(4, 2)
    cfg = UnlearnConfig(steps=15, learning_rate=0.05, saf_block_size=8, **variant)
    step = make_unlearn_step(apply, cfg)
    state = init_unlearn_state(p, cfg)
    for _ in range(cfg.steps):
        state, m = step(state, fb, rb, p)
    assert all(np.isfinite(float(v)) for v in m.values())
    assert float(_mean_nll(state.params, fb)) > float(_mean_nll(p, fb)) + 0.5


def test_bad_input():
    with pytest.raises(ValueError, match=r"UnlearnConfig.method must be one of .*got 'rmu'"):
        UnlearnConfig(method="rmu")
    with pytest.raises(ValueError, match="UnlearnConfig.retain_loss"):
        UnlearnConfig(retain_loss="l2")
    p, fb, rb = _params(), _batch(4, 1), _batch(5, 2)
    step = make_unlearn_step(apply, UnlearnConfig(method="npo"))
    with pytest.raises(ValueError, match="needs ref_params"):
        step(init_unlearn_state(p, UnlearnConfig()), fb, rb)
    from jaxunlearn.unlearn import UnlearnState
    aliased = UnlearnState(jnp.zeros((), jnp.int32), p, init_unlearn_state(p, UnlearnConfig()).opt_state)
    with pytest.raises(ValueError, match="ref_params leaf 'E' shares its buffer"):
        step(aliased, fb, rb, p)
    cfg = UnlearnConfig(method="ga", project=True, retain_k=2)
    with pytest.raises(ValueError, match="not divisible by retain_k=2"):
        make_unlearn_step(apply, cfg)(init_unlearn_state(p, cfg), fb, rb)
    with pytest.raises(ValueError, match="needs a retain batch"):
        cfg = UnlearnConfig(method="grad_diff")
        make_unlearn_step(apply, cfg)(init_unlearn_state(p, cfg), fb, None)
    with pytest.raises(KeyError, match="loss_mask"):
        cfg = UnlearnConfig(method="ga")
        make_unlearn_step(apply, cfg)(init_unlearn_state(p, cfg), {k: fb[k] for k in ("input_ids", "attention_mask")})
