import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxunlearn import tree as jt
from jaxunlearn.estimators import plain_estimator, saf_estimator, sam_estimator
from jaxunlearn.losses import mean_token_nll, sequence_nll
from jaxunlearn.projection import orthogonal_projection, project_orthogonal
from jaxunlearn.saliency import masked_updates
from jaxunlearn.unlearn import (UnlearnConfig, UnlearnState, forget_loss_fn,
                                retain_loss_fn, unlearner)
from toy_lm import bigram_apply as apply
from toy_lm import bigram_params, lm_batch

V, T = 11, 6


def _params(seed=0):
    return bigram_params(V, 5, seed=seed, bias=True)


def _batch(n, seed):
    b = lm_batch(n, seed, vocab=V, seq=T, prompt=2)
    for i in range(n):  # ragged answers (prompts of 2, 3, 4 tokens): pooled tokens != mean of sequences
        b["loss_mask"][i, : 2 + i % 3] = 0
    return jax.tree.map(jnp.asarray, b)


def _mean_nll(p, b):
    """The "sequence" reduction: the mean over examples of the summed answer NLL."""
    return jnp.mean(sequence_nll(apply(p, b["input_ids"], None), b["input_ids"], b["loss_mask"]))


def _token_nll(p, b):
    """The "token" reduction written out as Hugging Face computes ``model(**batch).loss``: the NLL
    of every scored token (logits at t - 1 predict token t), pooled over the whole batch."""
    ids, m = np.asarray(b["input_ids"]), np.asarray(b["loss_mask"])
    total, count = 0.0, 0
    for i in range(ids.shape[0]):
        lp = jax.nn.log_softmax(apply(p, b["input_ids"][i], None), axis=-1)
        for t in range(1, ids.shape[1]):
            if m[i, t]:
                total, count = total - lp[t - 1, ids[i, t]], count + 1
    return total / count


def _one_step(cfg, params, fb, rb, ref=None, mask=None):
    u = cfg.build(apply, mask=mask)
    state = u.init(jt.cast(params, jnp.float32))
    state, metrics = u.step(state, fb, rb, ref)
    return state.params, metrics


def _run(u, params, fb, rb, ref, steps=3):
    state = u.init(params)
    for _ in range(steps):
        state, metrics = u.step(state, fb, rb, ref)
    return state, metrics


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


SGD = dict(optimizer="sgd", learning_rate=0.1, grad_clip=0.0, steps=1)


@pytest.mark.parametrize("reduction, nll", [("token", _token_nll), ("sequence", _mean_nll)])
def test_ga_sgd_step_is_gradient_ascent(reduction, nll):
    p, fb = _params(), _batch(4, 1)
    assert abs(float(_token_nll(p, fb)) * 3 - float(_mean_nll(p, fb))) > 1e-2  # the reductions differ
    new, m = _one_step(UnlearnConfig(method="ga", nll_reduction=reduction, **SGD), p, fb, None)
    g = jax.grad(nll)(p, fb)
    jax.tree.map(lambda a, b, c: np.testing.assert_allclose(a, b + 0.1 * c, rtol=1e-5, atol=1e-6), new, p, g)
    np.testing.assert_allclose(m["forget_loss"], -nll(p, fb), rtol=1e-6)


@pytest.mark.parametrize("method", ["grad_diff", "npo", "simnpo"])
def test_retain_nll_is_hugging_face_pooled_token_mean_by_default(method):
    """open-unlearning's retain term is ``model(**retain).loss``; "sequence" keeps the old sum-per-example mean."""
    p, fb, rb = _params(), _batch(4, 1), _batch(6, 2)
    for reduction, nll in (("token", _token_nll), ("sequence", _mean_nll)):
        _, m = _one_step(UnlearnConfig(method=method, nll_reduction=reduction, **SGD), p, fb, rb, ref=p)
        np.testing.assert_allclose(m["retain_loss"], nll(p, rb), rtol=1e-6)


def test_grad_diff_combines_forget_and_retain():
    p, fb, rb = _params(), _batch(4, 1), _batch(6, 2)
    cfg = UnlearnConfig(method="grad_diff", gamma=0.5, alpha=2.0, **SGD)
    new, _ = _one_step(cfg, p, fb, rb)
    gf, gr = jax.grad(_token_nll)(p, fb), jax.grad(_token_nll)(p, rb)
    want = jax.tree.map(lambda x, a, b: x - 0.1 * (-0.5 * a + 2.0 * b), p, gf, gr)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new, want)


def test_kl_retain_term_one_sgd_step_is_exact():
    """One SGD step with retain_loss="kl" is ``theta - lr (gamma grad L_f + alpha grad KL)``, the KL
    written out here: mean over answer tokens (not examples) of sum_v p_ref (log p_ref - log p_theta),
    the distribution predicting token t being the logits at t - 1."""
    p, ref, fb, rb = _params(0), _params(5), _batch(4, 1), _batch(6, 2)
    mask = np.zeros((6, T), np.float32)
    for b, n in enumerate([1, 3, 2, 3, 1, 2]):  # ragged answers: a per-example mean would differ
        mask[b, T - n:] = 1
    rb = {**rb, "loss_mask": jnp.asarray(mask)}
    ids = np.asarray(rb["input_ids"])

    def kl(theta):
        total, count = 0.0, 0
        for b in range(ids.shape[0]):
            logits, ref_logits = apply(theta, ids[b], None), apply(ref, ids[b], None)
            for t in range(1, T):
                if mask[b, t]:
                    p_ref = jax.nn.softmax(ref_logits[t - 1])
                    total += jnp.sum(p_ref * (jnp.log(p_ref) - jax.nn.log_softmax(logits[t - 1])))
                    count += 1
        return total / count

    lr, gamma, alpha = 0.1, 0.5, 2.0
    cfg = UnlearnConfig(method="grad_diff", retain_loss="kl", gamma=gamma, alpha=alpha, **SGD)
    new, m = _one_step(cfg, p, fb, rb, ref=ref)
    g_kl, g_f = jax.grad(kl)(p), jax.grad(lambda q: -_token_nll(q, fb))(p)
    assert float(jt.global_norm(g_kl)) > 1e-2  # theta != theta_ref: the KL term moves the step
    want = jax.tree.map(lambda x, a, b: x - lr * (gamma * a + alpha * b), p, g_f, g_kl)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new, want)
    np.testing.assert_allclose(m["retain_loss"], kl(p), rtol=1e-5)


def test_npo_at_reference_equals_gradient_ascent_scaled():
    # At theta = theta_ref the NPO gradient is the GA gradient of summed NLLs (d/dlogp = 1/B), for any beta.
    p, fb = _params(), _batch(4, 1)
    new_npo, m = _one_step(UnlearnConfig(method="npo", alpha=0.0, beta=0.3, **SGD), p, fb, None, ref=p)
    new_ga, _ = _one_step(UnlearnConfig(method="ga", nll_reduction="sequence", **SGD), p, fb, None)
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
    state, m = _run(cfg.build(apply), p, fb, rb, p, steps=cfg.steps)
    assert all(np.isfinite(float(v)) for v in m.values())
    assert float(_mean_nll(state.params, fb)) > float(_mean_nll(p, fb)) + 0.5


# ---------------------------------------------------------------- composition


def _composed(cfg, mask=None):
    """``cfg.build(apply, mask=mask)`` written out with the building blocks."""
    uses_retain = cfg.uses_retain
    return unlearner(
        forget_loss_fn(apply, cfg.method, beta=cfg.beta, delta=cfg.delta, reduction=cfg.nll_reduction),
        cfg.transform(mask),
        retain_loss=retain_loss_fn(apply, cfg.retain_loss, reduction=cfg.nll_reduction) if uses_retain else None,
        estimator=(saf_estimator(cfg.saf_scheme, cfg.saf_block_size, cfg.saf_rho) if cfg.saf
                   else sam_estimator(cfg.sam_rho) if cfg.sam_rho else plain_estimator()),
        gamma=cfg.gamma, alpha=None if cfg.project else cfg.alpha, retain_k=cfg.retain_k if cfg.project else None,
        apply_fn=apply, forget_ref_logp=cfg.method == "npo",
        retain_ref_logits=uses_retain and cfg.retain_loss == "kl")


@pytest.mark.parametrize("variant", [
    dict(method="npo", beta=0.3, retain_loss="kl", sam_rho=0.05, gamma=0.7, alpha=1.5),
    dict(method="simnpo", saf=True, saf_block_size=8, saf_rho=0.01, delta=0.2),
    dict(method="grad_diff", project=True, retain_k=3, projection_per_tensor=True, warmup_steps=2, mask=True),
    dict(method="grad_diff", nll_reduction="sequence", alpha=0.3),
])
def test_composed_unlearner_equals_the_preset(variant):
    p, ref, fb, rb = _params(), _params(7), _batch(4, 1), _batch(6, 2)
    variant = dict(variant)
    mask = jax.tree.map(lambda x: (jnp.arange(x.size).reshape(x.shape) % 2).astype(jnp.float32), p) \
        if variant.pop("mask", False) else None
    cfg = UnlearnConfig(learning_rate=0.05, **variant)
    preset, composed = cfg.build(apply, mask=mask), _composed(cfg, mask)
    assert (preset.uses_retain, preset.needs_reference) == (composed.uses_retain, composed.needs_reference)
    s1, m1 = _run(preset, p, fb, rb, ref)
    s2, m2 = _run(composed, p, fb, rb, ref)
    _assert_trees_equal(s1, s2)
    _assert_trees_equal(m1, m2)


def test_custom_forget_loss_retain_loss_estimator_and_transform():
    """Any losses, any estimator (here sign-SGD's), any optax transform."""
    p, fb, rb = _params(), _batch(4, 1), _batch(6, 2)
    p0 = jax.tree.map(jnp.copy, p)

    def f_loss(q, b):  # length-normalised gradient ascent
        return -jnp.mean(mean_token_nll(apply(q, b["input_ids"]), b["input_ids"], b["loss_mask"]))

    def r_loss(q, b):  # retain NLL plus a pull towards theta_0
        return _mean_nll(q, b) + 0.5 * jt.dot(jt.sub(q, p0), jt.sub(q, p0))

    def sign_estimator(loss, q, b):
        v, g = jax.value_and_grad(loss)(q, b)
        return v, jax.tree.map(jnp.sign, g)

    tx = optax.chain(optax.scale(-1.0), optax.scale(0.1))  # = sgd(0.1)
    u = unlearner(f_loss, tx, retain_loss=r_loss, estimator=sign_estimator, gamma=0.5, alpha=2.0)
    assert u.uses_retain and not u.needs_reference
    state, m = u.step(u.init(p), fb, rb)
    gf, gr = jax.grad(f_loss)(p, fb), jax.grad(r_loss)(p, rb)
    want = jax.tree.map(lambda x, a, b: x - 0.1 * (0.5 * jnp.sign(a) + 2.0 * b), p, gf, gr)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state.params, want)
    np.testing.assert_allclose(m["forget_loss"], f_loss(p, fb), rtol=1e-6)
    np.testing.assert_allclose(m["retain_loss"], r_loss(p, rb), rtol=1e-6)
    # a custom forget loss in the preset: the retain term and the transform still apply
    cfg = UnlearnConfig(method="npo", alpha=2.0, gamma=0.5, **SGD)
    u = cfg.build(apply, forget_loss=f_loss)
    assert not u.needs_reference  # no reference for a custom forget loss
    new = u.step(u.init(p), fb, rb)[0].params
    want = jax.tree.map(lambda x, a, b: x - 0.1 * (0.5 * a + 2.0 * b), p, gf, jax.grad(_token_nll)(p, rb))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new, want)


def test_projection_and_mask_composed_by_hand():
    """retain_k hands the k retain gradients to the transform; the mask lives in the transform."""
    p, fb, rb = _params(), _batch(4, 1), _batch(6, 2)
    mask = jax.tree.map(jnp.ones_like, p)
    mask["b"] = jnp.zeros_like(p["b"])
    tx = optax.chain(project_orthogonal(retain_scale=0.0), masked_updates(mask), optax.sgd(0.1))
    u = unlearner(forget_loss_fn(apply, "ga"), tx, retain_loss=retain_loss_fn(apply), retain_k=3)
    new = u.step(u.init(p), fb, rb)[0].params
    gf = jax.grad(lambda q: -_token_nll(q, fb))(p)
    R = jax.tree.map(lambda *r: jnp.stack(r), *[jax.grad(_token_nll)(p, jax.tree.map(lambda x: x[j::3], rb))
                                               for j in range(3)])
    want = jax.tree.map(lambda x, m, g: x - 0.1 * m * g, p, mask, orthogonal_projection(gf, R))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new, want)
    np.testing.assert_array_equal(new["b"], p["b"])
    assert float(jt.global_norm(jt.sub(new, p))) > 1e-3


def test_unjitted_step_runs_inside_scan():
    p, ref, fb, rb = _params(), _params(3), _batch(4, 1), _batch(6, 2)
    cfg = UnlearnConfig(method="npo", retain_loss="kl", learning_rate=0.05)
    u = cfg.build(apply, jit=False)

    @jax.jit
    def three_steps(state, ref):
        return jax.lax.scan(lambda s, _: u.step(s, fb, rb, ref), state, None, length=3)

    scanned, metrics = three_steps(u.init(p), ref)
    assert metrics["forget_loss"].shape == (3,) and int(scanned.step) == 3
    looped, _ = _run(cfg.build(apply), p, fb, rb, ref)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), scanned.params, looped.params)


def test_bad_input():
    with pytest.raises(ValueError, match=r"UnlearnConfig.method must be one of .*got 'rmu'"):
        UnlearnConfig(method="rmu")
    with pytest.raises(ValueError, match="UnlearnConfig.retain_loss"):
        UnlearnConfig(retain_loss="l2")
    with pytest.raises(ValueError, match=r"UnlearnConfig.nll_reduction must be one of .*got 'mean'"):
        UnlearnConfig(nll_reduction="mean")
    with pytest.raises(ValueError, match="retain_loss_fn.reduction"):
        retain_loss_fn(apply, reduction="batch")
    p, fb, rb = _params(), _batch(4, 1), _batch(5, 2)
    u = UnlearnConfig(method="npo").build(apply)
    with pytest.raises(ValueError, match="needs ref_params.*forget loss reads ref_logp"):
        u.step(u.init(p), fb, rb)
    aliased = UnlearnState(jnp.zeros((), jnp.int32), p, u.init(p).opt_state)
    with pytest.raises(ValueError, match="ref_params leaf 'E' shares its buffer"):
        u.step(aliased, fb, rb, p)
    u = UnlearnConfig(method="ga", project=True, retain_k=2).build(apply)
    with pytest.raises(ValueError, match="not divisible by retain_k=2"):
        u.step(u.init(p), fb, rb)
    u = UnlearnConfig(method="grad_diff").build(apply)
    with pytest.raises(ValueError, match="needs a retain batch"):
        u.step(u.init(p), fb, None)
    u = UnlearnConfig(method="ga").build(apply)
    with pytest.raises(KeyError, match="loss_mask"):
        u.step(u.init(p), {k: fb[k] for k in ("input_ids", "attention_mask")})
    with pytest.raises(ValueError, match="forget batch is empty"):
        u.step(u.init(p), jax.tree.map(lambda x: x[:0], fb))
    # a preset without a retain term ignores a retain batch; an unused ref_params is not read
    state, _ = u.step(u.init(p), fb, rb, p)
    assert int(state.step) == 1


def test_equal_configs_share_one_compiled_step_and_masks_do_not():
    """build() of equal configs on one model returns the same Unlearner (its jitted step compiles
    once across a benchmark's seeds); a mask or a custom loss builds a new one."""
    import jax.numpy as jnp

    from jaxunlearn.unlearn import UnlearnConfig

    apply = lambda p, ids, mask: p["E"][ids] @ p["W"]  # noqa: E731
    a = UnlearnConfig(method="npo", learning_rate=1e-2).build(apply)
    b = UnlearnConfig(method="npo", learning_rate=1e-2).build(apply)
    c = UnlearnConfig(method="npo", learning_rate=2e-2).build(apply)
    assert a is b and a is not c
    params = {"E": jnp.eye(4), "W": jnp.eye(4)}
    mask = {"E": jnp.ones((4, 4)), "W": jnp.ones((4, 4))}
    m1 = UnlearnConfig(method="npo", learning_rate=1e-2).build(apply, mask=mask)
    assert m1 is not a and m1 is not UnlearnConfig(method="npo", learning_rate=1e-2).build(apply, mask=mask)
    batch = {"input_ids": jnp.array([[0, 1, 2]]), "attention_mask": jnp.ones((1, 3)),
             "loss_mask": jnp.array([[0.0, 1.0, 1.0]])}
    s1, _ = a.step(a.init(params), batch, batch, params)
    s2, _ = b.step(b.init(params), batch, batch, params)   # the shared step: the same result
    assert all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)))


def test_regularizer_adds_its_gradient_term_before_the_optimizer():
    """A regularizer transform (here the gradient of 0.5 c ||theta - anchor||^2, written as an optax
    term) enters the combined gradient: one SGD step equals theta - lr (grad L_f + c (theta - anchor)),
    computed by hand; the regularized build is not the cached plain one."""
    params = _params()
    fb = _batch(3, 1)
    anchor = jax.tree.map(lambda x: x + 0.5, params)
    c = 0.7

    def init_fn(p):
        return optax.EmptyState()

    def update_fn(g, state, p=None):
        return jax.tree.map(lambda gi, pi, ai: gi + c * (pi - ai), g, p, anchor), state

    cfg = UnlearnConfig(method="ga", **SGD)
    u = cfg.build(apply, regularizer=optax.GradientTransformation(init_fn, update_fn))
    assert u is not cfg.build(apply)
    state, _ = u.step(u.init(params), fb)
    g = jax.grad(lambda p: -_token_nll(p, fb))(params)
    want = jax.tree.map(lambda p, gi, a: p - 0.1 * (gi + c * (p - a)), params, g, anchor)
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
