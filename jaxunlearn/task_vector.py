"""Task vectors, task negation and PerTA (per-parameter task arithmetic).

Notation: theta_0 the target model, theta_ft the target fine-tuned further on the forget
set, tau = theta_ft - theta_0 the forget task vector.

- Task negation (Ilharco et al., 2023): theta = theta_0 - alpha * tau, i.e.
  ``apply_task_vector(base, tau, -alpha)``.
- PerTA: theta = theta_0 - lambda * (w * tau) elementwise, with per-parameter weights
  w_i = I_f,i / (I_f,i + a I_r,i + eps) in [0, 1] comparing the importance of parameter i
  for the forget set (I_f) with its importance for the retain set (I_r). Parameters that
  matter for the retain set are moved less. See ``perta`` for the two importance choices.

Arithmetic is done in float32 and the result is cast back to the dtype of ``base``.

Checks. Every function checks concrete inputs for NaN/Inf and raises
:class:`jaxunlearn.tree.NonFiniteError` (a ``ValueError`` and a ``FloatingPointError``)
naming the argument and the first bad leaf, e.g. ``"importance_forget has NaN values at
'layers/0/kernel'"``. Scalars (``strength``, ``scale``) may be traced: their values are
checked only when concrete, so the functions work under ``jax.jit`` with traced scalars
and skip the value checks of traced arrays (check at the boundary).

References:
  Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import tree as jt
from jaxunlearn import validate as V
from jaxunlearn.tree import PyTree

__all__ = [
    "task_vector",
    "apply_task_vector",
    "perta_weights",
    "ratio_weight_fn",
    "perta",
]

WeightFn = Callable[[jax.Array, jax.Array], jax.Array]


def _f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _is_scalar(s) -> bool:
    if isinstance(s, (int, float, np.integer, np.floating)) and not isinstance(s, bool):
        return True
    return hasattr(s, "ndim") and hasattr(s, "dtype") and s.ndim == 0


def _check_importances(importance_forget: PyTree, importance_retain: PyTree) -> None:
    jt.check_nonempty(importance_forget, "importance_forget")
    jt.check_same_shapes(importance_forget, importance_retain, ("importance_forget", "importance_retain"))
    jt.check_finite(importance_forget, "importance_forget")
    jt.check_finite(importance_retain, "importance_retain")
    jt.check_nonnegative(importance_forget, "importance_forget")
    jt.check_nonnegative(importance_retain, "importance_retain")


def task_vector(finetuned: PyTree, base: PyTree) -> PyTree:
    """The task vector ``tau = finetuned - base``, leafwise.

    Args:
      finetuned: parameters after fine-tuning (on the forget set, for unlearning).
      base: the parameters it started from; same structure, shapes and dtypes.

    Returns:
      ``finetuned - base`` in the dtype of ``base`` (computed in float32).

    Raises:
      ValueError: naming the first path where structure, shape or dtype differ, or the
        first leaf with NaN/Inf (concrete inputs; a ``NonFiniteError``).

    References:
      Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
    """
    jt.check_nonempty(base, "base")
    jt.check_same_shapes(finetuned, base, ("finetuned", "base"), dtypes=True)
    jt.check_finite(finetuned, "finetuned")
    jt.check_finite(base, "base")
    return jax.tree.map(lambda f, b: (_f32(f) - _f32(b)).astype(jnp.result_type(b)), finetuned, base)


def apply_task_vector(base: PyTree, tau: PyTree, scale) -> PyTree:
    """``base + scale * tau``, leafwise; task negation is ``scale = -alpha``.

    Args:
      base: parameters theta_0.
      tau: a task vector with the structure and shapes of ``base``.
      scale: a scalar (Python number or 0-d array, possibly traced) applied to every leaf,
        or a pytree with the structure of ``base`` whose leaves broadcast to the
        corresponding leaf of ``base`` (per-parameter weights, e.g. ``-lambda * w``).

    Returns:
      ``base + scale * tau`` in the dtypes of ``base`` (computed in float32).

    Raises:
      ValueError: mismatched structure or shapes (naming the path); NaN/Inf in a concrete
        ``base``, ``tau`` or ``scale`` (naming the argument and leaf; a ``NonFiniteError``).

    References:
      Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.

    >>> import jax.numpy as jnp
    >>> apply_task_vector({"w": jnp.ones(2)}, {"w": jnp.ones(2)}, -0.5)["w"]
    Array([0.5, 0.5], dtype=float32)
    """
    jt.check_nonempty(base, "base")
    jt.check_same_shapes(base, tau, ("base", "tau"))
    jt.check_finite(base, "base")
    jt.check_finite(tau, "tau")
    if _is_scalar(scale):
        V.check_scalar("apply_task_vector", "scale", scale)
    else:
        _check_scale_tree(base, scale)
        jt.check_finite(scale, "scale")
    return _apply_task_vector(base, tau, scale)


def _check_scale_tree(base: PyTree, scale: PyTree) -> None:
    jt.check_same_structure(base, scale, ("base", "scale"))
    for (p, b), (_, s) in zip(jt.leaves_with_paths(base), jt.leaves_with_paths(scale)):
        try:
            out = np.broadcast_shapes(jnp.shape(b), jnp.shape(s))
        except ValueError:
            out = None
        if out != jnp.shape(b):
            raise ValueError(
                f"scale at '{p}' has shape {jnp.shape(s)}, which does not broadcast to the "
                f"parameter shape {jnp.shape(b)}"
            )


def _apply_task_vector(base: PyTree, tau: PyTree, scale) -> PyTree:
    """``base + scale * tau`` in float32, cast to ``base``'s dtypes (no checks)."""

    def one(b, t, s):
        return (_f32(b) + _f32(s) * _f32(t)).astype(jnp.result_type(b))

    if _is_scalar(scale):
        return jax.tree.map(lambda b, t: one(b, t, scale), base, tau)
    return jax.tree.map(one, base, tau, scale)


def perta_weights(
    importance_forget: PyTree,
    importance_retain: PyTree,
    *,
    retain_scale: float = 1.0,
    eps: float = 1e-12,
) -> PyTree:
    """PerTA weights ``w_i = I_f,i / (I_f,i + a * I_r,i + eps)``, each in [0, 1].

    w_i -> 1 where the parameter matters only for the forget set, -> 0 where it matters
    mostly for the retain set, and is 0 where both importances are 0. Up to ``eps``, w is
    invariant to multiplying both importances by the same constant.

    Args:
      importance_forget: I_f, a pytree of non-negative arrays (e.g. a diagonal Fisher).
      importance_retain: I_r, same structure and shapes.
      retain_scale: a > 0, how strongly retain importance protects a parameter.
      eps: stabiliser in the denominator.

    Returns:
      A pytree of weights with the dtypes of ``importance_forget`` (computed in float32).

    Raises:
      ValueError: mismatched pytrees (naming the path), negative importances, a negative or
        non-finite ``retain_scale`` / ``eps`` (when concrete); NaN/Inf importances
        (concrete inputs only; a ``NonFiniteError``, also a ``FloatingPointError``).
    """
    _check_importances(importance_forget, importance_retain)
    V.check_scalar("perta_weights", "retain_scale", retain_scale, min=0.0)
    V.check_scalar("perta_weights", "eps", eps, min=0.0)

    def one(f, r):
        ff, rr = _f32(f), _f32(r)
        den = ff + retain_scale * rr + eps
        w = jnp.where(den > 0, ff / jnp.where(den > 0, den, 1.0), 0.0)
        return w.astype(jnp.result_type(f))

    return jax.tree.map(one, importance_forget, importance_retain)


def ratio_weight_fn(power: float = 1.0, *, retain_scale: float = 1.0, eps: float = 1e-12) -> WeightFn:
    """A PerTA ``weight_fn``: ``w = I_f^p / (I_f^p + (a I_r)^p + eps)``.

    With ratio rho = I_f / (a I_r) this is ``rho^p / (rho^p + 1) = sigmoid(p log rho)`` (up to
    eps): a monotone map from the ratio to [0, 1] whose sharpness is ``power``; ``power = 1``
    is ``perta_weights``, large ``power`` approaches the hard mask ``I_f > a I_r``.

    Args:
      power: p > 0.
      retain_scale: a >= 0.
      eps: stabiliser.

    Returns:
      ``fn(I_f, I_r) -> w`` acting on one leaf (float32 in, float32 out).
    """
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power}")

    def fn(f: jax.Array, r: jax.Array) -> jax.Array:
        fp = f**power
        den = fp + (retain_scale * r) ** power + eps
        return jnp.where(den > 0, fp / jnp.where(den > 0, den, 1.0), 0.0)

    return fn


def perta(
    base: PyTree,
    tau: PyTree,
    importance_forget: PyTree,
    importance_retain: PyTree,
    *,
    strength,
    retain_scale: float = 1.0,
    eps: float = 1e-12,
    weight_fn: WeightFn | None = None,
) -> PyTree:
    """PerTA unlearning: ``theta = theta_0 - strength * (w * tau)`` elementwise.

    ``w = weight_fn(I_f, I_r)`` leafwise (float32 arrays in, weights out), by default
    ``perta_weights`` (``w = I_f / (I_f + a I_r + eps)``). The choice of importances gives
    the two variants:

    - **PerTA-fisher**: I_f, I_r = the diagonal (empirical) Fisher of the forget / retain
      loss at theta_0, i.e. the mean over examples of squared per-example gradients
      (``fisher_diagonal`` on forget and retain batches).
    - **PerTA-grad**: I_f, I_r from plain gradients of the forget / retain loss at theta_0:
      the squared mean gradient or the mean absolute gradient
      (``grad_importance(kind="squared_mean" | "abs_mean")``).

    Any other non-negative importance pair and any monotone map (``ratio_weight_fn``,
    ``functools.partial`` of a custom function) can be passed. With w = 1 everywhere this is
    task negation with alpha = strength; with I_f = 0 it returns theta_0.

    Args:
      base: theta_0.
      tau: the forget task vector ``task_vector(theta_ft, theta_0)``.
      importance_forget: I_f >= 0, structure and shapes of ``base``.
      importance_retain: I_r >= 0, same.
      strength: lambda >= 0 (a scalar, may be traced: then its value is not checked);
        about 3.5 was reported on TOFU. A negative strength would add the task vector
        back (re-learning the forget set) and is refused.
      retain_scale: a in the default weight function (ignored if ``weight_fn`` is given).
      eps: stabiliser in the default weight function (ignored if ``weight_fn`` is given).
      weight_fn: optional ``fn(I_f_leaf, I_r_leaf) -> w_leaf``.

    Returns:
      The unlearned parameters, dtypes of ``base``.

    Raises:
      ValueError: as ``perta_weights`` and ``apply_task_vector``; a concrete ``strength``
        that is negative, NaN or Inf (``"perta.strength must be ..."``); NaN/Inf in a
        concrete ``base``, ``tau`` or importance (naming the argument and leaf; a
        ``NonFiniteError``, also a ``FloatingPointError``).
      TypeError: ``strength`` is not a real scalar.
    """
    V.check_scalar("perta", "strength", strength)
    if V.is_concrete(strength) and float(strength) < 0:
        raise ValueError(f"perta.strength must be a finite number >= 0, got {strength!r}: a negative "
                         "strength adds the task vector back (re-learning, not unlearning)")
    jt.check_nonempty(base, "base")
    jt.check_same_shapes(base, tau, ("base", "tau"))
    jt.check_same_shapes(base, importance_forget, ("base", "importance_forget"))
    jt.check_finite(base, "base")
    jt.check_finite(tau, "tau")
    if weight_fn is None:
        w = perta_weights(importance_forget, importance_retain, retain_scale=retain_scale, eps=eps)
    else:
        _check_importances(importance_forget, importance_retain)
        w = jax.tree.map(lambda f, r: weight_fn(_f32(f), _f32(r)), importance_forget, importance_retain)
        jt.check_same_shapes(importance_forget, w, ("importance_forget", "weight_fn output"))
        jt.check_finite(w, "weight_fn output")
    s = -_f32(strength)
    return _apply_task_vector(base, tau, jax.tree.map(lambda x: s * _f32(x), w))
