"""Greedy generation with a preallocated KV cache, compiled as one ``jax.jit`` program.

The prompt batch is left-padded (``attention_mask`` rows are 0...0 1...1). The cache holds
``S = prompt_len + max_new_tokens`` slots per layer (one stacked ``(L, ...)`` cache of a
``scan_layers`` model, updated inside its layer scan); slot ``j < prompt_len`` holds prompt token
``j`` (padding included, hidden by the mask), slot ``prompt_len + i - 1`` the token emitted at step
``i - 1``. RoPE positions count real tokens only (``cumsum(mask) - 1``), as Hugging Face
``generate`` does, so a row's output does not depend on how much padding it carries.

Algorithm: one prefill forward over the prompt fills slots ``0 .. P-1`` and gives token 0 (argmax
of the last logits); then a ``lax.while_loop`` feeds back one token per step (shapes static), and
stops early once every row has emitted an EOS. After its EOS a row emits ``pad_token_id``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn.models.decoder import Decoder, _check_ids_mask, default_positions

__all__ = ["generate"]


def _eos_tuple(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(e) for e in eos_token_id)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens",))
def _generate_jit(graphdef, state, input_ids, attention_mask, eos_ids, pad_id, *, max_new_tokens: int):
    """The compiled decode; ``eos_ids`` (E,) int32 (-1 = none) and ``pad_id`` are traced, so changing
    them does not recompile."""
    model = nnx.merge(graphdef, state)
    b, p = input_ids.shape
    n = max_new_tokens
    cache = model.init_cache(b, p + n)
    mask = attention_mask.astype(jnp.int32)
    kv_mask = jnp.concatenate([mask, jnp.ones((b, n), jnp.int32)], axis=1)
    positions = default_positions(mask)
    logits, cache = model.decode(input_ids, positions=positions, kv_mask=kv_mask, cache=cache, cache_index=0)

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)

    tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.broadcast_to(pad_id, (b, n)).astype(jnp.int32).at[:, 0].set(tok)
    done = is_eos(tok)
    last_pos = positions[:, -1]

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, out, tok, done, cache = carry
        # feed the token of step i-1 (slot p+i-1, position last_pos+i), emit the token of step i
        logits, cache = model.decode(tok[:, None], positions=(last_pos + i)[:, None], kv_mask=kv_mask,
                                     cache=cache, cache_index=p + i - 1)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (jnp.int32(0), i))
        return i + 1, out, nxt, done | is_eos(nxt), cache

    carry = (jnp.int32(1), out, tok, done, cache)
    _, out, _, _, _ = jax.lax.while_loop(cond, body, carry)
    return out


def generate(model: Decoder, input_ids: jax.Array, attention_mask: jax.Array | None,
             max_new_tokens: int, *, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int = 0) -> jax.Array:
    """Greedy decoding: ``x_{t+1} = argmax_v logits(x_{<=t})[v]`` for ``max_new_tokens`` steps.

    Args:
      model: a :class:`~jaxunlearn.models.Decoder`.
      input_ids: int (B, P) prompts, **left**-padded.
      attention_mask: (B, P) 0/1, each row zeros then ones with at least one 1 (``None``: no padding).
      max_new_tokens: number of tokens to produce (static; one compilation per value).
      eos_token_id: id or ids that end a row (``None``: never stop); the EOS itself is emitted.
      pad_token_id: emitted by a row after its EOS.

    Returns:
      int32 (B, max_new_tokens) generated tokens (the prompt is not included). Equals re-running
      the full forward on the growing sequence at every step (what Hugging Face
      ``generate(do_sample=False)`` computes), without the quadratic recomputation.

    Raises:
      ValueError: non-2-D or mismatched inputs, ``max_new_tokens < 1``, a right-padded or empty
        prompt row (checked when the mask is concrete).
    """
    if not isinstance(model, Decoder):
        raise TypeError(f"model must be a Decoder, got {type(model).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    input_ids, attention_mask = _check_ids_mask(input_ids, attention_mask)
    if input_ids.shape[1] < 1:
        raise ValueError("input_ids has no prompt tokens (seq_len 0)")
    if not isinstance(attention_mask, jax.core.Tracer):
        m = np.asarray(attention_mask).astype(np.int64)
        if not np.isin(m, (0, 1)).all():
            raise ValueError("attention_mask must contain only 0 and 1")
        if (m[:, -1] != 1).any() or (np.diff(m, axis=1) < 0).any():
            rows = np.nonzero((m[:, -1] != 1) | (np.diff(m, axis=1) < 0).any(axis=1))[0].tolist()
            raise ValueError(
                f"prompts must be left-padded (mask rows 0...0 1...1, last token real); rows {rows} are not"
            )
    graphdef, state = nnx.split(model)
    eos = _eos_tuple(eos_token_id) or (-1,)
    return _generate_jit(graphdef, state, input_ids, attention_mask, jnp.asarray(eos, jnp.int32),
                         jnp.asarray(pad_token_id, jnp.int32), max_new_tokens=int(max_new_tokens))
