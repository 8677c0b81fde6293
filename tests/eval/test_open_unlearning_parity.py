"""Min-k, Min-k++, extraction strength and exact memorisation against a numpy port of
open-unlearning's reference code (github.com/locuslab/open-unlearning, commit
d3d7cf9e6b3c125d16687d4232680d8d83548f1a):

- ``src/evals/metrics/utils.py``: ``evaluate_probability``, ``tokenwise_logprobs``,
  ``tokenwise_vocab_logprobs`` (label positions ``[:-1]``: "-1 to ignore eos prediction");
- ``src/evals/metrics/mia/min_k.py``: ``MinKProbAttack.compute_score``;
- ``src/evals/metrics/mia/min_k_plus_plus.py``: ``MinKPlusPlusAttack.compute_score``;
- ``src/evals/metrics/memorization.py``: ``exact_memorization._exact_memorization``,
  ``extraction_strength._extraction_strength``.

The reference batch has ``labels = input_ids`` on the answer tokens and the closing EOS and
``IGNORE_INDEX = -100`` elsewhere: exactly jaxunlearn's ``loss_mask``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxunlearn.eval as ev

IGNORE_INDEX = -100
K = 0.4
EOS = 1


# ------------------------------------------------------------------ the reference, ported
def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ref_evaluate_probability(logits, labels):
    """``evaluate_probability``: avg_loss = sum of the CE over labels[1:] / #labels."""
    lp = _log_softmax(logits[:, :-1])
    shifted = labels[:, 1:]
    out = []
    for i in range(len(labels)):
        keep = shifted[i] != IGNORE_INDEX
        nll = -lp[i, np.arange(shifted.shape[1])[keep], shifted[i][keep]].sum()
        out.append(nll / (labels[i] != IGNORE_INDEX).sum())
    return np.asarray(out)


def ref_tokenwise_logprobs(logits, input_ids, labels):
    log_probs = _log_softmax(logits)[:, :-1, :]
    next_tokens = input_ids[:, 1:]
    target = np.take_along_axis(log_probs, next_tokens[..., None], axis=2)[..., 0]
    out_lp, out_labels = [], []
    for i in range(len(labels)):
        actual = np.nonzero(labels[i] != IGNORE_INDEX)[0][:-1]  # -1 to ignore eos prediction
        if actual.size == 0:
            out_lp.append(np.zeros(0))
            out_labels.append(np.zeros(0, np.int64))
            continue
        start, end = actual[0], actual[-1]
        out_lp.append(target[i, start - 1:end])
        out_labels.append(labels[i][actual])
    return out_lp, out_labels


def ref_tokenwise_vocab_logprobs(logits, labels):
    log_probs = _log_softmax(logits)[:, :-1, :]
    out_lp, out_labels = [], []
    for i in range(len(labels)):
        actual = np.nonzero(labels[i] != IGNORE_INDEX)[0][:-1]  # -1 to ignore eos prediction
        if actual.size == 0:
            out_lp.append(np.zeros((0, logits.shape[-1])))
            out_labels.append(np.zeros(0, np.int64))
            continue
        start, end = actual[0], actual[-1]
        out_lp.append(log_probs[i, start - 1:end])
        out_labels.append(labels[i][actual])
    return out_lp, out_labels


def ref_min_k(lp, k=K):
    if lp.size == 0:
        return 0
    num_k = max(1, int(len(lp) * k))
    return -np.mean(np.sort(lp)[:num_k])


def ref_min_k_plus_plus(all_probs, target_prob, k=K):
    if len(target_prob) == 0:
        return 0
    mu = (np.exp(all_probs) * all_probs).sum(-1)
    sigma = (np.exp(all_probs) * np.square(all_probs)).sum(-1) - np.square(mu)
    sigma = np.maximum(sigma, 1e-6)
    scores = (target_prob - mu) / np.sqrt(sigma)
    num_k = max(1, int(len(scores) * k))
    return -np.mean(sorted(scores)[:num_k])


def ref_exact_memorization(log_probs, labels):
    valid_len = len(labels)
    if valid_len == 0:
        return None
    preds = np.argmax(log_probs, axis=-1)
    return (preds == labels).sum() / valid_len


def ref_extraction_strength(log_probs, labels):
    valid_len = len(labels)
    preds = np.argmax(log_probs, axis=-1)
    for k in range(valid_len):
        if np.array_equal(preds[k:], labels[k:]):
            break
    if valid_len == 0:
        return 0
    return 1 - (k / valid_len)


# ------------------------------------------------------------------ data
def _batch(seed, v=6, t=14, answer_lengths=(0, 1, 1, 2, 3, 4, 5, 6, 7, 3, 5, 8)):
    """Random logits; row i: a prompt, ``answer_lengths[i]`` answer tokens, EOS, right padding.

    Some rows have greedy predictions forced right on the whole answer (ES = EM = 1), some on all
    but the last answer token (no suffix matches: ES = 1/n); the rest are random (small vocab,
    so partial matches are frequent).
    """
    rng = np.random.default_rng(seed)
    b = len(answer_lengths)
    logits = rng.normal(size=(b, t, v)) * 2.0
    ids = np.zeros((b, t), np.int64)
    mask = np.zeros((b, t), np.float32)
    for i, n in enumerate(answer_lengths):
        p = int(rng.integers(1, t - n - 1))  # prompt length >= 1
        ids[i, :p] = rng.integers(2, v, size=p)
        ids[i, p:p + n] = rng.integers(2, v, size=n)
        ids[i, p + n] = EOS
        mask[i, p:p + n + 1] = 1
        mode = i % 3
        if mode in (1, 2) and n > 0:  # force the answer's greedy predictions right ...
            for pos in range(p, p + n):
                logits[i, pos - 1, ids[i, pos]] = logits[i, pos - 1].max() + 3.0  # not a point mass:
                # Min-k++ divides by sigma, which float32 resolves badly near a point mass
            if mode == 2:  # ... but the last answer token's wrong: no suffix matches
                logits[i, p + n - 2, ids[i, p + n - 1]] = logits[i, p + n - 2].min() - 3.0
    labels = np.where(mask > 0, ids, IGNORE_INDEX)
    return logits.astype(np.float32), ids, mask, labels


def _reference(logits, ids, labels):
    lg = logits.astype(np.float64)
    tok_lp, _ = ref_tokenwise_logprobs(lg, ids, labels)
    voc_lp, voc_labels = ref_tokenwise_vocab_logprobs(lg, labels)
    em = [ref_exact_memorization(a, y) for a, y in zip(voc_lp, voc_labels)]
    return {
        "loss": ref_evaluate_probability(lg, labels),
        "min_k": np.asarray([ref_min_k(x) for x in tok_lp], np.float64),
        "min_k_plus_plus": np.asarray([ref_min_k_plus_plus(a, x) for a, x in zip(voc_lp, tok_lp)], np.float64),
        "extraction_strength": np.asarray([ref_extraction_strength(a, y) for a, y in zip(voc_lp, voc_labels)],
                                          np.float64),
        "exact_memorization": np.asarray([np.nan if e is None else e for e in em], np.float64),
    }


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_four_scores_match_open_unlearning(seed):
    logits, ids, mask, labels = _batch(seed)
    want = _reference(logits, ids, labels)
    args = (jnp.asarray(logits), jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    mia = jax.jit(lambda *a: ev.mia_scores(*a, k=K))(*args)
    es = jax.jit(ev.extraction_strength)(*args)
    em = jax.jit(ev.exact_memorization)(*args)
    np.testing.assert_allclose(mia["loss"], want["loss"], rtol=1e-5)  # LOSS keeps the EOS
    np.testing.assert_allclose(mia["min_k"], want["min_k"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mia["min_k_plus_plus"], want["min_k_plus_plus"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(es, want["extraction_strength"], rtol=1e-6)
    np.testing.assert_allclose(em, want["exact_memorization"], rtol=1e-6)  # NaN where the reference has None
    # the data exercises the edge cases
    n = mask.sum(1) - 1  # answer tokens without the EOS
    assert np.isnan(want["exact_memorization"][n == 0]).all() and (want["extraction_strength"][n == 0] == 0).all()
    assert (want["extraction_strength"][n == 1] == 1.0).all()  # one-token answer: always 1
    no_suffix = (np.arange(len(n)) % 3 == 2) & (n > 1)
    np.testing.assert_allclose(want["extraction_strength"][no_suffix], 1.0 / n[no_suffix])
    assert (want["extraction_strength"][(np.arange(len(n)) % 3 == 1) & (n > 0)] == 1.0).all()


def test_the_eos_prediction_is_what_differs():
    """Min-k / ES / EM ignore the EOS prediction entirely; LOSS does not."""
    logits, ids, mask, labels = _batch(3)
    eos_pos = np.asarray([np.nonzero(m)[0][-1] for m in mask])
    other = logits.copy()
    other[np.arange(len(ids)), eos_pos - 1] = np.random.default_rng(9).normal(size=(len(ids), logits.shape[-1])) * 5
    outs = []
    for lg in (logits, other):
        args = (jnp.asarray(lg), jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
        outs.append({**ev.mia_scores(*args), "es": ev.extraction_strength(*args),
                     "em": ev.exact_memorization(*args)})
    for key in ("min_k", "min_k_plus_plus", "es", "em"):
        np.testing.assert_array_equal(outs[0][key], outs[1][key], err_msg=key)
    assert not np.allclose(outs[0]["loss"], outs[1]["loss"])


def test_tokenwise_mask_drops_the_last_masked_token():
    lm = jnp.asarray([[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 0, 0]], jnp.float32)
    np.testing.assert_array_equal(ev.tokenwise_mask(lm), [[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])


def test_forget_summary_averages_exact_memorization_over_defined_rows():
    split = {"probability": np.array([0.2, 0.4, 0.6]), "exact_memorization": np.array([1.0, np.nan, 0.5])}
    assert ev.forget_summary(split) == pytest.approx({"probability": 0.4, "exact_memorization": 0.75})
    nan = ev.forget_summary({"exact_memorization": np.array([np.nan])})["exact_memorization"]
    assert np.isnan(nan)
