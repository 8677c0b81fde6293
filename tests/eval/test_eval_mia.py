"""Membership-inference scores, ROC-AUC and privleak against brute-force / hand references."""

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.eval.mia import (
    mia_auc,
    mia_aucs,
    mia_scores,
    min_k_count,
    min_k_from_logprobs,
    min_k_plus_plus_score,
    min_k_score,
    privleak,
    roc_auc,
    token_logprob_moments,
    zlib_length,
    zlib_score,
)


def _brute_auc(pos, neg):
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos = rng.integers(0, 5, size=rng.integers(1, 9)).astype(float)  # many ties
        neg = rng.integers(0, 5, size=rng.integers(1, 9)).astype(float)
        assert roc_auc(pos, neg) == pytest.approx(_brute_auc(pos, neg), abs=1e-12)
    assert roc_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert roc_auc([1.0], [1.0]) == 0.5


def test_mia_auc_orientation_and_errors():
    # loss-like scores: members (forget) have lower loss -> AUC 1 (open-unlearning convention)
    assert mia_auc(forget_scores=[0.1, 0.2], holdout_scores=[1.0, 2.0]) == 1.0
    assert mia_auc(forget_scores=[1.0, 2.0], holdout_scores=[0.1, 0.2]) == 0.0
    got = mia_aucs({"mia_loss": np.array([0.1, 0.5]), "mia_min_k": np.array([1.0, 2.0])},
                   {"mia_loss": np.array([0.3, 0.9]), "mia_min_k": np.array([0.5, 1.5])}, attacks=("loss", "min_k"))
    assert got == {"loss": _brute_auc([0.3, 0.9], [0.1, 0.5]), "min_k": _brute_auc([0.5, 1.5], [1.0, 2.0])}
    with pytest.raises(ValueError, match="empty"):
        roc_auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([np.nan], [1.0])
    with pytest.raises(KeyError, match="mia_zlib"):
        mia_aucs({"mia_loss": np.ones(2)}, {"mia_loss": np.ones(2)}, attacks=("zlib",))


def test_privleak_hand_values():
    # MUSE / open-unlearning: ((1 - auc) - (1 - ref)) / (1 - ref) * 100
    assert privleak(0.5, 0.5) == pytest.approx(0.0)
    assert privleak(0.9, 0.5) == pytest.approx((0.1 - 0.5) / 0.5 * 100)  # -80: forget set still detectable
    assert privleak(0.2, 0.6) == pytest.approx((0.8 - 0.4) / 0.4 * 100)  # +100: over-unlearned
    with pytest.raises(ValueError, match="reference_auc"):
        privleak(0.5, 1.5)


def test_min_k_count_equals_python_int_of_product():
    for k in (0.1, 0.2, 0.3, 0.4, 0.6, 1.0):
        want = [max(1, int(n * k)) for n in range(300)]
        np.testing.assert_array_equal(min_k_count(np.arange(300), k), want)
    with pytest.raises(ValueError, match="k must be"):
        min_k_count(5, 0.0)


def test_min_k_hand_computed_sequence():
    # 5 answer tokens with log-probs [-1, -4, -0.5, -3, -2] (+ one masked -9): n = 5,
    # m = int(5 * 0.4) = 2, the two lowest are -4 and -3 -> score 3.5
    lp = jnp.asarray([[-1.0, -4.0, -9.0, -0.5, -3.0, -2.0]])
    mask = jnp.asarray([[1, 1, 0, 1, 1, 1]])
    np.testing.assert_allclose(min_k_from_logprobs(lp, mask, 0.4), [3.5])
    # n = 2 -> m = max(1, int(0.8)) = 1: the single lowest; empty mask -> 0
    np.testing.assert_allclose(min_k_from_logprobs(lp, jnp.asarray([[1, 1, 0, 0, 0, 0]]), 0.4), [4.0])
    np.testing.assert_allclose(min_k_from_logprobs(lp, jnp.zeros((1, 6)), 0.4), [0.0])


def _random_case(seed=0, b=3, t=7, v=11):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 2.0
    ids = rng.integers(0, v, size=(b, t)).astype(np.int32)
    mask = np.zeros((b, t), np.float32)
    mask[0, 2:] = 1
    mask[1, 4:6] = 1
    mask[2, 1:] = 1
    return logits, ids, mask


def _np_logprobs(logits, ids):
    lp = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
    return lp, np.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]


def _without_last(mask_row):
    """Prediction positions of the masked tokens but the last (the closing EOS).

    Min-k and Min-k++ changed on purpose (issue 11): they now leave out the EOS prediction, as
    open-unlearning's ``tokenwise_logprobs`` (label positions ``[:-1]``); the exact port of the
    reference is in test_open_unlearning_parity.py."""
    pos = np.nonzero(mask_row[1:] > 0)[0]
    return pos[:-1]


def test_min_k_score_matches_numpy_loop():
    logits, ids, mask = _random_case()
    _, tok = _np_logprobs(logits.astype(np.float64), ids)
    want = []
    for b in range(ids.shape[0]):
        vals = sorted(tok[b][_without_last(mask[b])])
        m = max(1, int(len(vals) * 0.4))
        want.append(-np.mean(vals[:m]))
    got = jax.jit(lambda *a: min_k_score(*a, k=0.4))(logits, ids, mask)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_min_k_plus_plus_matches_numpy_loop():
    logits, ids, mask = _random_case(1)
    lp_all, tok = _np_logprobs(logits.astype(np.float64), ids)
    want = []
    for b in range(ids.shape[0]):
        zs = []
        for t in _without_last(mask[b]):  # EOS prediction left out (see _without_last)
            p = np.exp(lp_all[b, t])
            mu = sum(p[v] * lp_all[b, t, v] for v in range(p.size))
            var = sum(p[v] * lp_all[b, t, v] ** 2 for v in range(p.size)) - mu ** 2
            zs.append((tok[b, t] - mu) / np.sqrt(max(var, 1e-6)))
        zs = sorted(zs)
        want.append(-np.mean(zs[: max(1, int(len(zs) * 0.4))]))
    got = jax.jit(lambda *a: min_k_plus_plus_score(*a, k=0.4))(logits, ids, mask)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_moments_of_uniform_and_point_mass():
    v = 8
    mu, s2 = token_logprob_moments(jnp.zeros((1, v)))
    np.testing.assert_allclose(mu, [-np.log(v)], rtol=1e-6)  # E[log p] = log(1/V), variance 0
    np.testing.assert_allclose(s2, [0.0], atol=1e-6)
    mu, s2 = token_logprob_moments(jnp.asarray([[0.0, np.log(3.0)]]))  # p = (1/4, 3/4)
    lp = np.log([0.25, 0.75])
    want_mu = 0.25 * lp[0] + 0.75 * lp[1]
    np.testing.assert_allclose(mu, [want_mu], rtol=1e-6)
    np.testing.assert_allclose(s2, [0.25 * lp[0] ** 2 + 0.75 * lp[1] ** 2 - want_mu ** 2], rtol=1e-5)


def test_mia_scores_loss_is_mean_nll():
    logits, ids, mask = _random_case(2)
    _, tok = _np_logprobs(logits.astype(np.float64), ids)
    want = [-(tok[b] * mask[b, 1:]).sum() / mask[b, 1:].sum() for b in range(3)]
    out = mia_scores(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    assert set(out) == {"loss", "min_k", "min_k_plus_plus"}
    np.testing.assert_allclose(out["loss"], want, rtol=1e-5)


def test_zlib_against_python_zlib():
    texts = ["The birthplace of Dabe Zisepu is the city of Velmstadt.", "aaaaaaaaaaaaaaaaaaaaaaaa", "é ü"]
    lengths = [len(zlib.compress(t.encode("utf-8"))) for t in texts]
    np.testing.assert_array_equal(zlib_length(texts), lengths)
    np.testing.assert_allclose(zlib_score([2.0, 3.0, 4.0], texts), np.array([2.0, 3.0, 4.0]) / lengths)
    with pytest.raises(ValueError, match="3 texts"):
        zlib_score([1.0, 2.0], texts)
