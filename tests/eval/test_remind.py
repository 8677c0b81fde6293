"""REMIND (jaxunlearn.eval.remind) against independent references.

- the neighbour table against a numpy loop over cosine similarities;
- the neighbourhood against a per-row/variant/position loop that redraws the documented random
  numbers and applies the rule itself (eligible question token and ``u < s_k`` -> the ``j``-th
  neighbour), plus its statistics (replacement rate = strength), determinism and batch invariance;
- the landscape losses against a float64 numpy bigram LM run variant by variant;
- the features against numpy (``np.std``, ``np.polyfit``);
- the logistic regression against ``scipy.optimize.minimize`` on the same objective, and the whole
  cross-validated AUC against a pipeline built from scipy and a pairwise (O(n^2)) AUC count
  (scikit-learn is not installed); hand cases (separable -> 1, identical -> 0.5 +- 0.1, with a
  shifted control that a constant scorer would fail);
- bad inputs named before any work.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.optimize
from flax import nnx
from toy_lm import bigram_apply, bigram_params, lm_batch

from jaxunlearn.eval.remind import (
    REMIND_FEATURES,
    RemindConfig,
    embedding_neighbours,
    find_embedding,
    fit_logistic,
    landscape_features,
    landscape_losses,
    neighbourhood,
    remind_auc,
    remind_evaluate,
    stratified_folds,
    variant_strengths,
)

V = 16
BOS, SEP, EOS, PAD = 0, 1, 2, 3
SPECIAL = (BOS, SEP, EOS, PAD)


def _qa_batch(seed: int = 0, rows: int = 4, length: int = 12) -> dict:
    """``[BOS] q [SEP] a [EOS] PAD..`` rows of different question / answer lengths."""
    rng = np.random.default_rng(seed)
    ids = np.full((rows, length), PAD, np.int32)
    attn = np.zeros((rows, length), np.int32)
    lm = np.zeros((rows, length), np.float32)
    for r in range(rows):
        q, a = 2 + r % 4, 1 + r % 3
        row = [BOS, *rng.integers(4, V, q), SEP, *rng.integers(4, V, a), EOS]
        ids[r, : len(row)] = row
        attn[r, : len(row)] = 1
        lm[r, q + 2: len(row)] = 1.0
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": lm}


def _cosine_neighbours_loop(emb: np.ndarray, max_rank: int, special) -> np.ndarray:
    out = np.full((len(emb), max_rank), -1, np.int64)
    for v in range(len(emb)):
        if v in special:
            continue
        cands = []
        for u in range(len(emb)):
            if u != v and u not in special:
                cos = float(emb[v] @ emb[u]) / (np.linalg.norm(emb[v]) * np.linalg.norm(emb[u]))
                cands.append((-cos, u))
        out[v] = [u for _, u in sorted(cands)[:max_rank]]
    return out


@pytest.fixture(scope="module")
def table():
    emb = np.random.default_rng(1).normal(size=(V, 5)).astype(np.float32)
    return emb, embedding_neighbours(emb, 2, special_ids=SPECIAL, chunk=5)


# one shape, one structure and one config for every neighbourhood call: one compilation
NB_CFG = RemindConfig(num_variants=8, strengths=(0.25, 0.6), max_rank=2)
NB_KEY, NB_OFFSET = jax.random.key(3), 5


@pytest.fixture(scope="module")
def perturbed(table):
    batch = {**_qa_batch(seed=2, rows=48), "perturb_mask": np.ones((48, 12), np.float32)}
    out = neighbourhood(NB_KEY, batch, NB_CFG, V, neighbours=table[1], row_offset=NB_OFFSET)
    return batch, jax.tree.map(np.asarray, out)

# the landscape tests share one config, parameter structure and batch shape (5, 8)
LS_CFG = RemindConfig(num_variants=4, strengths=(0.3, 0.6), max_rank=2)


# ------------------------------------------------------------------------------------------ config


def test_config_defaults_strengths_and_errors():
    cfg = RemindConfig()
    assert (cfg.num_variants, cfg.strengths, cfg.max_rank) == (16, (0.1, 0.2, 0.3, 0.4), 1)
    np.testing.assert_array_equal(variant_strengths(RemindConfig(num_variants=6, strengths=(0.1, 0.3))),
                                  [0.1, 0.1, 0.1, 0.3, 0.3, 0.3])
    for kwargs, exc, match in [
        (dict(num_variants=0), ValueError, "num_variants"),
        (dict(num_variants=-3), ValueError, "num_variants"),
        (dict(num_variants=True), TypeError, "num_variants"),
        (dict(strengths=()), TypeError, "strengths"),
        (dict(strengths=0.2), TypeError, "strengths"),
        (dict(strengths=(0.1, 0.0, 0.2, 0.3)), ValueError, r"strengths\[1\]"),
        (dict(strengths=(0.1, 1.5, 0.2, 0.3)), ValueError, "strengths"),
        (dict(num_variants=6), ValueError, "multiple"),
        (dict(max_rank=0), ValueError, "max_rank"),
    ]:
        with pytest.raises(exc, match=match):
            RemindConfig(**kwargs)


# ------------------------------------------------------------------------------------------ neighbours


def test_embedding_neighbours_match_a_cosine_loop(table):
    emb, nb = table
    np.testing.assert_array_equal(nb, _cosine_neighbours_loop(emb, 2, SPECIAL))
    # scaling a row does not move it (cosine), and no special token is ever a neighbour
    scaled = emb * np.arange(1, V + 1)[:, None]
    np.testing.assert_array_equal(embedding_neighbours(scaled, 2, special_ids=SPECIAL), nb)
    assert not np.isin(nb[nb >= 0], SPECIAL).any()
    with pytest.raises(ValueError, match="max_rank"):
        embedding_neighbours(emb, V - len(SPECIAL), special_ids=SPECIAL)
    with pytest.raises(ValueError, match="special_ids"):
        embedding_neighbours(emb, 1, special_ids=(V,))
    with pytest.raises(ValueError, match="embedding"):
        embedding_neighbours(emb[0], 1)


def test_find_embedding_in_decoder_params():
    from jaxunlearn.models import Decoder, DecoderFn, ModelConfig

    cfg = ModelConfig(vocab_size=V, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    _, params = DecoderFn.of(model)
    np.testing.assert_array_equal(np.asarray(find_embedding(params)), np.asarray(model.embed.embedding[...]))
    with pytest.raises(ValueError, match="embedding="):
        find_embedding(bigram_params(V, 4))


# ------------------------------------------------------------------------------------------ neighbourhood


def test_neighbourhood_matches_a_loop(table, perturbed):
    _, nb = table
    cfg, (batch, out) = NB_CFG, perturbed
    ids, attn, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    b, t = ids.shape
    expect = np.repeat(ids[:, None, :], cfg.num_variants, axis=1)
    for r in range(b):
        ku, kj = jax.random.split(jax.random.fold_in(NB_KEY, NB_OFFSET + r))
        u = np.asarray(jax.random.uniform(ku, (cfg.num_variants, t)))
        j = np.asarray(jax.random.randint(kj, (cfg.num_variants, t), 0, cfg.max_rank))
        for k in range(cfg.num_variants):
            s_k = cfg.strengths[k * len(cfg.strengths) // cfg.num_variants]
            for pos in range(t):
                question = attn[r, pos] == 1 and lm[r, pos] == 0 and ids[r, pos] not in SPECIAL
                if question and u[k, pos] < s_k:
                    expect[r, k, pos] = nb[ids[r, pos], j[k, pos]]
    np.testing.assert_array_equal(out["input_ids"], expect)
    changed = out["input_ids"] != ids[:, None, :]
    np.testing.assert_array_equal(out["replaced"], changed)    # a neighbour is never the token itself
    assert 0 < changed.sum() < (attn * (lm == 0)).sum() * cfg.num_variants  # some, not all
    assert (out["input_ids"][changed] == nb[np.broadcast_to(ids[:, None, :], changed.shape)[changed], 1]).any()
    # never the answer, the padding or a special token (BOS, SEP)
    protected = (lm > 0) | (attn == 0) | np.isin(ids, SPECIAL)
    assert not (changed & protected[:, None, :]).any()
    for name in ("attention_mask", "loss_mask"):
        np.testing.assert_array_equal(out[name], np.repeat(batch[name][:, None, :], cfg.num_variants, axis=1))


def test_neighbourhood_rates_determinism_and_perturb_mask(table, perturbed):
    _, nb = table
    cfg, (batch, out) = NB_CFG, perturbed
    b, k, t = out["input_ids"].shape
    eligible = (batch["attention_mask"] == 1) & (batch["loss_mask"] == 0) & ~np.isin(batch["input_ids"], SPECIAL)
    per = k // len(cfg.strengths)
    for level, s in enumerate(cfg.strengths):
        hits = out["replaced"][:, level * per:(level + 1) * per][np.broadcast_to(eligible[:, None, :], (b, per, t))]
        assert abs(hits.mean() - s) < 4 * np.sqrt(s * (1 - s) / hits.size), (s, hits.mean(), hits.size)
    again = neighbourhood(NB_KEY, batch, cfg, V, neighbours=nb, row_offset=NB_OFFSET)
    np.testing.assert_array_equal(np.asarray(again["input_ids"]), out["input_ids"])
    other = neighbourhood(jax.random.key(8), batch, cfg, V, neighbours=nb, row_offset=NB_OFFSET)
    assert (np.asarray(other["input_ids"]) != out["input_ids"]).any()
    only_first = np.zeros_like(batch["loss_mask"])
    only_first[:, 1] = 1                                         # the first question token
    masked = neighbourhood(NB_KEY, {**batch, "perturb_mask": only_first}, cfg, V, neighbours=nb,
                           row_offset=NB_OFFSET)
    np.testing.assert_array_equal(np.asarray(masked["replaced"]), out["replaced"] & (only_first[:, None, :] > 0))


# ------------------------------------------------------------------------------------------ landscape


def _nll_numpy(params, ids, lm) -> float:
    """Mean answer NLL of one row of the bigram LM, float64."""
    e, w = (np.asarray(params[k], np.float64) for k in ("E", "W"))
    logits = e[ids] @ w + np.asarray(params["b"], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    tok = np.array([logp[t, ids[t + 1]] for t in range(len(ids) - 1)])
    return float(-(tok * lm[1:]).sum() / max(lm[1:].sum(), 1.0))


def test_landscape_losses_match_a_per_variant_loop():
    params = bigram_params(V, 6, seed=2, bias=True)
    nb = embedding_neighbours(params["E"], 2)                    # no special tokens in lm_batch
    cfg = LS_CFG
    batch = lm_batch(5, 4, vocab=V, seq=8, prompt=4)
    batch["attention_mask"][1, 6:] = 0                           # a padded row
    batch["loss_mask"][1, 6:] = 0
    key = jax.random.key(11)
    losses = np.asarray(landscape_losses(bigram_apply, params, batch, key, cfg, neighbours=nb, row_offset=2))
    assert losses.shape == (5, cfg.num_variants + 1)
    variants = np.asarray(neighbourhood(key, batch, cfg, V, neighbours=nb, row_offset=2)["input_ids"])
    for r in range(5):
        rows = [batch["input_ids"][r]] + [variants[r, k] for k in range(cfg.num_variants)]
        expect = [_nll_numpy(params, row, batch["loss_mask"][r]) for row in rows]
        np.testing.assert_allclose(losses[r], expect, rtol=1e-5, atol=1e-5)
    # the landscape is not flat by construction: perturbing the last question token moves the loss
    assert (np.abs(losses[:, 1:] - losses[:, :1]) > 1e-3).any()


def test_landscape_features_match_numpy():
    cfg = RemindConfig(num_variants=8)
    losses = np.random.default_rng(0).gamma(2.0, 1.0, size=(6, 9)).astype(np.float32)
    feats = np.asarray(landscape_features(losses, cfg))
    assert feats.shape == (6, len(REMIND_FEATURES))
    x = np.r_[0.0, variant_strengths(cfg)]
    for r, row in enumerate(losses.astype(np.float64)):
        var = row[1:]
        expect = [row[0], var.mean(), np.std(var), var.min(), var.max(), var.mean() - row[0],
                  np.polyfit(x, row, 1)[0]]
        np.testing.assert_allclose(feats[r], expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(landscape_features(losses, variant_strengths(cfg))), feats)
    with pytest.raises(ValueError, match="strengths"):
        landscape_features(losses, np.ones(5))
    with pytest.raises(ValueError, match="losses"):
        landscape_features(losses[0], cfg)


# ------------------------------------------------------------------------------------------ detector


def test_stratified_folds_are_balanced_partitions():
    y = np.r_[np.ones(13), np.zeros(11)]
    f = stratified_folds(y, 4, seed=0)
    for c in (0, 1):
        counts = np.bincount(f[y == c], minlength=4)
        assert counts.max() - counts.min() <= 1 and counts.sum() == (y == c).sum()
    np.testing.assert_array_equal(f, stratified_folds(y, 4, seed=0))
    assert (f != stratified_folds(y, 4, seed=1)).any()
    with pytest.raises(ValueError, match="folds"):
        stratified_folds(np.r_[np.ones(3), np.zeros(10)], 4)


def _scipy_logistic(x, y, l2):
    def f(th):
        z = x @ th[:-1] + th[-1]
        return np.sum(np.logaddexp(0, z) - y * z) + 0.5 * l2 * th[:-1] @ th[:-1]

    def g(th):
        p = 1 / (1 + np.exp(-(x @ th[:-1] + th[-1])))
        return np.r_[x.T @ (p - y) + l2 * th[:-1], np.sum(p - y)]

    th = scipy.optimize.minimize(f, np.zeros(x.shape[1] + 1), jac=g, method="BFGS", options={"gtol": 1e-10}).x
    return th[:-1], th[-1]


def test_fit_logistic_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 3))
    y = (rng.random(80) < 1 / (1 + np.exp(-(x @ [1.5, -1.0, 0.2] + 0.3)))).astype(float)
    for l2, xx in ((1.0, x), (0.1, x), (1.0, np.c_[x[:, 0], x[:, 0] * 0 + 3.0])):  # incl. a constant column
        w, b = fit_logistic(xx, y, l2=l2)
        w_ref, b_ref = _scipy_logistic(xx, y, l2)
        np.testing.assert_allclose(np.r_[w, b], np.r_[w_ref, b_ref], rtol=1e-5, atol=1e-6)
    sep = np.r_[np.ones(10), np.zeros(10)]                       # separable: finite thanks to the penalty
    w, b = fit_logistic(np.r_[np.ones(10) * 2, -np.ones(10) * 2][:, None], sep, l2=1.0)
    w_ref, b_ref = _scipy_logistic(np.r_[np.ones(10) * 2, -np.ones(10) * 2][:, None], sep, 1.0)
    np.testing.assert_allclose(np.r_[w, b], np.r_[w_ref, b_ref], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="l2"):
        fit_logistic(x, y, l2=0.0)


def _pairwise_auc(pos, neg) -> float:
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def test_remind_auc_matches_an_independent_pipeline():
    rng = np.random.default_rng(5)
    pos, neg = rng.normal(0.8, 1.0, size=(40, 3)), rng.normal(0.0, 1.0, size=(37, 3))
    x, y = np.r_[pos, neg], np.r_[np.ones(40), np.zeros(37)]
    folds = stratified_folds(y, 4, seed=2)
    aucs = []
    for f in range(4):
        tr, te = folds != f, folds == f
        mu, sd = x[tr].mean(0), x[tr].std(0)
        w, b = _scipy_logistic((x[tr] - mu) / sd, y[tr], 0.5)
        z = ((x[te] - mu) / sd) @ w + b
        aucs.append(_pairwise_auc(z[y[te] == 1], z[y[te] == 0]))
    got = remind_auc(pos, neg, seed=2, folds=4, l2=0.5)
    assert got == pytest.approx(np.mean(aucs), abs=1e-9)
    assert 0.6 < got < 0.95                                       # a non-degenerate case


def test_remind_auc_hand_cases():
    rng = np.random.default_rng(0)
    assert remind_auc(rng.normal(5, 1, (20, 4)), rng.normal(-5, 1, (20, 4))) == 1.0
    same = remind_auc(rng.normal(size=(300, 7)), rng.normal(size=(300, 7)))
    assert abs(same - 0.5) < 0.1, same
    # control: a detector scoring everything alike (AUC 0.5) would fail here; expected ~0.86
    shifted = rng.normal(size=(300, 7))
    shifted[:, 3] += 1.5
    assert remind_auc(shifted, rng.normal(size=(300, 7))) > 0.78
    flipped = remind_auc(-shifted, -rng.normal(size=(300, 7)))   # the classifier learns the sign
    assert flipped > 0.78


def test_remind_auc_bad_inputs():
    good = np.zeros((10, 3))
    for args, match in [((np.zeros((0, 3)), good), "features_pos"), ((np.zeros(10), good), "features_pos"),
                        ((good, np.full((10, 3), np.nan)), "features_neg"), ((good, np.zeros((10, 2))), "features"),
                        ((good, np.zeros((3, 3))), "features_neg has 3")]:
        with pytest.raises(ValueError, match=match):
            remind_auc(*args)
    with pytest.raises(ValueError, match="folds"):
        remind_auc(good, good, folds=1)


# ------------------------------------------------------------------------------------------ bad inputs


def test_landscape_calls_name_bad_arguments(table):
    _, nb = table
    cfg = RemindConfig(num_variants=4)
    batch, key = _qa_batch(), jax.random.key(0)
    params = bigram_params(V, 4)
    with pytest.raises(KeyError, match="loss_mask"):
        landscape_losses(bigram_apply, params, {k: batch[k] for k in ("input_ids", "attention_mask")}, key, cfg,
                         neighbours=nb)
    with pytest.raises(ValueError, match="attention_mask"):
        landscape_losses(bigram_apply, params, {**batch, "attention_mask": batch["attention_mask"][:, :-1]}, key,
                         cfg, neighbours=nb)
    with pytest.raises(ValueError, match="input_ids"):
        neighbourhood(key, {k: v[0] for k, v in batch.items()}, cfg, V, neighbours=nb)
    with pytest.raises(ValueError, match="neighbours"):
        neighbourhood(key, batch, cfg, V, neighbours=nb[:-1])
    with pytest.raises(ValueError, match="neighbours"):
        neighbourhood(key, batch, RemindConfig(num_variants=4, max_rank=3), V, neighbours=nb)
    with pytest.raises(ValueError, match="token ids"):
        neighbourhood(key, {**batch, "input_ids": batch["input_ids"] + V}, cfg, V, neighbours=nb)
    with pytest.raises(TypeError, match="key"):
        neighbourhood(0, batch, cfg, V, neighbours=nb)
    with pytest.raises(TypeError, match="cfg"):
        landscape_losses(bigram_apply, params, batch, key, {"num_variants": 4}, neighbours=nb)
    with pytest.raises(ValueError, match="neighbours"):
        landscape_losses(bigram_apply, params, batch, key, cfg, neighbours=None)


# ------------------------------------------------------------------------------------------ end to end


def test_remind_evaluate_end_to_end_and_batch_size_invariant():
    params = bigram_params(V, 6, seed=2, bias=True)
    cfg = LS_CFG
    forget, other = lm_batch(10, 1, vocab=V, seq=8, prompt=4), lm_batch(10, 2, vocab=V, seq=8, prompt=4)
    key = jax.random.key(4)
    res = remind_evaluate(bigram_apply, params, forget, other, key=key, cfg=cfg, batch_size=5,
                          embedding=params["E"], folds=3)
    assert res["features"] == list(REMIND_FEATURES)
    assert (res["n_pos"], res["n_neg"], res["forward_passes_per_example"]) == (10, 10, 5)
    nb = embedding_neighbours(params["E"], cfg.max_rank)

    def landscape(data, side):                                   # rows r of a set: fold_in(fold_in(key, side), r)
        return np.concatenate([landscape_losses(bigram_apply, params, {k: v[i:i + 5] for k, v in data.items()},
                                                jax.random.fold_in(key, side), cfg, neighbours=nb, row_offset=i)
                               for i in (0, 5)])

    feats = [np.asarray(landscape_features(landscape(data, side), cfg)) for side, data in enumerate((forget, other))]
    assert res["auc"] == pytest.approx(remind_auc(*feats, folds=3), abs=1e-12)
    np.testing.assert_allclose(list(res["feature_means"]["forget"].values()), feats[0].mean(0), rtol=1e-6)
    again = remind_evaluate(bigram_apply, params, forget, other, key=key, cfg=cfg, batch_size=4, neighbours=nb,
                            folds=3)                             # 4 rows a pass, the last padded
    assert again["auc"] == res["auc"] and again["feature_means"] == res["feature_means"]
    with pytest.raises(ValueError, match="encoded_forget"):
        remind_evaluate(bigram_apply, params, {k: v[:2] for k, v in forget.items()}, other, key=key, cfg=cfg,
                        neighbours=nb, folds=3)
    with pytest.raises(KeyError, match="encoded_other"):
        remind_evaluate(bigram_apply, params, forget, {"input_ids": other["input_ids"]}, key=key, cfg=cfg,
                        neighbours=nb)
    with pytest.raises(ValueError, match="embedding="):
        remind_evaluate(bigram_apply, params, forget, other, key=key, cfg=cfg, folds=3)
