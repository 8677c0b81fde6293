import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn import tree as jt
from jaxunlearn.fisher import fisher_diagonal
from jaxunlearn.methods import (
    UnlearnContext,
    example_nll_fn,
    finetune_on_forget,
    importance_batches,
    importances,
    run_method,
)

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
    out = run_method(ctx, {"kind": "task_vector", "alpha": 2.0, "finetune": FT})
    jax.tree.map(lambda o, p, f: np.testing.assert_allclose(o, p - 2.0 * (f - p), rtol=1e-5, atol=1e-6),
                 out, ctx.params, ft)
    assert float(jt.global_norm(jt.sub(ft, ctx.params))) > 1e-3


def test_importance_batches_pad_with_zero_weight_and_keep_fisher(ctx):
    bs = importance_batches(ctx.forget, 4)
    assert [b["input_ids"].shape for b in bs] == [(4, T)] * 3
    np.testing.assert_array_equal(bs[-1]["example_weight"], [1, 1, 0, 0])
    loss = example_nll_fn(apply)
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
    scfg = {"kind": "ssd", "alpha": 1.0, "lam": 1.0, "importance_batch_size": 4}
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
    with pytest.raises(ValueError, match="key 'kind' must be one of .* got 'rmu'"):
        run_method(ctx, {"kind": "rmu"})
    with pytest.raises(ValueError, match="missing key 'alpha'"):
        run_method(ctx, {"kind": "task_vector", "finetune": FT})
    with pytest.raises(ValueError, match="importance must be one of .* got 'hessian'"):
        run_method(ctx, {"kind": "ssd", "importance": "hessian"})
