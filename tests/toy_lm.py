"""A bigram "language model" and random LM batches, shared by the unlearning tests.

``bigram_apply(params, ids, mask) = E[ids] @ W (+ b)``: causal, differentiable in every
leaf, and small enough that the tests' references (loops, numpy) are exact and fast.
On ``sys.path`` through ``pythonpath = ["tests"]`` in ``pyproject.toml``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def bigram_apply(params, ids, mask=None):
    """Logits ``E[ids] @ W``, plus ``b`` when the params have a bias; ``mask`` is unused."""
    logits = params["E"][ids] @ params["W"]
    return logits + params["b"] if "b" in params else logits


def bigram_params(vocab: int, dim: int, *, seed: int = 0, bias: bool = False) -> dict:
    """Normal ``E`` ``(vocab, dim)``, ``W`` ``(dim, vocab)`` and optionally ``b`` (scale 0.1), float32."""
    rng = np.random.default_rng(seed)
    params = {"E": jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32),
              "W": jnp.asarray(rng.normal(size=(dim, vocab)), jnp.float32)}
    if bias:
        params["b"] = jnp.asarray(rng.normal(size=(vocab,)) * 0.1, jnp.float32)
    return params


def lm_batch(n: int, seed: int, *, vocab: int, seq: int, prompt: int) -> dict:
    """``n`` random sequences (numpy); the first ``prompt`` tokens are unscored (``loss_mask`` 0)."""
    rng = np.random.default_rng(seed)
    lm = np.zeros((n, seq), np.float32)
    lm[:, prompt:] = 1
    return {"input_ids": rng.integers(0, vocab, (n, seq)).astype(np.int32),
            "attention_mask": np.ones((n, seq), np.int32), "loss_mask": lm}
