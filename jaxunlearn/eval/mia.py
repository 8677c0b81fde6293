"""Membership-inference attacks on answers (LOSS, zlib, Min-k, Min-k++), ROC-AUC and privleak.

Scores follow open-unlearning's attacks (``src/evals/metrics/mia/``), in its orientation:
**a higher score means "less likely a member"** (a loss-like quantity), over the answer tokens
``y_1 .. y_n`` (the ``loss_mask`` positions, EOS included) with ``l_i = log p(y_i | x, y_<i)``:

- LOSS: ``-(1/n) sum_i l_i`` (Yeom et al., 2018);
- zlib: ``LOSS / len(zlib.compress(text.encode("utf-8")))`` with ``text`` the answer string
  (Carlini et al., 2021; open-unlearning decodes the answer's label tokens with special tokens
  skipped, which is the same string whenever the tokenizer round-trips);
- Min-k: ``-(1/m) sum`` of the ``m = max(1, floor(k n'))`` smallest ``l_i`` over the
  ``n' = n - 1`` tokens **without the last masked one** (the closing EOS) (Shi et al., 2024;
  ``k = 0.4`` in the TOFU configs);
- Min-k++: the same on ``z_i = (l_i - mu_i) / sigma_i`` with ``mu_i = sum_v p_v log p_v`` and
  ``sigma_i^2 = max(sum_v p_v (log p_v)^2 - mu_i^2, 1e-6)`` under the model's next-token
  distribution ``p`` at that position (Zhang et al., 2025), over the same ``n - 1`` tokens.

**Which tokens count.** The batch ``loss_mask`` covers the answer *and* its closing EOS. LOSS and
zlib (like probability and truth ratio) score every masked token, EOS included, as
open-unlearning's ``evaluate_probability`` does. Min-k and Min-k++ (like extraction strength and
exact memorisation in :mod:`jaxunlearn.eval.metrics`) drop the prediction of the last masked
token, as open-unlearning's ``tokenwise_logprobs`` / ``tokenwise_vocab_logprobs``
(``src/evals/metrics/utils.py``) do: they keep the label positions ``[:-1]`` ("-1 to ignore eos
prediction"); :func:`tokenwise_mask` is that mask. A row whose mask has at most one token scores 0
(open-unlearning's empty-row value).

``mia_auc(forget, holdout)`` is the ROC-AUC of telling holdout (label 1) from forget (label 0)
by the score, i.e. ``P(s_holdout > s_forget) + P(tie) / 2``: 1 when the forget answers are
much more likely under the model than the never-seen holdout answers (members detected),
0.5 when indistinguishable. ``privleak`` compares it with the reference model's AUC.

References:
  Yeom et al., "Privacy Risk in Machine Learning", 2018. Carlini et al., "Extracting Training
  Data from Large Language Models", 2021. Shi et al., "Detecting Pretraining Data from Large
  Language Models", ICLR 2024. Zhang et al., "Min-K%++: Improved Baseline for Detecting
  Pre-Training Data from Large Language Models", ICLR 2025. Shi et al., "MUSE: Machine
  Unlearning Six-Way Evaluation for Language Models", 2024 (PrivLeak).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from jaxunlearn.losses import mean_token_nll, token_logprobs

__all__ = [
    "MIA_ATTACKS",
    "tokenwise_mask",
    "min_k_count",
    "min_k_from_logprobs",
    "min_k_score",
    "min_k_plus_plus_score",
    "token_logprob_moments",
    "zlib_length",
    "zlib_score",
    "mia_scores",
    "roc_auc",
    "mia_auc",
    "mia_aucs",
    "privleak",
]

#: Attack names, in report order; ``evaluate_model`` stores per-example scores as ``mia_<name>``.
MIA_ATTACKS: tuple[str, ...] = ("loss", "zlib", "min_k", "min_k_plus_plus")
_SIGMA2_FLOOR = 1e-6


def tokenwise_mask(loss_mask: jax.Array) -> jax.Array:
    """The next-token-prediction mask of open-unlearning's ``tokenwise_logprobs``: the batch
    mask without the last masked token of each row (the closing EOS).

    ``out[..., t] = 1`` iff token ``t + 1`` is masked and is not the row's last masked token, so
    ``out`` is aligned with :func:`jaxunlearn.losses.token_logprobs` (``(..., T - 1)``). This is
    open-unlearning's ``actual_indices = (labels != IGNORE_INDEX).nonzero()[0][:-1]  # -1 to
    ignore eos prediction`` (``src/evals/metrics/utils.py``, ``tokenwise_logprobs`` and
    ``tokenwise_vocab_logprobs``). Jit-friendly.

    Args:
      loss_mask: (..., T), 1 on the answer tokens and the closing EOS (the batch convention of
        :mod:`jaxunlearn.losses`).

    Returns:
      float32 (..., T - 1).
    """
    m = jnp.asarray(loss_mask)[..., 1:] > 0
    idx = jnp.arange(m.shape[-1])
    last = jnp.max(jnp.where(m, idx, -1), axis=-1, keepdims=True)
    return (m & (idx != last)).astype(jnp.float32)


def min_k_count(num_tokens, k: float) -> np.ndarray:
    """``max(1, int(n * k))`` per entry, in float64 exactly as open-unlearning's Python code."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    n = np.asarray(num_tokens)
    return np.maximum(1, (n.astype(np.float64) * k).astype(np.int64))


def min_k_from_logprobs(values: jax.Array, mask: jax.Array, k: float) -> jax.Array:
    """``-(1/m) sum of the m smallest masked values``, ``m = max(1, floor(k n))``, ``n = sum(mask)``.

    Args:
      values: (..., L) per-token scores (log-probabilities, or Min-k++'s ``z``).
      mask: (..., L) 1 on the tokens that count.
      k: fraction in (0, 1] (static).

    Returns:
      float32 (...,); 0 for a row with an empty mask (as open-unlearning).
    """
    values = jnp.asarray(values, jnp.float32)
    m = jnp.asarray(mask).astype(bool)
    length = values.shape[-1]
    # m(n) for every possible n, computed on the host in float64 (exactly int(n * k)).
    table = jnp.asarray(min_k_count(np.arange(length + 1), k), jnp.int32)
    n = jnp.sum(m, axis=-1)
    count = table[n]
    ordered = jnp.sort(jnp.where(m, values, jnp.inf), axis=-1)
    take = jnp.arange(length) < count[..., None]
    total = jnp.sum(jnp.where(take, ordered, 0.0), axis=-1)
    return jnp.where(n > 0, -total / count.astype(jnp.float32), 0.0)


def min_k_score(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array, *, k: float = 0.4) -> jax.Array:
    """Min-k% Prob score of each sequence's answer tokens (higher = less likely a member).

    ``-(1/m) sum`` of the ``m = max(1, int(n' k))`` smallest ``log p(y_i | x, y_<i)`` over the
    ``n'`` masked tokens other than the last (the closing EOS): :func:`tokenwise_mask`, as
    open-unlearning's ``MinKProbAttack`` (``src/evals/metrics/mia/min_k.py``) on
    ``tokenwise_logprobs``. 0 when ``n' = 0``.

    Args:
      logits: (..., T, V).
      input_ids: (..., T).
      loss_mask: (..., T), 1 on the answer tokens and the closing EOS (``jaxunlearn.losses``
        convention).
      k: fraction of lowest log-probabilities averaged (TOFU: 0.4).

    Returns:
      float32 (...,).
    """
    return min_k_from_logprobs(token_logprobs(logits, input_ids), tokenwise_mask(loss_mask), k)


def token_logprob_moments(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and variance of ``log p`` under the next-token distribution at every position.

    ``mu_t = sum_v p_v log p_v``, ``sigma2_t = sum_v p_v (log p_v)^2 - mu_t^2`` with
    ``p = softmax(logits[..., t, :])``, in float32.

    Args:
      logits: (..., T, V).

    Returns:
      ``(mu, sigma2)``, each float32 (..., T).
    """
    lp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    p = jnp.exp(lp)
    mu = jnp.sum(p * lp, axis=-1)
    sigma2 = jnp.sum(p * lp * lp, axis=-1) - mu * mu
    return mu, sigma2


def min_k_plus_plus_score(
    logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array, *, k: float = 0.4
) -> jax.Array:
    """Min-k%++ score (higher = less likely a member).

    ``z_t = (log p(x_t) - mu_t) / sqrt(max(sigma2_t, 1e-6))`` with the moments of
    :func:`token_logprob_moments` at the position predicting ``x_t``, then
    :func:`min_k_from_logprobs` on ``z`` over :func:`tokenwise_mask` (the masked tokens but the
    last, the closing EOS), as open-unlearning's ``MinKPlusPlusAttack``
    (``src/evals/metrics/mia/min_k_plus_plus.py``) on ``tokenwise_vocab_logprobs``.

    Args:
      logits, input_ids, loss_mask, k: as in :func:`min_k_score`.

    Returns:
      float32 (...,).
    """
    mu, sigma2 = token_logprob_moments(logits[..., :-1, :])
    z = (token_logprobs(logits, input_ids) - mu) / jnp.sqrt(jnp.maximum(sigma2, _SIGMA2_FLOOR))
    return min_k_from_logprobs(z, tokenwise_mask(loss_mask), k)


def mia_scores(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array, *, k: float = 0.4) -> dict[str, jax.Array]:
    """The logit-based attack scores of a batch: ``loss``, ``min_k``, ``min_k_plus_plus``.

    ``loss_mask`` is the standard batch mask (answer + closing EOS). ``loss`` scores every
    masked token (EOS included); ``min_k`` / ``min_k_plus_plus`` drop the EOS prediction
    (:func:`tokenwise_mask`), both as open-unlearning does. (zlib needs the answer text:
    :func:`zlib_score` on the host, from ``loss``.) Jit-friendly.

    Returns:
      ``{name: float32 (...,)}``.
    """
    return {
        "loss": mean_token_nll(logits, input_ids, loss_mask),
        "min_k": min_k_score(logits, input_ids, loss_mask, k=k),
        "min_k_plus_plus": min_k_plus_plus_score(logits, input_ids, loss_mask, k=k),
    }


def zlib_length(texts: Sequence[str]) -> np.ndarray:
    """``len(zlib.compress(text.encode("utf-8")))`` of each text (the zlib "entropy" in bytes)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    return np.asarray([len(zlib.compress(t.encode("utf-8"))) for t in texts], np.float64)


def zlib_score(loss, texts: Sequence[str]) -> np.ndarray:
    """zlib attack: ``LOSS / zlib_length(text)`` per example (float64 (N,)).

    Args:
      loss: (N,) mean answer NLL (the LOSS score).
      texts: N answer strings.
    """
    loss = np.asarray(loss, np.float64)
    lengths = zlib_length(texts)
    if loss.shape != lengths.shape:
        raise ValueError(f"loss has shape {loss.shape} but there are {len(lengths)} texts")
    return loss / lengths


def _scores(name: str, x) -> np.ndarray:
    a = np.asarray(x, np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty: ROC-AUC needs at least one score on each side")
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN at rows {np.nonzero(np.isnan(a))[0].tolist()[:10]}")
    return a


def roc_auc(positive_scores, negative_scores) -> float:
    """Area under the ROC curve for "higher score = positive".

    ``AUC = P(s_pos > s_neg) + P(s_pos == s_neg) / 2`` over all pairs, computed in
    ``O(N log N)`` as the Mann-Whitney statistic with average ranks for ties:
    ``(sum of the positives' ranks - n_p (n_p + 1) / 2) / (n_p n_n)``.

    Args:
      positive_scores: (n_p,) scores of the positives.
      negative_scores: (n_n,) scores of the negatives.

    Returns:
      A float in [0, 1].
    """
    pos = _scores("positive_scores", positive_scores)
    neg = _scores("negative_scores", negative_scores)
    ranks = scipy.stats.rankdata(np.concatenate([pos, neg]))  # average ranks for ties
    n_p, n_n = pos.size, neg.size
    return float((ranks[:n_p].sum() - n_p * (n_p + 1) / 2.0) / (n_p * n_n))


def mia_auc(forget_scores, holdout_scores) -> float:
    """MIA ROC-AUC with open-unlearning's convention (``roc_auc_score`` with forget labelled 0,
    holdout 1, on loss-like scores): ``P(s_holdout > s_forget) + ties / 2``.

    1 = every forget (member) example looks more likely than every holdout example; 0.5 =
    indistinguishable; below 0.5 = forget examples look *less* likely than unseen ones
    (over-unlearning).
    """
    return roc_auc(holdout_scores, forget_scores)


def mia_aucs(
    forget: Mapping[str, np.ndarray], holdout: Mapping[str, np.ndarray], attacks: Sequence[str] = MIA_ATTACKS
) -> dict[str, float]:
    """``{attack: mia_auc(forget["mia_<attack>"], holdout["mia_<attack>"])}`` for per-split results
    of ``evaluate_model``."""
    out = {}
    for a in attacks:
        key = f"mia_{a}"
        for side, res in (("forget", forget), ("holdout", holdout)):
            if key not in res:
                raise KeyError(f"{side} results have no {key!r} (attacks: {MIA_ATTACKS})")
        out[a] = mia_auc(forget[key], holdout[key])
    return out


def privleak(auc: float, reference_auc: float, *, eps: float = 1e-10) -> float:
    """PrivLeak (MUSE) as open-unlearning computes it from AUCs in its convention:

    ``((1 - AUC) - (1 - AUC_ref)) / ((1 - AUC_ref) + eps) * 100``

    with ``AUC_ref`` the reference (retain-only) model's MIA AUC on the same forget/holdout
    sets (MUSE reports AUCs as ``1 - x`` of ours, hence the ``1 -``). 0 = leaks as much as a
    model that never saw the forget set; negative = the forget set is still detectable
    (under-unlearning); positive = over-unlearning.

    Args:
      auc: :func:`mia_auc` of the evaluated model.
      reference_auc: :func:`mia_auc` of the reference model.
      eps: as in open-unlearning.

    Returns:
      A percentage.
    """
    for name, v in (("auc", auc), ("reference_auc", reference_auc)):
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    score, ref = 1.0 - float(auc), 1.0 - float(reference_auc)
    return (score - ref) / (ref + eps) * 100.0
