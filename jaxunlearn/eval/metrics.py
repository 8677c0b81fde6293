"""Per-example answer metrics computed from logits (batch convention of ``jaxunlearn.losses``).

All functions are pure and jit-friendly; each returns one value per example. ``loss_mask`` is
the standard batch mask: 1 on the answer tokens *and* the closing EOS. Probability (like LOSS and
truth ratio) scores every masked token; :func:`extraction_strength` and
:func:`exact_memorization` drop the prediction of the last masked token (the EOS), as
open-unlearning's ``tokenwise_vocab_logprobs`` does (``src/evals/metrics/utils.py``: label
positions ``[:-1]``, "-1 to ignore eos prediction"); see :func:`jaxunlearn.eval.mia.tokenwise_mask`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxunlearn.eval.mia import tokenwise_mask
from jaxunlearn.losses import mean_token_nll

__all__ = ["answer_probability", "token_accuracy", "answer_stats", "extraction_strength", "exact_memorization"]


def answer_probability(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Length-normalised answer probability ``p = exp(-(1/|y|) sum_t NLL_t)`` per example (TOFU).

    Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", 2024.
    """
    return jnp.exp(-mean_token_nll(logits, input_ids, loss_mask))


def token_accuracy(logits: jax.Array, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Teacher-forced greedy token accuracy on *every* masked position.

    ``acc = sum_t m_t [argmax logits_{t-1} == x_t] / sum_t m_t`` per example (NaN-free: an
    example with an empty mask scores 0). With the batch ``loss_mask`` this counts the closing
    EOS too, so it is *not* open-unlearning's exact memorisation (which drops the EOS
    prediction): use :func:`exact_memorization` for that. It is kept for the ``token_acc``
    column and for ``fact_acc`` (accuracy on a ``fact_mask``, which has no EOS).
    """
    pred = jnp.argmax(logits[..., :-1, :], axis=-1)
    hit = (pred == input_ids[..., 1:]).astype(jnp.float32)
    m = mask[..., 1:].astype(jnp.float32)
    return jnp.sum(hit * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def answer_stats(logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
    """``probability``, ``nll`` (mean per token), ``token_acc`` and, if the batch has a
    ``fact_mask``, ``fact_acc`` (accuracy on the tokens carrying the fact) per example."""
    ids, lm = batch["input_ids"], batch["loss_mask"]
    out = {
        "nll": mean_token_nll(logits, ids, lm),
        "probability": answer_probability(logits, ids, lm),
        "token_acc": token_accuracy(logits, ids, lm),
    }
    if "fact_mask" in batch:
        out["fact_acc"] = token_accuracy(logits, ids, batch["fact_mask"])
    return out


def extraction_strength(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Extraction strength ``ES = 1 - k / n`` per example, as open-unlearning computes it.

    With ``y_1 .. y_n`` the masked tokens other than the last (the answer without its closing
    EOS; :func:`~jaxunlearn.eval.mia.tokenwise_mask`) and ``yhat_i`` the argmax of the logits
    predicting ``y_i`` given the true prefix, ``k`` is the smallest index in ``{0, ..., n - 1}``
    such that ``yhat_i == y_i`` for every ``i > k``, and ``k = n - 1`` when there is none.
    This is open-unlearning's ``extraction_strength`` (``src/evals/metrics/memorization.py``):
    its loop ``for k in range(n): if preds[k:] == labels[k:]: break`` leaves ``k = n - 1``
    when no suffix matches, so a row whose last prediction misses scores ``1 / n`` (not 0 as
    in the paper's ``min_k`` over ``{0, ..., n}``), and a one-token answer always scores 1.
    ``n = 0`` (a mask of at most one token) scores 0, as there.

    Computed without a loop: with ``k* = max_t miss_t rank_t`` the answer-rank of the last
    mismatch (0 if none), ``k = min(k*, n - 1)``.

    Args:
      logits: (..., T, V).
      input_ids: (..., T).
      loss_mask: (..., T), 1 on the answer tokens and the closing EOS (batch convention of
        ``jaxunlearn.losses``).

    Returns:
      float32 (...,) in [0, 1].

    References:
      Carlini et al., "Extracting Training Data from Large Language Models", USENIX Security
      2021; used for unlearning in Wang et al., "Towards Effective Evaluations and
      Comparisons for LLM Unlearning Methods", ICLR 2025 (as cited by open-unlearning).
    """
    pred = jnp.argmax(logits[..., :-1, :], axis=-1)
    m = tokenwise_mask(loss_mask)
    miss = (pred != input_ids[..., 1:]).astype(jnp.float32) * m
    rank = jnp.cumsum(m, axis=-1)
    n = jnp.sum(m, axis=-1)
    k = jnp.minimum(jnp.max(miss * rank, axis=-1), n - 1.0)
    return jnp.where(n > 0, 1.0 - k / jnp.maximum(n, 1.0), 0.0)


def exact_memorization(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Exact memorisation ``EM = (1/n) sum_i [yhat_i == y_i]`` per example, as open-unlearning.

    ``y_1 .. y_n`` are the masked tokens other than the last (the answer without its closing
    EOS; :func:`~jaxunlearn.eval.mia.tokenwise_mask`) and ``yhat_i`` the argmax of the logits
    predicting ``y_i`` given the true prefix (teacher forcing): open-unlearning's
    ``exact_memorization`` (``src/evals/metrics/memorization.py``) on
    ``tokenwise_vocab_logprobs``. ``n = 0`` gives NaN (open-unlearning's ``None``, left out of its
    mean; :func:`jaxunlearn.eval.tofu.forget_summary` leaves it out too).

    Args:
      logits: (..., T, V).
      input_ids: (..., T).
      loss_mask: (..., T), 1 on the answer tokens and the closing EOS.

    Returns:
      float32 (...,) in [0, 1], NaN for a row without a scored token.

    References:
      Tirumala et al., "Memorization Without Overfitting: Analyzing the Training Dynamics of
      Large Language Models", NeurIPS 2022 (as cited by open-unlearning).
    """
    pred = jnp.argmax(logits[..., :-1, :], axis=-1)
    m = tokenwise_mask(loss_mask)
    hit = (pred == input_ids[..., 1:]).astype(jnp.float32) * m
    n = jnp.sum(m, axis=-1)
    return jnp.where(n > 0, jnp.sum(hit, axis=-1) / jnp.maximum(n, 1.0), jnp.nan)
