"""TOFU aggregates (truth ratio, forget quality, model utility) and extraction strength, against
hand-computed values and scipy."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxunlearn.eval.metrics import answer_probability, extraction_strength
from jaxunlearn.eval.tofu import (
    forget_quality,
    forget_summary,
    harmonic_mean,
    model_utility,
    normalized_probability,
    truth_ratio,
    truth_ratio_forget_score,
    truth_ratio_retain_score,
    utility_components,
)
from jaxunlearn.losses import mean_token_nll

V = 6


def _logits_with_target_probs(ids, probs):
    """Logits whose softmax at position t gives ``probs[t]`` to ``ids[t + 1]`` and spreads the rest
    uniformly; rows: ``ids`` (T,), ``probs`` (T - 1,)."""
    t = len(ids)
    q = np.zeros((t, V))
    for i, p in enumerate(probs):
        q[i] = (1.0 - p) / (V - 1)
        q[i, ids[i + 1]] = p
    q[-1] = 1.0 / V
    return np.log(q).astype(np.float32)


def _case(answer_probs):
    """One sequence [BOS, q, SEP, a1, a2] with the two answer tokens at the given probabilities."""
    ids = np.array([0, 1, 2, 3, 4])
    probs = [0.9, 0.9, answer_probs[0], answer_probs[1]]  # prompt positions are not scored
    mask = np.array([0, 0, 0, 1, 1], np.float32)
    return _logits_with_target_probs(ids, probs), ids, mask


def test_truth_ratio_and_probability_from_known_logits():
    para = _case([0.5, 0.2])
    perts = [_case([0.1, 0.4]), _case([0.3, 0.3])]
    logits = jnp.asarray(np.stack([para[0]] + [p[0] for p in perts]))
    ids = jnp.asarray(np.stack([para[1]] + [p[1] for p in perts]))
    mask = jnp.asarray(np.stack([para[2]] + [p[2] for p in perts]))
    prob = answer_probability(logits, ids, mask)
    np.testing.assert_allclose(prob, [np.sqrt(0.1), np.sqrt(0.04), 0.3], rtol=1e-5)
    nll = np.asarray(mean_token_nll(logits, ids, mask)).astype(np.float64)
    r = truth_ratio(nll[:1], nll[None, 1:])
    p_pert = np.sqrt(np.sqrt(0.04) * 0.3)  # geometric mean of the perturbed answers' probabilities
    np.testing.assert_allclose(r, [p_pert / (np.sqrt(0.1) + 1e-10)], rtol=1e-5)
    assert r.dtype == np.float64
    # TOFU's original code: curr_stat_1 = exp(mean_k nll_pert - nll_para) = 1 / R (eps = 0)
    np.testing.assert_allclose(truth_ratio(nll[:1], nll[None, 1:], eps=0.0),
                               1.0 / np.exp(nll[1:].mean() - nll[0]), rtol=1e-12)


def test_truth_ratio_aggregates_hand_values():
    r = np.array([0.5, 2.0, 1.0])
    assert truth_ratio_forget_score(r) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert truth_ratio_retain_score(r) == pytest.approx((0.5 + 0.0 + 0.0) / 3)
    np.testing.assert_allclose(normalized_probability([0.5, 0.2], [[0.25, 0.25], [0.0, 0.2]]), [0.5, 0.5])


def test_truth_ratio_bad_inputs():
    with pytest.raises(ValueError, match="nll_correct has 2 rows but nll_perturbed 3"):
        truth_ratio(np.ones(2), np.ones((3, 4)))
    with pytest.raises(ValueError, match="nll_perturbed must be 2-D"):
        truth_ratio(np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="empty"):
        truth_ratio_forget_score([])
    with pytest.raises(ValueError, match="NaN"):
        truth_ratio_retain_score([1.0, np.nan])


def test_forget_quality_is_scipy_ks_pvalue():
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(size=40), rng.lognormal(0.5, size=30)
    assert forget_quality(a, b) == scipy.stats.ks_2samp(a, b).pvalue
    assert forget_quality(a, a) == 1.0
    assert forget_quality(a, 1e3 + a) < 1e-10
    with pytest.raises(ValueError, match="reference_truth_ratios is empty"):
        forget_quality(a, [])


def test_harmonic_mean_against_scipy_and_edge_cases():
    x = [0.2, 0.5, 0.9, 0.33]
    assert harmonic_mean(x) == pytest.approx(scipy.stats.hmean(x), rel=1e-12)
    assert harmonic_mean([0.5, 0.0, 1.0]) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        harmonic_mean([0.5, -0.1])
    with pytest.raises(ValueError, match="no values"):
        harmonic_mean([])


def test_model_utility_hand_computed():
    results = {
        "retain": {"probability": np.array([0.5, 0.7]), "rouge_l_recall": np.array([1.0, 0.5]),
                   "truth_ratio": np.array([0.5, 0.5])},
        "general": {"probability": np.array([0.9]), "normalized_probability": np.array([0.4]),
                    "rouge_l_recall": np.array([0.8]), "truth_ratio": np.array([0.0])},
    }
    comps = utility_components(results, retain_sets=["retain"], option_sets=["general"])
    want = {"retain/probability": 0.6, "retain/rouge_l": 0.75, "retain/truth_ratio": 0.5,
            "general/probability": 0.4, "general/rouge_l": 0.8, "general/truth_ratio": 1.0}
    assert comps == pytest.approx(want)
    assert list(comps) == list(want)
    assert model_utility(results) == pytest.approx(6 / sum(1 / v for v in want.values()))
    with pytest.raises(KeyError, match="'retain'.*rouge_l_recall"):
        model_utility({"retain": {"probability": np.ones(2)}}, option_sets=())
    with pytest.raises(KeyError, match="split 'general' not in the results"):
        model_utility({"retain": results["retain"]})


def test_forget_summary_hand_values():
    split = {"probability": np.array([0.2, 0.4]), "truth_ratio": np.array([0.5, 2.0]),
             "extraction_strength": np.array([1.0, 0.0]), "rouge_l_recall": np.array([0.5])}
    assert forget_summary(split) == pytest.approx(
        {"probability": 0.3, "truth_ratio": 0.5, "extraction_strength": 0.5, "rouge_l": 0.5})


def _es_reference(pred, ids, mask):
    """open-unlearning's loop on the masked tokens but the last (the closing EOS): the smallest
    k in 0..n-1 with every answer prediction from the k-th on correct, k = n - 1 if none."""
    pos = [t for t in range(1, len(ids)) if mask[t]][:-1]
    n = len(pos)
    if n == 0:
        return 0.0
    for k in range(n):
        if all(pred[t - 1] == ids[t] for t in pos[k:]):
            break
    return 1.0 - k / n


def test_extraction_strength_hand_cases_and_definition():
    # Changed on purpose (issue 11): extraction strength now follows open-unlearning exactly. The
    # mask's last token (the closing EOS) is not scored, and when no suffix matches the reference
    # loop leaves k = n - 1, so ES = 1/n (was 0); see test_open_unlearning_parity.py.
    ids = np.array([0, 1, 2, 3, 4, 5])
    mask = np.array([0, 0, 1, 1, 1, 1], np.float32)  # 3 answer tokens at positions 2..4, EOS at 5

    def logits_predicting(pred):  # argmax at position t is pred[t]
        out = np.zeros((len(ids), V), np.float32)
        out[np.arange(len(pred)), pred] = 5.0
        return out

    right = list(ids[1:])
    cases = {
        "all right": (right, 1.0),
        "first answer token wrong": ([1, 0, 3, 4, 5], 2 / 3),
        "second wrong": ([1, 2, 0, 4, 5], 1 / 3),
        "last answer token wrong: no suffix matches, 1/n": ([1, 2, 3, 0, 5], 1 / 3),
        "EOS wrong only (not scored)": ([1, 2, 3, 4, 0], 1.0),
        "prompt wrong only": ([0, 2, 3, 4, 5], 1.0),
    }
    for name, (pred, want) in cases.items():
        got = float(extraction_strength(jnp.asarray(logits_predicting(pred)), jnp.asarray(ids), jnp.asarray(mask)))
        assert got == pytest.approx(want), name
        assert got == pytest.approx(_es_reference(pred, ids, mask)), name
    assert float(extraction_strength(jnp.asarray(logits_predicting(right)), jnp.asarray(ids),
                                     jnp.zeros(6))) == 0.0
    one = np.array([0, 0, 0, 0, 1, 1], np.float32)  # a one-token answer scores 1 even when missed
    assert float(extraction_strength(jnp.asarray(logits_predicting([1, 2, 3, 0, 0])), jnp.asarray(ids),
                                     jnp.asarray(one))) == 1.0
    # random batch against the definition
    rng = np.random.default_rng(0)
    ids_b = rng.integers(0, 3, size=(20, 8))
    logits_b = rng.normal(size=(20, 8, 3)).astype(np.float32)
    mask_b = (np.arange(8)[None] >= rng.integers(1, 8, size=(20, 1))).astype(np.float32)
    got = extraction_strength(jnp.asarray(logits_b), jnp.asarray(ids_b), jnp.asarray(mask_b))
    assert got.dtype == jnp.float32
    want = [_es_reference(logits_b[i].argmax(-1), ids_b[i], mask_b[i]) for i in range(20)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
