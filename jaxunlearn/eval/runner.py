"""Batched, jitted evaluation of encoded QA data with fixed batch shapes."""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.eval.metrics import answer_stats

__all__ = ["fixed_batches", "evaluate_encoded"]


def fixed_batches(data: Mapping[str, np.ndarray], batch_size: int, keys=None):
    """Yield ``(batch, n_valid)`` in order; the last batch is padded by repeating row 0
    so every batch has the same shape (one compilation); only the first ``n_valid``
    rows of a batch are real."""
    keys = list(keys or data.keys())
    n = len(data[keys[0]])
    if n == 0:
        raise ValueError("cannot evaluate an empty split")
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        n_valid = len(idx)
        if n_valid < batch_size:
            idx = np.concatenate([idx, np.zeros(batch_size - n_valid, idx.dtype)])
        yield {k: np.asarray(data[k])[idx] for k in keys}, n_valid


def evaluate_encoded(
    apply_fn: Callable, params, data: Mapping[str, np.ndarray], *, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Per-example :func:`~jaxunlearn.eval.metrics.answer_stats` over a whole encoded split.

    Args:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits``.
      params: the model parameters.
      data: encoded split (``input_ids``, ``attention_mask``, ``loss_mask``, optional ``fact_mask``).
      batch_size: rows per jitted call.

    Returns:
      ``{metric: np.ndarray of shape (N,)}``.
    """
    keys = [k for k in ("input_ids", "attention_mask", "loss_mask", "fact_mask") if k in data]

    @jax.jit
    def stats(params, batch):
        logits = apply_fn(params, batch["input_ids"], batch["attention_mask"])
        return answer_stats(logits, batch)

    parts: dict[str, list] = {}
    for batch, n_valid in fixed_batches(data, batch_size, keys):
        out = stats(params, {k: jnp.asarray(v) for k, v in batch.items()})
        for k, v in out.items():
            parts.setdefault(k, []).append(np.asarray(v)[:n_valid])
    return {k: np.concatenate(v) for k, v in parts.items()}
