"""Per-example answer metrics computed from logits (batch convention of ``jaxunlearn.losses``).

All functions are pure and jit-friendly; each returns one value per example.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxunlearn.losses import mean_token_nll

__all__ = ["answer_probability", "token_accuracy", "answer_stats"]


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
