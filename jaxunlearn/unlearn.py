"""Gradient unlearning presets: :class:`UnlearnConfig`, flat hyperparameters over :func:`unlearner`.

:mod:`jaxunlearn.unlearn_step` composes an unlearning step from a forget loss, a retain loss,
a gradient estimator and an optax transform. :class:`UnlearnConfig` is the preset over it,
as ``optax.adamw`` is over ``optax.chain``: the flat, JSON-serialisable hyperparameters of
``experiments/configs/*.json`` (key ``"unlearn"``, parsed by :mod:`jaxunlearn.method_configs`),
turned into an :class:`~jaxunlearn.unlearn_step.Unlearner` by :meth:`UnlearnConfig.build`:

- ``method``: GA, GradDiff, NPO (against the frozen reference), SimNPO, WGA, UNDIAL, IdkNLL and
  IdkDPO (refusal answers as the preferred completion) (:func:`forget_loss_fn`);
- ``retain_loss``, ``alpha``: the retain NLL or the KL to the reference (:func:`retain_loss_fn`);
- ``sam_rho`` / ``saf``: the forget gradient's estimator (:meth:`UnlearnConfig.estimator`);
- ``project``, ``projection_*``, ``grad_clip``, ``optimizer``, ...: the optax chain
  (:meth:`UnlearnConfig.transform`), where a SalUn mask also goes.

The names of :mod:`jaxunlearn.unlearn_step` are re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh, PartitionSpec

from jaxunlearn import validate as V
from jaxunlearn.estimators import GradientEstimator, plain_estimator, saf_estimator, sam_estimator
from jaxunlearn.optim import float32_state
from jaxunlearn.projection import METRICS as PROJECTION_METRICS
from jaxunlearn.projection import project_orthogonal
from jaxunlearn.quant import SCHEMES as SAF_SCHEMES
from jaxunlearn.saliency import masked_updates
from jaxunlearn.sparsity import l1_regularization
from jaxunlearn.unlearn_step import (METHODS, NLL_REDUCTIONS, RETAIN_LOSSES, Unlearner, UnlearnState, forget_batch_keys,
                                     forget_loss_fn, forget_references, retain_loss_fn, unlearner)

__all__ = ["METHODS", "RETAIN_LOSSES", "UnlearnConfig", "UnlearnState", "Unlearner", "unlearner",
           "forget_loss_fn", "retain_loss_fn"]

OPTIMIZERS = ("adamw", "sgd")
_NEEDS_REF = ("npo", "undial", "idk_dpo")


@dataclasses.dataclass(frozen=True)
class UnlearnConfig:
    """Hyperparameters of a gradient-based unlearning run: a preset over :func:`unlearner`.

    The fields are the flat JSON schema of ``experiments/configs/*.json`` (key ``"unlearn"``);
    :meth:`build` turns them into an :class:`Unlearner` with ``forget_loss_fn(method)``,
    ``retain_loss_fn(retain_loss)``, :meth:`estimator` and :meth:`transform`.

    Attributes:
      method: ``"ga" | "grad_diff" | "npo" | "simnpo" | "wga" | "undial" | "idk_nll" | "idk_dpo"``
        (:func:`forget_loss_fn`; the idk methods read the forget batch's refusal answers).
      steps: number of steps of a run (read by the run loop, :func:`jaxunlearn.methods.run_method`,
        not by the step).
      optimizer: ``"adamw"`` or ``"sgd"`` (plain gradient descent: the update is exactly
        ``-learning_rate`` times the combined gradient, useful to see the geometry).
      learning_rate: learning rate (constant after ``warmup_steps``).
      warmup_steps: linear warmup.
      weight_decay: AdamW weight decay.
      grad_clip: global-norm clip of the final update direction (0: off).
      gamma: weight of the forget loss.
      alpha: weight of the retain loss (ignored by ``"ga"``).
      beta: NPO / SimNPO / IdkDPO inverse temperature, WGA weight exponent, UNDIAL logit reduction
        (``None``: 0.1 for NPO and IdkDPO, 4.5 for SimNPO, 1.0 for WGA, 10 for UNDIAL).
      delta: SimNPO margin.
      retain_loss: ``"nll"`` or ``"kl"`` (KL to the reference on retain tokens).
      nll_reduction: how a batch NLL is averaged, for the ``"nll"`` retain loss and the GA /
        GradDiff forget loss: ``"token"`` (default; every answer token of the batch pooled,
        Hugging Face's ``model(**batch).loss`` as open-unlearning's trainers use it, so
        published ``alpha``/``gamma`` transfer) or ``"sequence"`` (the mean over examples of
        the summed NLL: ``alpha`` then weighs the retain term about the mean answer length
        more). NPO and SimNPO forget losses keep their papers' per-sequence normalisation
        (:func:`forget_loss_fn`).
      project: orthogonal projection of the forget gradient (GU).
      retain_k: number of retain gradients spanning the subspace (the retain batch is
        split into this many strided micro-batches, rows ``j::retain_k``; must divide its size).
      projection_per_tensor / projection_metric / projection_only_conflicting: see
        :func:`jaxunlearn.project_orthogonal`.
      sam_rho: SAM radius on the forget objective (0: off; :func:`jaxunlearn.estimators.sam_estimator`).
      saf: sharpness-aware forgetting through fake quantisation
        (:func:`jaxunlearn.estimators.saf_estimator`).
      saf_scheme / saf_block_size / saf_rho: quantiser and radius of :func:`jaxunlearn.saf_loss`
        (``saf_rho=None``: the mean quantisation step, :func:`jaxunlearn.saf_perturbation_radius`).
      l1 / l1_decay_steps: sparsity-aware unlearning (Jia et al., NeurIPS 2023): the gradient
        gains ``alpha_t sign(theta)``, ``alpha_t = l1 (1 - t / l1_decay_steps)`` decaying to 0
        (``None``: over all ``steps``); 0 = off (:func:`jaxunlearn.sparsity.l1_regularization`).

    Every field is validated at construction (see :mod:`jaxunlearn.validate`):
    ``learning_rate > 0``; ``steps, warmup_steps >= 0`` and ``retain_k, saf_block_size >= 1``
    (ints, not bools or floats); ``weight_decay, grad_clip, gamma, alpha, sam_rho >= 0``
    (a negative ``gamma`` would run the forget objective backwards, i.e. re-learn);
    ``beta`` and ``saf_rho`` ``None`` or ``> 0``; ``delta`` any finite number; every float
    finite; the string fields one of their choices; the flags bools; and not both
    ``saf`` and ``sam_rho > 0`` (one estimator).

    Raises:
      TypeError: a field of the wrong type (message ``"UnlearnConfig.<field> must be ..., got <value>"``).
      ValueError: a field with a bad value (same message form), or ``saf`` with ``sam_rho > 0``.

    >>> import jax.numpy as jnp
    >>> apply = lambda p, ids, mask: p["E"][ids] @ p["W"]            # a bigram LM
    >>> params = {"E": jnp.eye(4), "W": jnp.eye(4)}
    >>> batch = {"input_ids": jnp.array([[0, 1, 2], [3, 2, 1]]), "attention_mask": jnp.ones((2, 3)),
    ...          "loss_mask": jnp.array([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])}
    >>> u = UnlearnConfig(method="npo", retain_loss="kl", learning_rate=1e-2).build(apply)
    >>> state = u.init(params)
    >>> state, metrics = u.step(state, batch, batch, ref_params=params)
    >>> sorted(metrics), u.uses_retain, u.needs_reference
    (['forget_loss', 'retain_loss', 'update_norm'], True, True)
    """

    method: str = "npo"
    steps: int = 50
    optimizer: str = "adamw"
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    gamma: float = 1.0
    alpha: float = 1.0
    beta: float | None = None
    delta: float = 0.0
    retain_loss: str = "nll"
    nll_reduction: str = "token"
    project: bool = False
    retain_k: int = 1
    projection_per_tensor: bool = False
    projection_metric: str = "euclidean"
    projection_only_conflicting: bool = False
    sam_rho: float = 0.0
    saf: bool = False
    saf_scheme: str = "int4"
    saf_block_size: int = 64
    saf_rho: float | None = None
    l1: float = 0.0
    l1_decay_steps: int | None = None

    def __post_init__(self):
        _validate_unlearn_config(self)

    @property
    def uses_retain(self) -> bool:
        """Whether retain data enters the update (a retain term or the projection)."""
        return self.project or (self.method != "ga" and self.alpha != 0)

    @property
    def needs_reference(self) -> bool:
        """Whether the frozen reference model is evaluated (NPO, UNDIAL, IdkDPO, or the KL retain loss)."""
        return self.method in _NEEDS_REF or (self.uses_retain and self.retain_loss == "kl")

    def transform(self, mask: Any = None, *, mesh: Mesh | None = None, param_specs: Any = None,
                  regularizer: optax.GradientTransformation | None = None) -> optax.GradientTransformationExtraArgs:
        """``[project_orthogonal] -> [l1] -> [regularizer] -> [clip] -> [SalUn mask] -> adamw | sgd`` as one optax chain.

        The learning rate rises linearly from 0 over ``warmup_steps``, then stays constant. The
        optimizer's state is float32 whatever the parameters' dtype
        (:func:`jaxunlearn.optim.float32_state`).
        With ``project`` the chain's ``update`` takes ``retain_grads=`` (stacked, leading k)
        and adds ``alpha`` times their mean.

        Args:
          mask: optional SalUn mask (pytree of 0/1 like the params, :func:`jaxunlearn.salun_mask`)
            applied to every update after clipping.
          mesh, param_specs: the mesh the parameters are sharded on and their
            ``PartitionSpec`` s: the projection then runs per shard, on the array kernels
            (``project_orthogonal(mesh=, specs=)``).
          regularizer: an optax transform that adds a term's gradient to the combined gradient
            (e.g. a Fisher-weighted anchor penalty of a continual method), after the projection
            and the l1 term, before clipping.

        Returns:
          An ``optax.GradientTransformationExtraArgs``.
        """
        parts = []
        if self.project:
            parts.append(project_orthogonal(
                per_tensor=self.projection_per_tensor, metric=self.projection_metric,
                only_conflicting=self.projection_only_conflicting, retain_scale=self.alpha, forget_scale=1.0,
                mesh=mesh, specs=param_specs))
        if self.l1 > 0:  # a term of the objective: after the projection, before clipping
            parts.append(l1_regularization(self.l1, self.l1_decay_steps or max(self.steps, 1)))
        if regularizer is not None:
            parts.append(regularizer)
        if self.grad_clip > 0:
            parts.append(optax.clip_by_global_norm(self.grad_clip))
        if mask is not None:
            parts.append(masked_updates(mask))
        lr = (optax.linear_schedule(0.0, self.learning_rate, self.warmup_steps) if self.warmup_steps
              else self.learning_rate)
        # the optimizer's moments in float32 also for bfloat16 parameters (identity for float32 ones)
        if self.optimizer == "sgd":
            parts.append(float32_state(optax.sgd(lr)))
        else:
            parts.append(float32_state(optax.adamw(lr, weight_decay=self.weight_decay)))
        return optax.chain(*parts)

    def estimator(self) -> GradientEstimator:
        """The forget gradient's estimator: :func:`~jaxunlearn.estimators.saf_estimator` with
        ``saf``, :func:`~jaxunlearn.estimators.sam_estimator` with ``sam_rho > 0``, else
        :func:`~jaxunlearn.estimators.plain_estimator`."""
        if self.saf:
            return saf_estimator(self.saf_scheme, self.saf_block_size, self.saf_rho)
        if self.sam_rho > 0:
            return sam_estimator(self.sam_rho)
        return plain_estimator()

    def build(self, apply_fn: Callable, *, mask: Any = None, forget_loss: Callable | None = None,
              jit: bool = True, mesh: Mesh | None = None, param_specs: Any = None,
              params_fn: Callable | None = None,
              regularizer: optax.GradientTransformation | None = None) -> Unlearner:
        """The :class:`Unlearner` of this config.

        Args:
          apply_fn: ``apply(params, input_ids, attention_mask) -> logits``.
          mask: optional SalUn mask (pytree of 0/1 like the params) applied to every update.
          forget_loss: optional custom ``L_f(params, forget_batch) -> scalar`` replacing
            ``method``'s (the retain term, the estimator and the transform still apply; no
            reference is computed for it).
          jit: see :func:`unlearner`.
          mesh, param_specs: see :meth:`transform` (a sharded run's projection per shard).
          params_fn: unlearn in adapter space (``params_fn(frozen, t) -> params``, e.g.
            :func:`jaxunlearn.adapters.adapter_params_fn`; see :func:`unlearner`): ``mask`` and
            ``param_specs`` then describe ``t``.
          regularizer: an extra gradient term in the transform (see :meth:`transform`).

        Returns:
          ``unlearner(forget_loss_fn(apply_fn, method), transform(mask, regularizer=), retain_loss=...,
          estimator=estimator(), gamma=gamma, alpha=alpha | retain_k=retain_k, ...)``:
          no retain loss when ``uses_retain`` is False; the reference outputs of
          :func:`~jaxunlearn.unlearn_step.forget_references` (``ref_params`` read for NPO, UNDIAL,
          IdkDPO and the KL retain loss: :attr:`needs_reference`) and the forget keys of
          :func:`~jaxunlearn.unlearn_step.forget_batch_keys`.
        """
        if mask is None and forget_loss is None and regularizer is None:  # one compiled step per (config, model, mesh)
            key = _build_key(self, apply_fn, jit, mesh, param_specs, params_fn)
            if key is not None:
                return _cached_build(key)
        return self._build(apply_fn, mask=mask, forget_loss=forget_loss, jit=jit, mesh=mesh, param_specs=param_specs,
                           params_fn=params_fn, regularizer=regularizer)

    def _build(self, apply_fn, *, mask, forget_loss, jit, mesh, param_specs, params_fn, regularizer=None) -> Unlearner:
        custom = forget_loss is not None
        f_loss = forget_loss if custom else forget_loss_fn(apply_fn, self.method, beta=self.beta, delta=self.delta,
                                                           reduction=self.nll_reduction)
        r_loss = retain_loss_fn(apply_fn, self.retain_loss, reduction=self.nll_reduction) if self.uses_retain else None
        return unlearner(
            f_loss, self.transform(mask, mesh=mesh, param_specs=param_specs, regularizer=regularizer), retain_loss=r_loss, estimator=self.estimator(), gamma=self.gamma,
            alpha=None if self.project else self.alpha, retain_k=self.retain_k if self.project else None,
            apply_fn=apply_fn, references=() if custom else forget_references(apply_fn, self.method),
            forget_keys=None if custom else forget_batch_keys(self.method),
            retain_ref_logits=self.uses_retain and self.retain_loss == "kl", params_fn=params_fn, jit=jit)


def _build_key(cfg: UnlearnConfig, apply_fn, jit, mesh, param_specs, params_fn):
    """A hashable key of a build without mask or custom loss, or None when an argument is not hashable."""
    leaves, treedef = jax.tree.flatten(param_specs, is_leaf=lambda x: x is None or isinstance(x, PartitionSpec))
    key = (cfg, apply_fn, jit, mesh, tuple(leaves), treedef, params_fn)
    try:
        hash(key)
    except TypeError:
        return None
    return key


@functools.lru_cache(maxsize=32)
def _cached_build(key) -> Unlearner:
    """:meth:`UnlearnConfig.build` of a key of :func:`_build_key`: equal configs on the same model,
    mesh and parametrisation get the same :class:`Unlearner`, so its jitted step compiles once
    (a benchmark's seeds, a sweep's repeated points)."""
    cfg, apply_fn, jit, mesh, leaves, treedef, params_fn = key
    return cfg._build(apply_fn, mask=None, forget_loss=None, jit=jit, mesh=mesh,
                      param_specs=jax.tree.unflatten(treedef, list(leaves)), params_fn=params_fn)


def _validate_unlearn_config(cfg: UnlearnConfig) -> None:
    """Check the type and range of every field of ``cfg`` and store it as a plain Python value.

    Raises ``TypeError`` / ``ValueError`` naming the field (``"UnlearnConfig.<field> must be
    ..., got <value>"``); numpy scalars are stored as ``int`` / ``float`` / ``bool``.
    """
    o = "UnlearnConfig"
    out = {}
    for name, choices in (("method", METHODS), ("optimizer", OPTIMIZERS), ("retain_loss", RETAIN_LOSSES),
                          ("nll_reduction", NLL_REDUCTIONS),
                          ("projection_metric", PROJECTION_METRICS), ("saf_scheme", SAF_SCHEMES)):
        out[name] = V.check_choice(o, name, getattr(cfg, name), choices)
    for name, lo in (("steps", 0), ("warmup_steps", 0), ("retain_k", 1), ("saf_block_size", 1)):
        out[name] = V.check_int(o, name, getattr(cfg, name), min=lo)
    out["learning_rate"] = V.check_float(o, "learning_rate", cfg.learning_rate, min=0.0, min_exclusive=True)
    for name in ("weight_decay", "grad_clip", "gamma", "alpha", "sam_rho", "l1"):
        out[name] = V.check_float(o, name, getattr(cfg, name), min=0.0)
    out["delta"] = V.check_float(o, "delta", cfg.delta)
    if cfg.l1_decay_steps is not None:
        out["l1_decay_steps"] = V.check_int(o, "l1_decay_steps", cfg.l1_decay_steps, min=1)
    for name in ("beta", "saf_rho"):
        out[name] = V.check_float(o, name, getattr(cfg, name), min=0.0, min_exclusive=True, allow_none=True)
    for name in ("project", "projection_per_tensor", "projection_only_conflicting", "saf"):
        out[name] = V.check_bool(o, name, getattr(cfg, name))
    for name, value in out.items():
        if type(value) is not type(getattr(cfg, name)):  # e.g. np.float32 -> float, 1 -> 1.0
            object.__setattr__(cfg, name, value)
    if cfg.saf and cfg.sam_rho > 0:
        raise ValueError("UnlearnConfig.saf=True already includes a SAM-style perturbation: set sam_rho=0 "
                         f"(got sam_rho={cfg.sam_rho!r})")
