"""Sharpness-aware minimisation (SAM, ASAM) and sharpness-aware forgetting (SAF).

SAM (Foret et al., 2021) minimises max_{||e|| <= rho} L(theta + e) with the first-order
worst case e = rho g / ||g||, g = grad L(theta), and updates with grad L(theta + e).
Adaptive SAM (Kwon et al., 2021) measures the radius in the parameter-scaled metric
T = diag(|theta| + eta): e = rho T^2 g / ||T g||.

SAF, our objective for forgetting that survives quantisation (see ``saf_loss``), evaluates
the forget loss at the fake-quantised weights through a straight-through estimator and at
a SAM perturbation of radius comparable to the quantisation displacement.

References:
  Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
  ICLR 2021.
  Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of
  Deep Neural Networks", ICML 2021.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunlearn import tree as jt
from jaxunlearn import validate as V
from jaxunlearn.quant import fake_quantize, quant_targets
from jaxunlearn.tree import PyTree

__all__ = [
    "sam_perturbation",
    "sam_gradient",
    "sam_adversary",
    "sam",
    "saf_perturbation_radius",
    "saf_loss",
]


def _f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def sam_perturbation(
    grads: PyTree,
    *,
    rho,
    adaptive: bool = False,
    params: PyTree | None = None,
    eta: float = 0.01,
    eps: float = 1e-12,
) -> PyTree:
    """The SAM ascent step ``e = rho * g / (||g|| + eps)`` (global L2 norm over all leaves).

    Adaptive (ASAM): ``e = rho * T^2 g / (||T g|| + eps)`` with ``T = |theta| + eta``
    elementwise, so ``||T^{-1} e|| = rho``. ``eta = 0.01`` is the default of the ASAM
    reference implementation; ``eta = 0`` gives the plain ``T = |theta|``.

    Norms are accumulated in float32; ``e`` has the dtypes of ``grads``. A zero gradient gives
    ``e = 0`` (no NaN).

    Args:
      grads: g, a pytree of arrays.
      rho: radius (a scalar, may be traced).
      adaptive: use the ASAM metric (needs ``params``).
      params: theta, same structure and shapes as ``grads`` (adaptive only).
      eta: offset of T in the adaptive metric.
      eps: stabiliser of the norm.

    Returns:
      e, a pytree like ``grads``.

    Raises:
      ValueError: a concrete ``rho``, ``eta`` or ``eps`` that is negative, NaN or Inf
        (traced values are not checked); adaptive without ``params``; mismatched pytrees.
      TypeError: ``rho``, ``eta`` or ``eps`` not a real scalar.

    References:
      Foret et al., 2021; Kwon et al., 2021 (see the module docstring).
    """
    _check_radius("sam_perturbation", rho, eta, eps)
    jt.check_nonempty(grads, "grads")
    rho = _f32(rho)
    if not adaptive:
        inv = rho / (jt.global_norm(grads) + eps)
        return jax.tree.map(lambda g: (_f32(g) * inv).astype(jnp.result_type(g)), grads)
    if params is None:
        raise ValueError("adaptive SAM needs params (the metric is T = |theta| + eta)")
    jt.check_same_shapes(grads, params, ("grads", "params"))
    tg = jax.tree.map(lambda g, p: (jnp.abs(_f32(p)) + eta) * _f32(g), grads, params)
    inv = rho / (jt.global_norm(tg) + eps)
    return jax.tree.map(
        lambda g, p: ((jnp.abs(_f32(p)) + eta) ** 2 * _f32(g) * inv).astype(jnp.result_type(g)),
        grads,
        params,
    )


def _check_radius(owner: str, rho, eta, eps) -> None:
    """``rho, eta, eps >= 0`` and finite (concrete values only; tracers pass)."""
    V.check_scalar(owner, "rho", rho, min=0.0)
    V.check_scalar(owner, "eta", eta, min=0.0)
    V.check_scalar(owner, "eps", eps, min=0.0)


def _add_f32(params: PyTree, delta: PyTree) -> PyTree:
    return jax.tree.map(lambda p, d: (_f32(p) + _f32(d)).astype(jnp.result_type(p)), params, delta)


def sam_gradient(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: Any,
    *,
    rho,
    adaptive: bool = False,
    has_aux: bool = False,
    eta: float = 0.01,
    eps: float = 1e-12,
) -> tuple[Any, PyTree]:
    """SAM gradient: ``grad L(theta + e)`` with ``e = sam_perturbation(grad L(theta))``.

    Two gradient evaluations; ``e`` is a constant of the second (the SAM approximation that
    drops the Hessian term, as in Foret et al., 2021).

    Args:
      loss_fn: ``loss_fn(params, batch)`` returning a scalar (or ``(scalar, aux)`` with
        ``has_aux``).
      params: theta.
      batch: passed to ``loss_fn`` unchanged.
      rho: radius; ``rho = 0`` gives the plain gradient.
      adaptive, eta, eps: see ``sam_perturbation``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      Like ``jax.value_and_grad``: ``(loss, grads)`` (or ``((loss, aux), grads)``), the loss,
      aux and gradient all taken at the perturbed point ``theta + e``.
    """
    g = jax.grad(loss_fn, has_aux=has_aux)(params, batch)
    if has_aux:
        g = g[0]
    e = jax.lax.stop_gradient(
        sam_perturbation(g, rho=rho, adaptive=adaptive, params=params, eta=eta, eps=eps)
    )
    return jax.value_and_grad(loss_fn, has_aux=has_aux)(_add_f32(params, e), batch)


def sam_adversary(
    rho, *, adaptive: bool = False, eta: float = 0.01, eps: float = 1e-12
) -> optax.GradientTransformation:
    """The adversarial step of SAM as an optax transformation: ``updates -> -e``.

    Designed as the ``adv_optimizer`` of ``optax.contrib.sam`` (which negates its output and
    adds it to the parameters, so the parameters move to ``theta + e``). Stateless.

    Args:
      rho, adaptive, eta, eps: see ``sam_perturbation`` (``params`` is taken from ``update``).

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.EmptyState``.

    Raises:
      ValueError / TypeError: as :func:`sam_perturbation` (checked here, at construction).
    """
    _check_radius("sam_adversary", rho, eta, eps)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        e = sam_perturbation(updates, rho=rho, adaptive=adaptive, params=params, eta=eta, eps=eps)
        return jax.tree.map(jnp.negative, e), state

    return optax.GradientTransformation(init_fn, update_fn)


def sam(
    optimizer: optax.GradientTransformation,
    *,
    rho=0.05,
    adaptive: bool = False,
    eta: float = 0.01,
    eps: float = 1e-12,
    opaque_mode: bool = False,
    batch_axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SAM around any optax optimizer: ``optax.contrib.sam`` with a normalised-gradient adversary.

    One SAM step (``sync_period = 2``): ascend to ``theta + e``, ``e = sam_perturbation(g)``,
    then update the original ``theta`` with ``optimizer`` applied to the gradient at
    ``theta + e``. In the default transparent mode this takes two calls to ``update`` (the
    first returns the adversarial move ``e``, the second ``theta_0 - (theta_0 + e) + u``; see
    ``optax.contrib.sam``). With ``opaque_mode=True`` one call does both, given
    ``grad_fn(params, i)``. Unlike ``optax.contrib.normalize``, a zero gradient gives no NaN,
    and the adaptive (ASAM) metric is available.

    Args:
      optimizer: the outer optimizer (e.g. ``optax.adamw(lr)``).
      rho: SAM radius.
      adaptive, eta, eps: see ``sam_perturbation``.
      opaque_mode, batch_axis_name: passed to ``optax.contrib.sam``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (state ``optax.contrib.SAMState``).

    References:
      Foret et al., 2021; Kwon et al., 2021.

    Raises:
      ValueError / TypeError: a bad ``rho``, ``eta`` or ``eps``, as :func:`sam_perturbation`.

    >>> import optax
    >>> tx = sam(optax.sgd(0.1), rho=0.05, opaque_mode=True)
    """
    _check_radius("sam", rho, eta, eps)
    return optax.contrib.sam(
        optimizer,
        sam_adversary(rho, adaptive=adaptive, eta=eta, eps=eps),
        sync_period=2,
        reset_state=True,
        opaque_mode=opaque_mode,
        batch_axis_name=batch_axis_name,
    )


def saf_perturbation_radius(
    params: PyTree, *, scheme: str = "int4", block_size: int = 64, min_ndim: int = 2,
    layout: str = "bnb", targets: str = "auto",
) -> jax.Array:
    """The default SAF radius: the step of a uniform quantiser with the same RMS rounding error.

    ``rho = sqrt(12 / n) * ||Q(theta) - theta||_2`` over the ``n`` quantised weights. A
    uniform rounding error of step ``s`` has RMS ``s / sqrt(12)``, so ``rho`` estimates the
    mean quantisation step ``s`` (absmax / 7 per block for int4): the SAM ball around
    ``Q(theta)`` then spans about one grid cell in the worst-case direction, as the SAF
    outline asks ("rho comparable to the quantisation step"). The global displacement
    ``||Q(theta) - theta||`` itself grows like ``sqrt(n)`` and, used as a radius along one
    coherent direction, destroys the model (measured on the demo model: 4.9 against a
    parameter norm of 53; forgetting then stalls).

    Args:
      params: theta.
      scheme, block_size, min_ndim, layout, targets: as in ``fake_quantize`` (by default the
        bitsandbytes deployment: the decoder blocks' linear kernels, blocks along the input axis).

    Returns:
      A float32 scalar (no gradient).
    """
    q = fake_quantize(params, scheme, block_size=block_size, min_ndim=min_ndim, layout=layout, targets=targets)
    return _step_radius(q, params, quant_targets(params, targets, min_ndim=min_ndim))


def _step_radius(q: PyTree, params: PyTree, selected: PyTree) -> jax.Array:
    n = sum(int(np.prod(jnp.shape(x))) for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(selected)) if s)
    disp = jt.global_norm(jax.tree.map(lambda a, b: _f32(a) - _f32(b), q, params))
    return jax.lax.stop_gradient(disp * np.sqrt(12.0 / max(n, 1)))


def saf_loss(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    batch: Any,
    *,
    scheme: str = "int4",
    block_size: int = 64,
    rho=None,
    min_ndim: int = 2,
    eps: float = 1e-12,
    layout: str = "bnb",
    targets: str = "auto",
) -> jax.Array:
    """Sharpness-aware forgetting objective, differentiable with ``jax.grad``.

    Our exact objective (the published SAF gives only an outline)::

        theta_q = theta + stop_gradient(Q(theta) - theta)        # STE fake quantisation
        g       = grad L(theta_q)                                 # = grad L at Q(theta)
        e       = stop_gradient(rho * g / (||g|| + eps))          # SAM worst case, constant
        L_SAF(theta) = L(theta_q + e)

    so ``L_SAF(theta) = L(Q(theta) + e)`` in value and, by the STE,
    ``grad L_SAF(theta) = (grad L)(Q(theta) + e)``: the update minimises the forget loss at
    the worst point of a rho-ball around the *quantised* weights, which makes the unlearned
    point flat across the quantisation grid and hard to undo by rounding. ``Q`` is
    ``fake_quantize(scheme, block_size=..., layout=..., targets=..., min_ndim=...)``, by default
    the bitsandbytes deployment quantiser (the decoder blocks' linear kernels, blocks of 64
    input features); leaves it does not quantise are still perturbed. ``rho=None`` takes the mean quantisation step
    ``sqrt(12 / n) ||Q(theta) - theta||_2`` (:func:`saf_perturbation_radius`, held constant);
    ``rho = 0`` gives the plain STE-quantised loss ``L(Q(theta))``.

    ``loss_fn`` is the loss being *minimised* (e.g. the negative forget NLL, NPO, or a full
    ``gamma * L_f + alpha * L_r``); the retain term may be added outside, unquantised.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: theta.
      batch: passed to ``loss_fn``.
      scheme: ``"int8"``, ``"int4"`` (default, as in the SAF paper), ``"nf4"`` or ``"fp4"``.
      block_size, min_ndim, layout, targets: as in ``fake_quantize``.
      rho: SAM radius, or None for the default above.
      eps: stabiliser of the gradient norm.

    Returns:
      The scalar ``L(Q(theta) + e)``; its gradient with respect to ``params`` is
      ``grad L(Q(theta) + e)``.

    Raises:
      ValueError: a concrete ``rho`` or ``eps`` that is negative, NaN or Inf; NaN/Inf in
        concrete ``params`` (from :func:`jaxunlearn.fake_quantize`, naming the leaf); a bad
        ``scheme`` or ``block_size``.

    References:
      Foret et al., 2021 (SAM); Bengio et al., 2013 (straight-through estimator).
    """
    if rho is not None:
        V.check_scalar("saf_loss", "rho", rho, min=0.0)
    V.check_scalar("saf_loss", "eps", eps, min=0.0)
    theta_q = fake_quantize(params, scheme, block_size=block_size, ste=True, min_ndim=min_ndim, layout=layout,
                            targets=targets)
    if rho is None:  # = saf_perturbation_radius(params, ...), from the values already computed
        rho = _step_radius(theta_q, params, quant_targets(params, targets, min_ndim=min_ndim))
    g = jax.grad(loss_fn)(jax.lax.stop_gradient(theta_q), batch)
    e = jax.lax.stop_gradient(sam_perturbation(g, rho=rho, eps=eps))
    return loss_fn(_add_f32(theta_q, e), batch)
