"""Diagonal Fisher and gradient importances against loops and hand-computed formulas.

Model: a linear softmax classifier, logits = x W + b, loss = -log softmax(logits)[y].
Its per-example gradient is known in closed form, dW = x (p - e_y)^T and db = p - e_y,
so every estimate is compared with (a) a Python loop of single-example ``jax.grad``
calls reduced in numpy and (b) that numpy closed form (no autodiff).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn import fisher as fi
from jaxunlearn.losses import sequence_nll

D, V = 3, 4


def loss_fn(params, ex):
    logits = ex["x"] @ params["dense"]["w"] + params["dense"]["b"]
    return -jax.nn.log_softmax(logits.astype(jnp.float32))[ex["y"]]


def make_params(dtype=jnp.float32):
    rng = np.random.default_rng(1)
    return {
        "dense": {
            "w": jnp.asarray(rng.normal(size=(D, V)), dtype),
            "b": jnp.asarray(rng.normal(size=(V,)), dtype),
        }
    }


def make_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {
        "x": jnp.asarray(rng.normal(size=(n, D)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, V, size=n), jnp.int32),
    }


def closed_form_grads(params, x, y):
    """Per-example gradients in numpy: (dW (N, D, V), db (N, V))."""
    w = np.asarray(params["dense"]["w"], np.float64)
    b = np.asarray(params["dense"]["b"], np.float64)
    logits = np.asarray(x, np.float64) @ w + b
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    delta = p - np.eye(V)[np.asarray(y)]
    return np.asarray(x, np.float64)[:, :, None] * delta[:, None, :], delta, p


_single_grad = jax.jit(jax.grad(loss_fn))


def loop_grads(params, batches):
    """Per-example gradients by a Python loop of single-example jax.grad calls."""
    gw, gb = [], []
    for batch in batches:
        for n in range(batch["x"].shape[0]):
            g = _single_grad(params, {"x": batch["x"][n], "y": batch["y"][n]})
            gw.append(np.asarray(g["dense"]["w"], np.float64))
            gb.append(np.asarray(g["dense"]["b"], np.float64))
    return np.stack(gw), np.stack(gb)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5])
def test_fisher_matches_loop_and_closed_form(chunk_size):
    params = make_params()
    batches = [make_batch(5, 0), make_batch(3, 1)]  # 3 does not divide 5; 5 > 3
    f = fi.fisher_diagonal(loss_fn, params, batches, chunk_size=chunk_size)
    assert f["dense"]["w"].dtype == jnp.float32
    gw, gb = loop_grads(params, batches)
    np.testing.assert_allclose(f["dense"]["w"], np.mean(gw**2, 0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f["dense"]["b"], np.mean(gb**2, 0), rtol=1e-5, atol=1e-7)
    x = np.concatenate([b["x"] for b in batches])
    y = np.concatenate([b["y"] for b in batches])
    cw, cb, _ = closed_form_grads(params, x, y)
    np.testing.assert_allclose(f["dense"]["w"], np.mean(cw**2, 0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f["dense"]["b"], np.mean(cb**2, 0), rtol=1e-5, atol=1e-7)


def test_example_weight_masks_and_weights_rows():
    params = make_params()
    batch = make_batch(6, 2)
    x = np.asarray(batch["x"]).copy()
    x[2] = np.inf  # padded garbage rows: weight 0 must keep them out entirely
    x[5] = np.nan
    weight = np.array([1.0, 0.5, 0.0, 2.0, 1.0, 0.0], np.float32)
    wbatch = {"x": jnp.asarray(x), "y": batch["y"], fi.WEIGHT_KEY: jnp.asarray(weight)}
    f = fi.fisher_diagonal(loss_fn, params, [wbatch], chunk_size=4)
    keep = weight > 0
    cw, cb, _ = closed_form_grads(params, x[keep], np.asarray(batch["y"])[keep])
    w = weight[keep].astype(np.float64)
    ref_w = np.einsum("n,nij->ij", w, cw**2) / w.sum()
    ref_b = np.einsum("n,ni->i", w, cb**2) / w.sum()
    np.testing.assert_allclose(f["dense"]["w"], ref_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f["dense"]["b"], ref_b, rtol=1e-5, atol=1e-7)
    # mean_grad: same weighting, rows of weight 0 never reach the loss.
    g = fi.mean_grad(loss_fn, params, [wbatch])
    np.testing.assert_allclose(g["dense"]["w"], np.einsum("n,nij->ij", w, cw) / w.sum(), atol=1e-6)


def test_mean_of_per_example_grads_is_batch_gradient():
    params = make_params()
    batch = make_batch(5, 3)
    pe = fi.per_example_grads(loss_fn, params, batch, chunk_size=2)
    assert pe["dense"]["w"].shape == (5, D, V)
    gw, gb = loop_grads(params, [batch])
    np.testing.assert_allclose(pe["dense"]["w"], gw, rtol=1e-5, atol=1e-7)

    def mean_loss(p):
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(p, batch))

    full = jax.jit(jax.grad(mean_loss))(params)
    np.testing.assert_allclose(np.mean(pe["dense"]["w"], 0), full["dense"]["w"], atol=1e-6)
    np.testing.assert_allclose(np.mean(pe["dense"]["b"], 0), full["dense"]["b"], atol=1e-6)
    # mean_grad over two batches == mean of the per-example loop gradients of their union.
    other = make_batch(3, 4)
    mg = fi.mean_grad(loss_fn, params, [batch, other])
    lw, lb = loop_grads(params, [batch, other])
    np.testing.assert_allclose(mg["dense"]["w"], lw.mean(0), atol=1e-6)
    np.testing.assert_allclose(mg["dense"]["b"], lb.mean(0), atol=1e-6)


def test_grad_importance_kinds():
    params = make_params()
    batches = [make_batch(5, 5), make_batch(2, 6)]
    x = np.concatenate([b["x"] for b in batches])
    y = np.concatenate([b["y"] for b in batches])
    cw, _, _ = closed_form_grads(params, x, y)
    gbar = cw.mean(0)
    expected = {
        "squared_mean": gbar**2,
        "abs_mean": np.abs(gbar),
        "abs_sum": np.abs(cw.sum(0)),
        "mean_abs": np.abs(cw).mean(0),
    }
    for kind, ref in expected.items():
        out = fi.grad_importance(loss_fn, params, batches, kind=kind, chunk_size=2)
        np.testing.assert_allclose(out["dense"]["w"], ref, rtol=1e-5, atol=1e-6, err_msg=kind)


def sample_y(params, ex, key):
    logits = ex["x"] @ params["dense"]["w"] + params["dense"]["b"]
    return {**ex, "y": jax.random.categorical(key, logits).astype(ex["y"].dtype)}


def test_sampled_labels_reproducible_and_chunk_invariant():
    params = make_params()
    batches = [make_batch(5, 7)]
    k0, k1 = jax.random.key(0), jax.random.key(1)
    run = lambda rng, c=2: fi.fisher_diagonal(  # noqa: E731
        loss_fn, params, batches, labels="sampled", rng=rng, sample_fn=sample_y, chunk_size=c
    )
    a, b, c = run(k0), run(k0), run(k1)
    emp = fi.fisher_diagonal(loss_fn, params, batches, chunk_size=2)
    np.testing.assert_array_equal(a["dense"]["w"], b["dense"]["w"])
    np.testing.assert_allclose(run(k0, 5)["dense"]["w"], a["dense"]["w"], rtol=1e-6)
    assert not np.allclose(a["dense"]["w"], c["dense"]["w"])
    assert not np.allclose(a["dense"]["w"], emp["dense"]["w"])


def test_sampled_labels_use_documented_keys():
    """Example n of batch b draws its label with key fold_in(fold_in(rng, b), n)."""
    params = make_params()
    batches = [make_batch(4, 11), make_batch(3, 12)]
    rng = jax.random.key(5)
    f = fi.fisher_diagonal(loss_fn, params, batches, labels="sampled", rng=rng, sample_fn=sample_y)
    draw = jax.jit(lambda ex, b, n: sample_y(params, ex, jax.random.fold_in(jax.random.fold_in(rng, b), n)))
    xs, ys = [], []
    for b, batch in enumerate(batches):
        for n in range(batch["x"].shape[0]):
            ex = {"x": batch["x"][n], "y": batch["y"][n]}
            xs.append(np.asarray(ex["x"]))
            ys.append(int(draw(ex, b, n)["y"]))
    cw, cb, _ = closed_form_grads(params, np.stack(xs), np.array(ys))
    np.testing.assert_allclose(f["dense"]["w"], np.mean(cw**2, 0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f["dense"]["b"], np.mean(cb**2, 0), rtol=1e-5, atol=1e-7)


def test_sampled_labels_converge_to_true_fisher():
    """E_y~p[(x (p - e_y))^2] = x^2 p (1 - p) elementwise: Monte Carlo within 5 sigma."""
    params = make_params()
    base = make_batch(2, 8)
    reps = 1000
    batch = {k: np.repeat(np.asarray(v), reps, axis=0) for k, v in base.items()}
    f = fi.fisher_diagonal(
        loss_fn, params, [batch], labels="sampled", rng=jax.random.key(3), sample_fn=sample_y,
        chunk_size=2 * reps,
    )
    _, _, p = closed_form_grads(params, base["x"], base["y"])
    x2 = np.asarray(base["x"], np.float64)[:, :, None] ** 2  # (2, D, 1)
    mean_v = p * (1 - p)  # E (p_j - [y = j])^2
    var_v = (1 - p) * p**4 + p * (1 - p) ** 4 - mean_v**2
    true_w = np.mean(x2 * mean_v[:, None, :], 0)
    sd_w = np.sqrt(np.sum(x2**2 * var_v[:, None, :], 0) * reps) / (2 * reps)
    sd_b = np.sqrt(np.sum(var_v, 0) * reps) / (2 * reps)
    assert np.all(np.abs(f["dense"]["w"] - true_w) <= 5 * sd_w + 1e-6)
    assert np.all(np.abs(f["dense"]["b"] - mean_v.mean(0)) <= 5 * sd_b + 1e-6)
    # and the estimate is informative: far from the empirical Fisher of these labels.
    emp = fi.fisher_diagonal(loss_fn, params, [batch], chunk_size=2 * reps)
    assert np.max(np.abs(emp["dense"]["b"] - mean_v.mean(0))) > 0.05


# ------------------------------------------------------------- language-model convention


def lm_logits(params, ex):
    # position-wise (hence causal) model: logits[t] depend on token t only.
    return params["emb"][ex["input_ids"]]


def lm_loss(params, ex):
    return sequence_nll(lm_logits(params, ex), ex["input_ids"], ex["loss_mask"])


def test_sample_labels_fn_autoregressive_and_teacher_forced():
    nv = 5
    # a deterministic model: next token = token + 1 (mod nv).
    params = {"emb": 50.0 * jnp.eye(nv, dtype=jnp.float32)[(np.arange(nv) + 1) % nv]}
    ex = {
        "input_ids": jnp.array([0, 3, 3, 3, 3, 0], jnp.int32),
        "attention_mask": jnp.ones(6, jnp.int32),
        "loss_mask": jnp.array([0, 0, 1, 1, 1, 0], jnp.float32),
    }
    key = jax.random.key(0)
    ar = jax.jit(fi.sample_labels_fn(lm_logits))(params, ex, key)
    tf = jax.jit(fi.sample_labels_fn(lm_logits, autoregressive=False))(params, ex, key)
    np.testing.assert_array_equal(ar["input_ids"], [0, 3, 4, 0, 1, 0])  # chained on samples
    np.testing.assert_array_equal(tf["input_ids"], [0, 3, 4, 4, 4, 0])  # from the data prefix
    np.testing.assert_array_equal(ar["loss_mask"], ex["loss_mask"])

    # Fisher: the model is certain of its own samples, so the true Fisher ~ 0,
    # while the empirical one (data labels it gets wrong) is large.
    batch = {k: np.stack([v, v]) for k, v in ex.items()}
    true_f = fi.fisher_diagonal(
        lm_loss, params, [batch], labels="sampled", rng=key,
        sample_fn=fi.sample_labels_fn(lm_logits), chunk_size=2,
    )
    emp_f = fi.fisher_diagonal(lm_loss, params, [batch], chunk_size=2)
    assert float(jnp.max(true_f["emb"])) < 1e-12
    assert float(jnp.max(emp_f["emb"])) > 0.5


def test_bfloat16_params_accumulate_in_float32():
    params = make_params(jnp.bfloat16)
    batch = make_batch(4, 9)
    f = fi.fisher_diagonal(loss_fn, params, [batch], chunk_size=3)
    assert f["dense"]["w"].dtype == jnp.float32
    ref = np.mean(
        [
            np.asarray(_single_grad(params, {"x": batch["x"][n], "y": batch["y"][n]})["dense"]["w"],
                       np.float64) ** 2
            for n in range(4)
        ],
        0,
    )
    np.testing.assert_allclose(f["dense"]["w"], ref, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------- errors


def test_errors():
    params = make_params()
    batch = make_batch(3, 10)
    with pytest.raises(ValueError, match="empty"):
        fi.fisher_diagonal(loss_fn, params, [])
    with pytest.raises(ValueError, match="empty"):
        fi.fisher_diagonal(loss_fn, params, (b for b in []))
    with pytest.raises(ValueError, match="empty"):
        fi.mean_grad(loss_fn, params, [])
    with pytest.raises(TypeError, match="iterable of batches"):
        fi.fisher_diagonal(loss_fn, params, batch)
    with pytest.raises(ValueError, match="same keys"):
        fi.fisher_diagonal(loss_fn, params, [batch, {**batch, "z": batch["y"]}])
    with pytest.raises(ValueError, match="batch size"):
        fi.fisher_diagonal(loss_fn, params, [{"x": batch["x"], "y": batch["y"][:2]}])
    with pytest.raises(ValueError, match="example_weight"):
        fi.fisher_diagonal(loss_fn, params, [{**batch, fi.WEIGHT_KEY: jnp.array([1.0, -1.0, 1.0])}])
    with pytest.raises(ValueError, match="total example weight"):
        fi.fisher_diagonal(loss_fn, params, [{**batch, fi.WEIGHT_KEY: jnp.zeros(3)}])
    with pytest.raises(ValueError, match="unknown labels"):
        fi.fisher_diagonal(loss_fn, params, [batch], labels="true")
    with pytest.raises(ValueError, match="unknown method"):
        fi.fisher_diagonal(loss_fn, params, [batch], method="kfac")
    with pytest.raises(NotImplementedError, match="fused"):
        fi.fisher_diagonal(loss_fn, params, [batch], method="fused")
    with pytest.raises(ValueError, match="rng"):
        fi.fisher_diagonal(loss_fn, params, [batch], labels="sampled", sample_fn=sample_y)
    with pytest.raises(ValueError, match="sample_fn"):
        fi.fisher_diagonal(loss_fn, params, [batch], labels="sampled", rng=jax.random.key(0))
    with pytest.raises(ValueError, match="sample_fn"):
        fi.fisher_diagonal(loss_fn, params, [batch], sample_fn=sample_y)
    with pytest.raises(ValueError, match="chunk_size"):
        fi.fisher_diagonal(loss_fn, params, [batch], chunk_size=0)
    with pytest.raises(ValueError, match="unknown kind"):
        fi.grad_importance(loss_fn, params, [batch], kind="l2")
    with pytest.raises(TypeError, match="floating"):
        fi.fisher_diagonal(loss_fn, {"dense": {"w": jnp.zeros((D, V), jnp.int32)}}, [batch])
    nan_batch = {**batch, "x": batch["x"].at[0, 0].set(jnp.nan)}
    with pytest.raises(FloatingPointError, match="dense/b"):
        fi.fisher_diagonal(loss_fn, params, [nan_batch])


def test_sharded_batch_matches_closed_form():
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    params = make_params()
    batch = make_batch(8, 13)
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    f = fi.fisher_diagonal(loss_fn, params, [sharded], chunk_size=3)
    cw, cb, _ = closed_form_grads(params, batch["x"], batch["y"])
    np.testing.assert_allclose(f["dense"]["w"], np.mean(cw**2, 0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f["dense"]["b"], np.mean(cb**2, 0), rtol=1e-5, atol=1e-7)


def test_finite_check_on_params_holding_namedtuples():
    """A NamedTuple inside the params (a LoRA pair) is a subtree, not a (NaN, Inf) flag pair."""
    from jaxunlearn.adapters import LoraPair

    params = {"k": LoraPair(jnp.ones((2,)), jnp.ones((3,)))}
    loss = lambda p, ex: jnp.sum(p["k"].a) * ex["x"] + jnp.sum(p["k"].b ** 2)  # noqa: E731
    batches = [{"x": jnp.array([1.0, 2.0])}]
    out = fi.grad_importance(loss, params, batches, kind="abs_sum")
    np.testing.assert_allclose(np.asarray(out["k"].a), 3.0)
    np.testing.assert_allclose(np.asarray(out["k"].b), 4.0)
    bad = {"k": LoraPair(jnp.ones((2,)), jnp.array([1.0, jnp.nan, 1.0]))}
    with pytest.raises(FloatingPointError, match=r"NaN values at 'k/1'|NaN values at 'k/b'"):
        fi.grad_importance(loss, bad, batches, kind="abs_sum")
