"""Continual unlearning state and transforms (jaxunlearn/continual.py) against independent references:
jax.grad of the written-out penalty in float64, a hand-computed SGD step, loops over requests and over
zeroed layers, per-position embedding gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_lm import bigram_apply, bigram_params, lm_batch

import jaxunlearn as ju
from jaxunlearn import continual as C
from jaxunlearn.methods import UnlearnContext, run_method


def _tree(rng, shapes, scale=1.0, positive=False):
    out = {k: rng.normal(size=s) * scale for k, s in shapes.items()}
    return {k: jnp.asarray(np.abs(v) if positive else v, jnp.float32) for k, v in out.items()}


def test_penalty_gradient_is_jax_grad_of_the_written_out_penalty_in_float64():
    rng = np.random.default_rng(0)
    shapes = {"a": (3, 4), "b": (5,)}
    p, f, a = _tree(rng, shapes), _tree(rng, shapes, positive=True), _tree(rng, shapes)
    lam = 0.37
    tx = C.fisher_penalty(lam, f, a)
    g = _tree(rng, shapes)
    out, _ = tx.update(g, tx.init(p), p)

    def written_out(theta):  # lambda * sum_i F_i (theta_i - theta*_i)^2, entry by entry
        total = 0.0
        for k in sorted(theta):
            flat_t, flat_f, flat_a = theta[k].ravel(), np.asarray(f[k], np.float64).ravel(), \
                np.asarray(a[k], np.float64).ravel()
            for i in range(flat_t.shape[0]):
                total = total + lam * flat_f[i] * (flat_t[i] - flat_a[i]) ** 2
        return total

    with jax.enable_x64(True):
        ref = jax.grad(written_out)({k: jnp.asarray(np.asarray(v), jnp.float64) for k, v in p.items()})
        ref = {k: np.asarray(v) for k, v in ref.items()}
    for k in shapes:
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(g[k], np.float64) + ref[k], rtol=1e-5, atol=1e-6)
    with jax.enable_x64(True):
        val = float(C.penalty_value({k: jnp.asarray(np.asarray(v), jnp.float64) for k, v in p.items()}, f, a, lam))
        assert val == pytest.approx(float(written_out({k: np.asarray(v, np.float64) for k, v in p.items()})),
                                    rel=1e-5)


def test_penalty_state_holds_the_fisher_and_anchor_and_checks_shapes():
    f, a = {"w": jnp.ones(3)}, {"w": jnp.zeros(3)}
    tx = C.fisher_penalty(1.0, f, a)
    s = tx.init({"w": jnp.zeros(3)})
    assert isinstance(s, C.FisherPenaltyState)
    np.testing.assert_array_equal(np.asarray(s.fisher["w"]), 1.0)
    with pytest.raises(ValueError, match="shape mismatch at 'w'"):
        tx.init({"w": jnp.zeros(4)})
    with pytest.raises(ValueError, match="fisher must be >= 0.*'w'"):
        C.fisher_penalty(1.0, {"w": -jnp.ones(3)}, a)
    with pytest.raises(ValueError, match="strength"):
        C.fisher_penalty(-1.0, f, a)
    with pytest.raises(ValueError, match="needs the params"):
        tx.update({"w": jnp.zeros(3)}, s)


def _bigram_ctx(seed=0):
    params = bigram_params(6, 4, seed=seed)
    forget = lm_batch(8, seed + 1, vocab=6, seq=5, prompt=2)
    retain = lm_batch(8, seed + 2, vocab=6, seq=5, prompt=2)
    return UnlearnContext(bigram_apply, params, forget, retain, seed=0)


def test_one_sgd_step_with_the_regularizer_equals_the_hand_computed_update():
    ctx = _bigram_ctx()
    rng = np.random.default_rng(3)
    fisher = jax.tree.map(lambda x: jnp.asarray(np.abs(rng.normal(size=x.shape)), jnp.float32), ctx.params)
    anchor = jax.tree.map(lambda x: x + 0.5, ctx.params)  # away from the start: the term is non-zero at step 1
    lam, lr = 0.3, 0.1
    fb = {k: jnp.asarray(v) for k, v in ctx.forget.items()}
    cfg = ju.UnlearnConfig(method="ga", optimizer="sgd", learning_rate=lr, grad_clip=0.0, steps=1)
    plain = cfg.build(bigram_apply)
    s0, _ = plain.step(plain.init(ctx.params), fb)
    reg = cfg.build(bigram_apply, regularizer=C.fisher_penalty(lam, fisher, anchor))
    s1, _ = reg.step(reg.init(ctx.params), fb)
    for k in ctx.params:
        theta, f, a = (np.asarray(t[k], np.float64) for t in (ctx.params, fisher, anchor))
        g_forget = (theta - np.asarray(s0.params[k], np.float64)) / lr
        want = theta - lr * (g_forget + 2 * lam * f * (theta - a))
        np.testing.assert_allclose(np.asarray(s1.params[k]), want, rtol=1e-5, atol=1e-6)
    # the same through run_method(regularizer=...)
    out = run_method(ctx, {"kind": "gradient", "batch_size": 8,
                           "unlearn": {"method": "ga", "optimizer": "sgd", "learning_rate": lr, "grad_clip": 0.0,
                                       "steps": 1}},
                     regularizer=lambda start: C.fisher_penalty(lam, fisher, anchor))
    for k in ctx.params:
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(s1.params[k]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule", ["mean", "decay"])
def test_fold_fisher_matches_a_loop(rule):
    rng = np.random.default_rng(1)
    fishers = [np.abs(rng.normal(size=(3, 2))) for _ in range(4)]
    state = C.init_continual_state({"w": jnp.zeros((3, 2))})
    for i, f in enumerate(fishers):
        state = C.fold_fisher(state, {"w": jnp.asarray(f, jnp.float32)}, {"w": jnp.full((3, 2), float(i))},
                              rule=rule, decay=0.7)
    if rule == "mean":
        ref = sum(fishers) / len(fishers)
    else:
        ref = np.zeros((3, 2))
        for f in fishers:
            ref = 0.7 * ref + f
    np.testing.assert_allclose(np.asarray(state.fisher["w"]), ref, rtol=1e-5)
    assert int(state.count) == 4
    np.testing.assert_array_equal(np.asarray(state.anchor["w"]), 3.0)
    with pytest.raises(ValueError, match="shape mismatch at 'w'"):
        C.fold_fisher(state, {"w": jnp.zeros(2)}, {"w": jnp.zeros((3, 2))})
    with pytest.raises(ValueError, match="decay"):
        C.fold_fisher(state, {"w": jnp.zeros((3, 2))}, {"w": jnp.zeros((3, 2))}, rule="decay", decay=1.5)


def test_request_fisher_is_the_mean_squared_per_example_gradient():
    ctx = _bigram_ctx()
    f = C.request_fisher(ctx, ctx.retain, ctx.params, max_examples=8, batch_size=3)

    def nll(p, i):  # one example's summed answer NLL, written out
        logp = jax.nn.log_softmax(bigram_apply(p, jnp.asarray(ctx.retain["input_ids"][i:i + 1])), -1)[0]
        ids, lm = ctx.retain["input_ids"][i], ctx.retain["loss_mask"][i]
        return -sum(logp[t - 1, ids[t]] * lm[t] for t in range(1, len(ids)))

    ref = {k: np.zeros(v.shape) for k, v in ctx.params.items()}
    for i in range(8):
        g = jax.grad(nll)(ctx.params, i)
        for k in ref:
            ref[k] += np.asarray(g[k], np.float64) ** 2 / 8
    for k in ref:
        np.testing.assert_allclose(np.asarray(f[k]), ref[k], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ FIT: targeted layers


def layered_apply(params, ids, mask=None):
    """A residual toy decoder: ``h += tanh(h A_l) * s_l; h += tanh(h M_l)`` per layer, logits ``h H``."""
    h = params["embed"]["embedding"][ids]
    for layer in params["layers"]:
        h = h + jnp.tanh(h @ layer["attn"]["w"]) * layer["attn_norm"]["scale"]
        h = h + jnp.tanh(h @ layer["mlp"]["w"])
    return h @ params["head"]


def _layered(seed=0, vocab=7, d=5, n_layers=3):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return {"embed": {"embedding": f(vocab, d)}, "head": f(d, vocab),
            "layers": [{"attn": {"w": f(d, d)}, "attn_norm": {"scale": jnp.ones(d)}, "mlp": {"w": f(d, d)}}
                       for _ in range(n_layers)]}


def _np_answer_loss(logits, batch):
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ids, lm = np.asarray(batch["input_ids"]), np.asarray(batch["loss_mask"], np.float64)
    total = sum(-logp[n, t - 1, ids[n, t]] * lm[n, t] for n in range(ids.shape[0]) for t in range(1, ids.shape[1]))
    return total / lm[:, 1:].sum()


def test_layer_attribution_matches_a_loop_over_zeroed_layers():
    params = _layered()
    batch = lm_batch(4, 0, vocab=7, seq=6, prompt=2)
    scores = C.layer_attribution(layered_apply, params, batch)
    base = _np_answer_loss(layered_apply(params, jnp.asarray(batch["input_ids"])), batch)
    assert sorted(scores) == [0, 1, 2]
    for layer in range(3):
        ablated = {"embed": params["embed"], "head": params["head"],
                   "layers": [({k: {kk: jnp.zeros_like(vv) for kk, vv in v.items()} for k, v in lay.items()}
                               if i == layer else lay) for i, lay in enumerate(params["layers"])]}
        ref = abs(_np_answer_loss(layered_apply(ablated, jnp.asarray(batch["input_ids"])), batch) - base)
        assert scores[layer] == pytest.approx(ref, rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="no parameter path belongs to a layer"):
        C.layer_attribution(bigram_apply, bigram_params(6, 4), lm_batch(2, 0, vocab=6, seq=4, prompt=1))


def test_top_layers_and_the_mask_rescale_updates_as_the_direct_formula():
    assert C.top_layers({0: 0.3, 1: 0.9, 2: 0.1, 3: 0.9}, 2) == [1, 3]
    assert C.top_layers({i: float(i) for i in range(8)}) == [6, 7]  # None: a quarter of 8 layers
    params = _layered()
    mask = C.layer_mask(params, [1])
    tx = C.layer_masked_updates(mask)
    rng = np.random.default_rng(2)
    u = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    out, _ = tx.update(u, tx.init(params))
    for i in range(3):
        for part in ("attn", "mlp"):
            want = u["layers"][i][part]["w"] * (1.0 if i == 1 else 0.0)
            np.testing.assert_array_equal(np.asarray(out["layers"][i][part]["w"]), np.asarray(want))
        np.testing.assert_array_equal(np.asarray(out["layers"][i]["attn_norm"]["scale"]), 0.0)  # norms frozen
    np.testing.assert_array_equal(np.asarray(out["embed"]["embedding"]), 0.0)
    with pytest.raises(ValueError, match="select no parameter"):
        C.layer_mask(params, [7])


def test_input_importance_equals_the_per_position_embedding_gradient_when_tokens_are_distinct():
    params = bigram_params(8, 3, seed=4)
    ids = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.int32)  # every token once
    lm = np.array([[0, 1, 1, 1], [0, 0, 1, 1]], np.float32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": lm}

    def loss_of_embeddings(e):  # FIT: the loss as a function of the input embeddings, position by position
        logp = jax.nn.log_softmax(e @ params["W"], -1)
        return -sum(logp[n, t - 1, ids[n, t]] * lm[n, t] for n in range(2) for t in range(1, 4)) / lm[:, 1:].sum()

    per_position = jax.grad(loss_of_embeddings)(params["E"][ids])
    score = C.input_importance(bigram_apply, params, batch, embed_path="E")
    assert score == pytest.approx(float(jnp.linalg.norm(per_position)), rel=1e-5)
    with pytest.raises(KeyError, match="embed_path"):
        C.input_importance(bigram_apply, params, batch)


def test_importance_tiers_and_their_configs():
    assert [C.select_tier(s, (1.0, 2.0)) for s in (0.5, 1.0, 1.9, 2.0)] == ["rl", "npo", "npo", "npo_kl"]
    base = {"kind": "gradient", "batch_size": 8, "unlearn": {"method": "grad_diff", "steps": 3, "alpha": 0.5}}
    assert C.tier_config(base, "npo_kl")["unlearn"] == {"method": "npo", "steps": 3, "alpha": 0.5, "retain_loss": "kl"}
    assert C.tier_config(base, "npo")["unlearn"]["alpha"] == 0.0
    rl = C.tier_config(base, "rl")["unlearn"]
    assert (rl["method"], rl["gamma"]) == ("grad_diff", 0.0)
    assert base["unlearn"]["method"] == "grad_diff"  # not modified
    data = lm_batch(6, 0, vocab=50, seq=5, prompt=2)
    out = C.random_label_rows(data, 50, seed=1)
    np.testing.assert_array_equal(out["input_ids"][:, :2], data["input_ids"][:, :2])  # prompts kept
    assert (out["input_ids"][:, 2:] != data["input_ids"][:, 2:]).mean() > 0.8


def test_continual_config_validation_names_the_field():
    with pytest.raises(ValueError, match="ContinualConfig.kind"):
        C.ContinualConfig(kind="ewc")
    with pytest.raises(ValueError, match="ContinualConfig.decay"):
        C.ContinualConfig(decay=1.5)
    with pytest.raises(ValueError, match="ContinualConfig.fisher_data"):
        C.ContinualConfig(fisher_data=("retain", "holdout"))
    with pytest.raises(ValueError, match="ContinualConfig.thresholds"):
        C.ContinualConfig(thresholds=(12.0, 6.0))
    with pytest.raises(ValueError, match="unknown continual method 'ewc'"):
        C.parse_continual("ewc")
    with pytest.raises(ValueError, match=r"unknown ContinualConfig key\(s\) \['lam'\]"):
        C.parse_continual({"kind": "lwf", "lam": 1.0})
    assert C.parse_continual("none") is None
    assert C.parse_continual({"kind": "fit", "top_k_layers": 2}).top_k_layers == 2


def test_the_penalty_keeps_parameters_important_to_request_1_near_their_anchor():
    """Request 1 unlearned, its Fisher taken at the result; request 2 with and without the penalty."""
    params = bigram_params(6, 4, seed=5)
    req1 = lm_batch(8, 11, vocab=6, seq=5, prompt=2)
    req2 = lm_batch(8, 12, vocab=6, seq=5, prompt=2)
    retain = lm_batch(8, 13, vocab=6, seq=5, prompt=2)
    cfg = {"kind": "gradient", "batch_size": 8,
           "unlearn": {"method": "ga", "steps": 5, "learning_rate": 0.05, "optimizer": "sgd", "grad_clip": 0.0}}
    theta1 = run_method(UnlearnContext(bigram_apply, params, req1, retain), cfg)
    c = C.ContinualConfig(kind="lwf", strength=5.0, fisher_data=("forget",))  # lr * 2 lam max F < 2: stable SGD
    ctx1 = UnlearnContext(bigram_apply, theta1, req1, retain)
    state = C.finish_request(ctx1, c, C.init_continual_state(params), theta1)
    np.testing.assert_array_equal(np.asarray(state.anchor["W"]), np.asarray(theta1["W"]))
    ctx2 = UnlearnContext(bigram_apply, theta1, req2, retain)
    _, cfg2, reg, info = C.plan_request(ctx2, cfg, c, state)
    assert info["anchored"] and reg is not None
    free = run_method(ctx2, cfg)
    held = run_method(ctx2, cfg2, regularizer=reg)
    f = state.fisher

    def weighted_drift(p):
        return sum(float(jnp.sum(f[k] * (p[k] - theta1[k]) ** 2)) for k in p)

    assert weighted_drift(held) < 0.5 * weighted_drift(free)
    top = np.argsort(np.asarray(f["W"]).ravel())[-5:]  # the five entries most important to request 1
    drift = lambda p: np.abs(np.asarray(p["W"] - theta1["W"]).ravel()[top]).mean()  # noqa: E731
    assert drift(held) < drift(free)
    # and request 2 was still unlearned (the forget NLL rose)
    nll = lambda p: float(ju.models.functional.answer_loss(bigram_apply, p, {k: jnp.asarray(v) for k, v in req2.items()}))  # noqa: E731
    assert nll(held) > nll(theta1)


def test_continual_method_config_is_one_request_of_the_stream_protocol():
    """A gradient config with ``continual`` = the stream's first request by hand: plan_request on the
    start state, then run_method with that regularizer (the same parameters, bitwise); bad combinations
    are refused before any work."""
    from jaxunlearn.continual import plan_request, start_state
    from jaxunlearn.method_configs import parse_method_config
    from jaxunlearn.methods import UnlearnContext, run_method

    v = 9
    params = bigram_params(v, 4, seed=0)
    forget, retain = lm_batch(8, 1, vocab=v, seq=6, prompt=2), lm_batch(16, 2, vocab=v, seq=6, prompt=2)
    ctx = UnlearnContext(bigram_apply, params, forget, retain, seed=0)
    plain = {"kind": "gradient", "batch_size": 4, "unlearn": {"method": "npo", "steps": 3, "learning_rate": 1e-2}}
    cont = {"kind": "lwf", "strength": 50.0, "fisher_examples": 8, "fisher_batch_size": 4}
    got = run_method(ctx, {**plain, "continual": cont})
    c = parse_method_config({**plain, "continual": cont}).continual
    ctx2, cfg2, reg, info = plan_request(ctx, plain, c, start_state(ctx, c))
    assert info["anchored"] and reg is not None
    want = run_method(ctx2, cfg2, regularizer=reg)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    free = run_method(ctx, plain)
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(got),
                                                                              jax.tree.leaves(free)))
    with pytest.raises(ValueError, match="adapter"):
        parse_method_config({**plain, "continual": cont, "adapter": {"rank": 2}})
    with pytest.raises(ValueError, match="not resumable"):
        run_method(ctx, {**plain, "continual": cont}, checkpoint_dir="/nonexistent/x")
    with pytest.raises(ValueError, match="continual.kind"):
        parse_method_config({**plain, "continual": {"kind": "ewc"}})
