"""Optimizer state in float32 whatever the parameters' dtype.

:func:`float32_state` wraps an optax transformation so that its state (Adam's moments ``mu`` and
``nu``, momentum buffers) is created and updated in float32 and the updates it returns are
float32: with ``bfloat16`` parameters (``ModelConfig(param_dtype="bfloat16")``, half the
parameter memory), optax would otherwise keep the moments in bfloat16, whose 8-bit mantissa
loses the small second-moment increments ``(1 - b2) g^2``. ``optax.apply_updates`` then adds the
float32 update to each parameter in float32 and rounds once to the parameter's dtype. For
float32 parameters the wrapper changes nothing (every cast is the identity).

This is the "bfloat16 parameters, float32 optimizer moments" regime of large-model fine-tuning
(e.g. Llama training recipes keep the optimizer in float32); gradients and the model's compute
stay in the parameters' and the compute dtype.

>>> import optax
>>> tx = float32_state(optax.adam(1e-3))
>>> p = {"w": jnp.ones(3, jnp.bfloat16)}
>>> s = tx.init(p)
>>> s[0].mu["w"].dtype, s[0].nu["w"].dtype
(dtype('float32'), dtype('float32'))
>>> u, s = tx.update({"w": jnp.ones(3, jnp.bfloat16)}, s, p)
>>> u["w"].dtype
dtype('float32')
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["float32_state"]


def _to_f32(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def float32_state(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` with its state and updates in float32 (module docstring).

    ``init(params) = tx.init(float32(params))``;
    ``update(g, state, params) = tx.update(float32(g), state, float32(params))``: floating
    leaves are cast, others kept. Extra keyword arguments are forwarded (``optax.chain`` 's
    ``ExtraArgs`` protocol).

    Args:
      tx: any optax transformation.

    Returns:
      The wrapped ``optax.GradientTransformationExtraArgs``.
    """
    inner = optax.with_extra_args_support(tx)

    def init_fn(params):
        return inner.init(_to_f32(params))

    def update_fn(updates, state, params=None, **extra):
        return inner.update(_to_f32(updates), state, None if params is None else _to_f32(params), **extra)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
