"""Gradient estimators of the forget objective: plain, SAM, SAF.

An estimator is a function ``estimator(loss_fn, params, batch) -> (value, grads)`` with the
contract of ``jax.value_and_grad(loss_fn)(params, batch)``: it says *where* (and through
what) the forget loss ``L_f`` is differentiated, and nothing else. The unlearning step
(:func:`jaxunlearn.unlearner`) takes one, so the choice is made by composition:

- :func:`plain_estimator`: ``(L(theta), grad L(theta))``;
- :func:`sam_estimator`: ``(L(theta + e), grad L(theta + e))``, ``e = rho g / ||g||``
  (SAM; ASAM with ``adaptive``), see :func:`jaxunlearn.sam_gradient`;
- :func:`saf_estimator`: the value and gradient of :func:`jaxunlearn.saf_loss`, i.e. the
  loss at the fake-quantised weights plus a SAM step, through a straight-through estimator.

Any function with the same contract works (e.g. a zeroth-order or a clipped estimator).

References:
  Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
  ICLR 2021. Kwon et al., "ASAM", ICML 2021.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from jaxunlearn import validate as V
from jaxunlearn.quant import LAYOUTS, SCHEMES, TARGETS
from jaxunlearn.sam import saf_loss, sam_gradient
from jaxunlearn.tree import PyTree

__all__ = ["GradientEstimator", "plain_estimator", "sam_estimator", "saf_estimator"]

GradientEstimator = Callable[[Callable[[PyTree, Any], jax.Array], PyTree, Any], tuple[jax.Array, PyTree]]
"""``estimator(loss_fn, params, batch) -> (value, grads)``, like ``jax.value_and_grad``."""


def plain_estimator() -> GradientEstimator:
    """The exact gradient: ``jax.value_and_grad(loss_fn)(params, batch)``.

    Returns:
      A :data:`GradientEstimator`.

    >>> import jax.numpy as jnp
    >>> v, g = plain_estimator()(lambda p, b: jnp.sum(p * b), jnp.ones(2), jnp.array([2., 3.]))
    >>> float(v), g.tolist()
    (5.0, [2.0, 3.0])
    """

    def estimate(loss_fn, params, batch):
        return jax.value_and_grad(loss_fn)(params, batch)

    return estimate


def sam_estimator(rho: float, *, adaptive: bool = False, eta: float = 0.01, eps: float = 1e-12) -> GradientEstimator:
    """SAM: the loss and gradient at ``theta + e``, ``e = rho * g / (||g|| + eps)``, ``g = grad L(theta)``.

    Two gradient evaluations; ``e`` is held constant (:func:`jaxunlearn.sam_gradient`).
    ``rho = 0`` is the plain gradient.

    Args:
      rho: SAM radius (>= 0, finite).
      adaptive, eta, eps: the ASAM metric ``T = |theta| + eta`` and the norm's stabiliser
        (:func:`jaxunlearn.sam_perturbation`).

    Returns:
      A :data:`GradientEstimator`.

    Raises:
      ValueError / TypeError: ``rho``, ``eta`` or ``eps`` negative, non-finite or not a real scalar;
        ``adaptive`` not a bool.

    References:
      Foret et al., 2021; Kwon et al., 2021.

    >>> import jax.numpy as jnp
    >>> v, g = sam_estimator(0.5)(lambda p, b: jnp.sum(p ** 2), jnp.array([3., 4.]), None)
    >>> [round(x, 4) for x in g.tolist()]  # 2 (theta + 0.5 theta / ||theta||) = 2.2 theta
    [6.6, 8.8]
    """
    for name, value in (("rho", rho), ("eta", eta), ("eps", eps)):
        V.check_float("sam_estimator", name, value, min=0.0)
    V.check_bool("sam_estimator", "adaptive", adaptive)

    def estimate(loss_fn, params, batch):
        return sam_gradient(loss_fn, params, batch, rho=rho, adaptive=adaptive, eta=eta, eps=eps)

    return estimate


def saf_estimator(scheme: str = "int4", block_size: int = 64, rho: float | None = None, *,
                  min_ndim: int = 2, layout: str = "bnb", targets: str = "auto") -> GradientEstimator:
    """SAF: ``jax.value_and_grad`` of :func:`jaxunlearn.saf_loss`, ``L(Q(theta) + e)`` with an STE.

    The gradient is ``(grad L)(Q(theta) + e)``, ``Q`` the fake quantiser and ``e`` a SAM step
    of radius ``rho`` taken at ``Q(theta)``, so forgetting survives quantisation. ``Q`` is
    :func:`jaxunlearn.fake_quantize`, by default the bitsandbytes deployment quantiser.

    Args:
      scheme: ``"int8"``, ``"int4"``, ``"nf4"`` or ``"fp4"``.
      block_size: quantisation block (>= 1).
      rho: SAM radius (>= 0), or None for the mean quantisation step
        (:func:`jaxunlearn.saf_perturbation_radius`).
      min_ndim, layout, targets: which leaves are quantised and how (as in
        :func:`jaxunlearn.fake_quantize`); the others are perturbed but not quantised.

    Returns:
      A :data:`GradientEstimator`.

    Raises:
      ValueError / TypeError: an unknown ``scheme``, ``layout`` or ``targets``, ``block_size < 1``
        or not an int, a negative or non-finite ``rho``.

    References:
      Foret et al., 2021 (SAM); Bengio et al., 2013 (straight-through estimator).

    >>> import jax.numpy as jnp
    >>> est = saf_estimator("int8", block_size=4, rho=0.0)
    >>> v, g = est(lambda p, b: jnp.sum(p ** 2), jnp.ones((2, 4)), None)
    >>> float(v)  # the all-ones matrix is on the int8 grid
    8.0
    """
    V.check_choice("saf_estimator", "scheme", scheme, SCHEMES)
    V.check_int("saf_estimator", "block_size", block_size, min=1)
    V.check_int("saf_estimator", "min_ndim", min_ndim, min=0)
    V.check_choice("saf_estimator", "layout", layout, LAYOUTS)
    V.check_choice("saf_estimator", "targets", targets, TARGETS)
    if rho is not None:
        V.check_float("saf_estimator", "rho", rho, min=0.0)

    def objective(loss_fn):
        return lambda p, b: saf_loss(loss_fn, p, b, scheme=scheme, block_size=block_size, rho=rho,
                                     min_ndim=min_ndim, layout=layout, targets=targets)

    def estimate(loss_fn, params, batch):
        return jax.value_and_grad(objective(loss_fn))(params, batch)

    return estimate
