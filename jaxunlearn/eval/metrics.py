"""Per-example answer metrics computed from logits (batch convention of ``jaxunlearn.losses``).

All functions are pure and jit-friendly; each returns one value per example.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxunlearn.losses import mean_token_nll

__all__ = ["answer_probability", "token_accuracy", "answer_stats", "extraction_strength"]


def answer_probability(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Length-normalised answer probability ``p = exp(-(1/|y|) sum_t NLL_t)`` per example (TOFU).

    Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", 2024.
    """
    return jnp.exp(-mean_token_nll(logits, input_ids, loss_mask))


def token_accuracy(logits: jax.Array, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Exact-match (teacher-forced) token accuracy on masked positions.

    ``acc = sum_t m_t [argmax logits_{t-1} == x_t] / sum_t m_t`` per example
    (NaN-free: an example with an empty mask scores 0).
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
    """Extraction strength ``ES = 1 - k* / |y|`` per example (teacher-forced greedy predictions).

    With ``y_1 .. y_n`` the answer tokens (``loss_mask``) and ``yhat_i`` the argmax of the
    logits predicting ``y_i`` given the true prefix, ``k*`` is the smallest ``k`` in
    ``{0, ..., n}`` such that ``yhat_i == y_i`` for every ``i > k``: the length of the prefix
    an attacker must be given before the model completes the rest of the answer by itself.
    ``k* = 0`` (ES = 1) if every prediction matches, ``k* = n`` (ES = 0) if the last one
    misses. Computed without a loop: ``k*`` is the answer-rank of the last mismatch,
    ``k* = max_t m_t miss_t cumsum(m)_t``. An example with an empty mask scores 0.

    This is the definition of Wang et al. (``min_k {k : f([x, y_<k]) = y_>=k}``) and of
    open-unlearning's ``extraction_strength``, except for one edge case: open-unlearning's
    Python loop over ``k in range(n)`` leaves ``k = n - 1`` when no suffix matches, so it
    reports ``1 / n`` where this function (and the paper's formula) gives 0.

    Args:
      logits: (..., T, V).
      input_ids: (..., T).
      loss_mask: (..., T), 1 on the answer tokens (batch convention of ``jaxunlearn.losses``).

    Returns:
      float32 (...,) in [0, 1].

    References:
      Carlini et al., "Extracting Training Data from Large Language Models", USENIX Security
      2021; used for unlearning in Wang et al., "Towards Effective Evaluations and
      Comparisons for LLM Unlearning Methods", ICLR 2025 (as cited by open-unlearning).
    """
    pred = jnp.argmax(logits[..., :-1, :], axis=-1)
    m = loss_mask[..., 1:].astype(jnp.float32)
    miss = (pred != input_ids[..., 1:]).astype(jnp.float32) * m
    rank = jnp.cumsum(m, axis=-1)
    k_star = jnp.max(miss * rank, axis=-1)
    n = jnp.sum(m, axis=-1)
    return jnp.where(n > 0, 1.0 - k_star / jnp.maximum(n, 1.0), 0.0)
