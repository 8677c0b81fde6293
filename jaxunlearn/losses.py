"""Sequence losses on answer tokens, and the unlearning objectives built on them.

Batch convention (shared by ``jaxunlearn.data``, training, evaluation and every
transform): a batch is a dict of arrays

- ``input_ids``      int32 (B, T): prompt tokens then answer tokens, padded;
- ``attention_mask`` int32 (B, T): 1 on real tokens, 0 on padding;
- ``loss_mask``      float32 (B, T): 1 on the tokens to be *predicted* (the
  answer tokens and the closing EOS), 0 on the prompt and the padding.

Logits at position t predict token t + 1, so the per-token log-probability of
token t (t >= 1) is ``log_softmax(logits[:, t-1])[input_ids[:, t]]`` and is
weighted by ``loss_mask[:, t]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "token_logprobs",
    "sequence_nll",
    "mean_token_nll",
]


def token_logprobs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Log-probability of each next token: ``out[b, t] = log p(x_{t+1} | x_{<=t})``.

    Args:
      logits: (..., T, V) model outputs.
      input_ids: (..., T) tokens.

    Returns:
      (..., T - 1) float32 log-probabilities of ``input_ids[..., 1:]``.
    """
    logits = logits[..., :-1, :].astype(jnp.float32)
    targets = input_ids[..., 1:]
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - logz


def sequence_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Summed NLL over answer tokens: ``-sum_t m_t log p(x_t | x_<t)`` per sequence.

    Args:
      logits: (..., T, V).
      input_ids: (..., T).
      loss_mask: (..., T), 1 on tokens to predict (see the module docstring).

    Returns:
      (...,) float32 summed negative log-likelihood of each sequence.
    """
    lp = token_logprobs(logits, input_ids)
    m = loss_mask[..., 1:].astype(jnp.float32)
    return -jnp.sum(lp * m, axis=-1)


def mean_token_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Length-normalised NLL ``sequence_nll / |y|`` per sequence (|y| = answer tokens, >= 1)."""
    m = loss_mask[..., 1:].astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return sequence_nll(logits, input_ids, loss_mask) / n
