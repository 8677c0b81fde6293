"""Selective Synaptic Dampening (SSD): retrain-free unlearning by shrinking forget-specific weights.

With importances I_f (on the forget set) and I_D (on all training data, or the retain set),
typically diagonal Fisher values, SSD dampens the parameters that are much more important
for the forget set than for the data overall::

    beta_i  = min(lam * I_D,i / I_f,i, 1)
    theta_i <- beta_i * theta_i   where I_f,i > alpha * I_D,i,   unchanged elsewhere.

Defaults alpha = 10 (selection), lam = 1 (dampening), as in the paper.

References:
  Foster, Schoepf and Brintrup, "Fast Machine Unlearning Without Retraining Through Selective
  Synaptic Dampening", AAAI 2024.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxunlearn import tree as jt
from jaxunlearn import validate as V
from jaxunlearn.tree import PyTree

__all__ = ["ssd_factors", "ssd"]


def _f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _check(owner: str, params: PyTree | None, importance_forget: PyTree, importance_full: PyTree,
           alpha, lam) -> None:
    """Argument checks of ``ssd`` / ``ssd_factors``; value checks on concrete inputs only."""
    V.check_scalar(owner, "alpha", alpha, min=0.0)
    V.check_scalar(owner, "lam", lam, min=0.0)
    first = "params" if params is not None else "importance_forget"
    params = importance_forget if params is None else params
    jt.check_nonempty(params, first)
    jt.check_same_shapes(params, importance_forget, (first, "importance_forget"))
    jt.check_same_shapes(params, importance_full, (first, "importance_full"))
    if first == "params":
        jt.check_finite(params, "params")
    jt.check_finite(importance_forget, "importance_forget")
    jt.check_finite(importance_full, "importance_full")
    jt.check_nonnegative(importance_forget, "importance_forget")
    jt.check_nonnegative(importance_full, "importance_full")


def ssd_factors(
    importance_forget: PyTree, importance_full: PyTree, *, alpha: float = 10.0, lam: float = 1.0
) -> PyTree:
    """The SSD multipliers ``beta_i`` (1 where a parameter is not selected), float32.

    Args:
      importance_forget: I_f >= 0.
      importance_full: I_D >= 0, same structure and shapes.
      alpha: selection threshold: parameter i is dampened iff ``I_f,i > alpha * I_D,i``.
      lam: dampening constant in ``min(lam * I_D,i / I_f,i, 1)``.

    Returns:
      A float32 pytree of factors in [0, 1].

    Raises:
      ValueError: as :func:`ssd` (without ``params``).
      TypeError: ``alpha`` or ``lam`` not a real scalar.
    """
    _check("ssd_factors", None, importance_forget, importance_full, alpha, lam)
    return _factors(importance_forget, importance_full, alpha, lam)


def _factors(importance_forget: PyTree, importance_full: PyTree, alpha, lam) -> PyTree:
    def one(f, d):
        ff, dd = _f32(f), _f32(d)
        sel = ff > alpha * dd  # implies ff > 0
        beta = jnp.minimum(lam * dd / jnp.where(sel, ff, 1.0), 1.0)
        return jnp.where(sel, beta, 1.0)

    return jax.tree.map(one, importance_forget, importance_full)


def ssd(
    params: PyTree,
    importance_forget: PyTree,
    importance_full: PyTree,
    *,
    alpha: float = 10.0,
    lam: float = 1.0,
) -> PyTree:
    """Selective Synaptic Dampening: ``theta_i *= min(lam I_D,i / I_f,i, 1)`` where ``I_f,i > alpha I_D,i``.

    Args:
      params: theta, any pytree of floating arrays.
      importance_forget: I_f >= 0 (e.g. the diagonal Fisher on the forget set).
      importance_full: I_D >= 0 (e.g. the diagonal Fisher on the full training set).
      alpha: selection threshold (default 10), >= 0; a scalar, may be traced.
      lam: dampening constant (default 1), >= 0; a scalar, may be traced.

    Returns:
      The dampened parameters, in the dtypes of ``params`` (multiplied in float32).

    Raises:
      ValueError: mismatched pytrees (naming the path), negative importances, a concrete
        ``alpha``/``lam`` that is negative, NaN or Inf (``"ssd.alpha must be ..."``);
        NaN/Inf in a concrete ``params`` or importance, naming the argument and leaf (a
        ``NonFiniteError``, also a ``FloatingPointError``). Traced values are not checked.
      TypeError: ``alpha`` or ``lam`` not a real scalar.

    References:
      Foster et al., AAAI 2024 (see the module docstring).
    """
    _check("ssd", params, importance_forget, importance_full, alpha, lam)
    beta = _factors(importance_forget, importance_full, alpha, lam)
    return jax.tree.map(lambda p, b: (_f32(p) * b).astype(jnp.result_type(p)), params, beta)
