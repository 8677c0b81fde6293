import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxunlearn import tree as jt
from jaxunlearn.fisher import fisher_diagonal
from jaxunlearn.kernels import fisher as kf
from jaxunlearn.methods import (
    UnlearnContext,
    finetune_on_forget,
    importance_batches,
    importances,
    run_method,
)
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig, dense_shapes, example_nll

from toy_lm import bigram_apply as apply
from toy_lm import bigram_params, lm_batch

V, T = 9, 6


def _data(n, seed):
    return lm_batch(n, seed, vocab=V, seq=T, prompt=2)


@pytest.fixture
def ctx():
    return UnlearnContext(apply, bigram_params(V, 4), _data(10, 1), _data(14, 2))


FT = {"steps": 3, "learning_rate": 0.05, "batch_size": 4}


def test_task_vector_is_negated_finetuning(ctx):
    ft = finetune_on_forget(ctx, FT)
    out = run_method(ctx, {"kind": "task_vector", "scale": 2.0, "finetune": FT})
    jax.tree.map(lambda o, p, f: np.testing.assert_allclose(o, p - 2.0 * (f - p), rtol=1e-5, atol=1e-6),
                 out, ctx.params, ft)
    assert float(jt.global_norm(jt.sub(ft, ctx.params))) > 1e-3


def test_importance_batches_pad_with_zero_weight_and_keep_fisher(ctx):
    bs = importance_batches(ctx.forget, 4)
    assert [b["input_ids"].shape for b in bs] == [(4, T)] * 3
    np.testing.assert_array_equal(bs[-1]["example_weight"], [1, 1, 0, 0])
    loss = example_nll(apply)
    got = fisher_diagonal(loss, ctx.params, bs)
    # independent: loop over the 10 examples
    ref = jax.tree.map(jnp.zeros_like, ctx.params)
    for i in range(10):
        g = jax.grad(loss)(ctx.params, {k: jnp.asarray(v[i]) for k, v in ctx.forget.items()})
        ref = jax.tree.map(lambda a, b: a + b**2 / 10, ref, g)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, ref)
    sub = importance_batches(ctx.retain, 4, max_examples=5, seed=3)
    assert sum(float(b["example_weight"].sum()) for b in sub) == 5


def test_perta_and_ssd_use_the_importances(ctx):
    cfg = {"kind": "perta", "importance": "fisher", "strength": 1.5, "finetune": FT, "importance_batch_size": 4}
    out = run_method(ctx, cfg)
    i_f, i_r = importances(ctx, cfg, "retain")
    tau = jt.sub(finetune_on_forget(ctx, FT), ctx.params)
    want = jax.tree.map(lambda p, t, f, r: p - 1.5 * f / (f + r + 1e-12) * t, ctx.params, tau, i_f, i_r)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out, want)
    scfg = {"kind": "ssd", "threshold": 1.0, "lam": 1.0, "importance_batch_size": 4}
    i_f, i_d = importances(ctx, scfg, "full")
    out = run_method(ctx, scfg)
    want = jax.tree.map(lambda p, f, d: np.where(f > d, p * np.minimum(d / f, 1.0), p), ctx.params, i_f, i_d)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), out, want)


def test_gradient_kind_with_salun_mask(ctx):
    cfg = {"kind": "gradient", "batch_size": 4, "salun_fraction": 0.25,
           "unlearn": {"method": "ga", "steps": 3, "learning_rate": 0.05}}
    out = run_method(ctx, cfg)
    changed = sum(int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in
                  zip(jax.tree.leaves(out), jax.tree.leaves(ctx.params)))
    assert 0 < changed <= round(0.25 * jt.size(ctx.params))
    zero = run_method(ctx, {"kind": "gradient", "unlearn": {"method": "npo", "steps": 0}})
    jax.tree.map(np.testing.assert_array_equal, zero, ctx.params)


def test_bad_configs(ctx):
    with pytest.raises(ValueError, match="key 'kind' must be one of .* got 'no_such_kind'"):
        run_method(ctx, {"kind": "no_such_kind"})
    with pytest.raises(ValueError, match="missing key 'scale'"):
        run_method(ctx, {"kind": "task_vector", "finetune": FT})
    with pytest.raises(ValueError, match="importance must be one of .* got 'hessian'"):
        run_method(ctx, {"kind": "ssd", "importance": "hessian"})


def test_perta_fisher_on_a_decoder_runs_the_fused_fisher(monkeypatch):
    """The public entry point: run_method(perta fisher) with the decoder adapter reaches the dense_fisher
    kernel (the fused path) and gives the chunked-vmap Fisher's result (ctx.fisher_kwargs method="vmap")."""
    cfg = ModelConfig(vocab_size=13, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                      num_kv_heads=1)  # a shape no other test compiles: the fused step is traced here
    fn, params = DecoderFn.of(Decoder(cfg, rngs=nnx.Rngs(0)))
    forget = lm_batch(6, 1, vocab=13, seq=T, prompt=2)
    retain = lm_batch(8, 2, vocab=13, seq=T, prompt=2)
    calls = []
    real = kf.dense_fisher
    monkeypatch.setattr(kf, "dense_fisher", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    mcfg = {"kind": "perta", "importance": "fisher", "strength": 1.5, "finetune": FT, "importance_batch_size": 4}
    fused_ctx = UnlearnContext(fn, params, forget, retain)
    out = run_method(fused_ctx, mcfg)
    assert len(calls) == len(dense_shapes(cfg)) + cfg.tie_word_embeddings  # per dense layer (+ tied head)
    vmap_ctx = UnlearnContext(fn, params, forget, retain, fisher_kwargs={"method": "vmap"})
    calls.clear()
    ref = run_method(vmap_ctx, mcfg)
    assert not calls
    for got, want in zip(importances(fused_ctx, mcfg, "retain"), importances(vmap_ctx, mcfg, "retain")):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.max(np.abs(b))))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out, ref)
