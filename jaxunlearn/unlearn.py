"""The unlearning step: one jitted function for every gradient method and its variants.

``make_unlearn_step(apply_fn, cfg)`` returns ``step(state, forget_batch, retain_batch,
ref_params) -> (state, metrics)`` minimising

    L = gamma * L_f(theta; forget) + alpha * L_r(theta; retain)

with ``L_f`` one of (per-example summed answer NLL, batch convention of
``jaxunlearn.losses``):

- ``"ga"``        gradient ascent, ``-mean NLL_f`` (no retain term: ``alpha`` is ignored);
- ``"grad_diff"`` ``-mean NLL_f``, retain term on;
- ``"npo"``       NPO against the frozen reference ``ref_params`` (beta = 0.1);
- ``"simnpo"``    SimNPO, reference-free (beta = 4.5, delta);
- or a callable ``forget_loss(params, forget_batch) -> scalar``.

and ``L_r`` the mean retain NLL (``retain_loss="nll"``) or ``KL(p_ref || p_theta)`` on
retain tokens (``"kl"``). Variants, each a flag of :class:`UnlearnConfig`:

- ``project=True``: geometric disentanglement. The forget gradient ``gamma * grad L_f``
  is projected onto the orthogonal complement of ``retain_k`` retain gradients (one per
  micro-batch of the retain batch) by :func:`jaxunlearn.project_orthogonal`, which
  also adds ``alpha * mean_j r_j``; ``projection_*`` options choose the metric,
  per-tensor subspaces and PCGrad-style conflict-only projection.
- ``sam_rho > 0``: the forget gradient is taken at the SAM point ``theta + e``.
- ``saf=True``: sharpness-aware forgetting: ``L_f`` is replaced by
  :func:`jaxunlearn.saf_loss` (forget loss at the fake-quantised weights with an STE,
  at a SAM-style perturbation), so forgetting survives quantisation.
- ``mask``: a SalUn mask (pytree of 0/1) multiplies every update.

Everything runs in one ``jax.jit``; the state is donated; shapes are static.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxunlearn import tree as jt
from jaxunlearn import validate as V
from jaxunlearn.losses import gradient_ascent, kl_to_reference, npo, sequence_nll, simnpo
from jaxunlearn.projection import METRICS as PROJECTION_METRICS
from jaxunlearn.projection import project_orthogonal
from jaxunlearn.quant import SCHEMES as SAF_SCHEMES
from jaxunlearn.saliency import masked_updates
from jaxunlearn.sharding import jit_keeping_state_sharding
from jaxunlearn.sam import saf_loss, sam_gradient

__all__ = ["METHODS", "UnlearnConfig", "UnlearnState", "make_unlearn_optimizer", "make_unlearn_step",
           "init_unlearn_state", "forget_loss_fn", "retain_loss_fn"]

METHODS = ("ga", "grad_diff", "npo", "simnpo")
OPTIMIZERS = ("adamw", "sgd")
RETAIN_LOSSES = ("nll", "kl")
_NEEDS_REF = ("npo",)


@dataclasses.dataclass(frozen=True)
class UnlearnConfig:
    """Hyperparameters of a gradient-based unlearning run.

    Attributes:
      method: ``"ga" | "grad_diff" | "npo" | "simnpo"`` (or pass ``forget_loss`` to
        :func:`make_unlearn_step`).
      steps: number of steps.
      optimizer: ``"adamw"`` or ``"sgd"`` (plain gradient descent: the update is exactly
        ``-learning_rate`` times the combined gradient, useful to see the geometry).
      learning_rate: learning rate (constant after ``warmup_steps``).
      warmup_steps: linear warmup.
      weight_decay: AdamW weight decay.
      grad_clip: global-norm clip of the final update direction (0: off).
      gamma: weight of the forget loss.
      alpha: weight of the retain loss (ignored by ``"ga"``).
      beta: NPO / SimNPO inverse temperature (``None``: 0.1 for NPO, 4.5 for SimNPO).
      delta: SimNPO margin.
      retain_loss: ``"nll"`` or ``"kl"`` (KL to the reference on retain tokens).
      project: orthogonal projection of the forget gradient (GU).
      retain_k: number of retain gradients spanning the subspace (the retain batch is
        split into this many strided micro-batches, rows ``j::retain_k``; must divide its size).
      projection_per_tensor / projection_metric / projection_only_conflicting: see
        :func:`jaxunlearn.project_orthogonal`.
      sam_rho: SAM radius on the forget objective (0: off).
      saf: sharpness-aware forgetting through fake quantisation.
      saf_scheme / saf_block_size / saf_rho: quantiser and radius of :func:`jaxunlearn.saf_loss`
        (``saf_rho=None``: the quantisation displacement ``||Q(theta) - theta||``).

    Every field is validated at construction (see :mod:`jaxunlearn.validate`):
    ``learning_rate > 0``; ``steps, warmup_steps >= 0`` and ``retain_k, saf_block_size >= 1``
    (ints, not bools or floats); ``weight_decay, grad_clip, gamma, alpha, sam_rho >= 0``
    (a negative ``gamma`` would run the forget objective backwards, i.e. re-learn);
    ``beta`` and ``saf_rho`` ``None`` or ``> 0``; ``delta`` any finite number; every float
    finite; the string fields one of their choices; the flags bools; and not both
    ``saf`` and ``sam_rho > 0``.

    Raises:
      TypeError: a field of the wrong type (message ``"UnlearnConfig.<field> must be ..., got <value>"``).
      ValueError: a field with a bad value (same message form), or ``saf`` with ``sam_rho > 0``.
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

    def __post_init__(self):
        _validate_unlearn_config(self)

    @property
    def uses_retain(self) -> bool:
        """Whether retain data enters the update (a retain term or the projection)."""
        return self.project or (self.method != "ga" and self.alpha != 0)

    @property
    def needs_reference(self) -> bool:
        """Whether the frozen reference model is evaluated (NPO, or the KL retain loss)."""
        return self.method in _NEEDS_REF or (self.uses_retain and self.retain_loss == "kl")


def _validate_unlearn_config(cfg: UnlearnConfig) -> None:
    """Check the type and range of every field of ``cfg`` and store it as a plain Python value.

    Raises ``TypeError`` / ``ValueError`` naming the field (``"UnlearnConfig.<field> must be
    ..., got <value>"``); numpy scalars are stored as ``int`` / ``float`` / ``bool``.
    """
    o = "UnlearnConfig"
    out = {}
    for name, choices in (("method", METHODS), ("optimizer", OPTIMIZERS), ("retain_loss", RETAIN_LOSSES),
                          ("projection_metric", PROJECTION_METRICS), ("saf_scheme", SAF_SCHEMES)):
        out[name] = V.check_choice(o, name, getattr(cfg, name), choices)
    for name, lo in (("steps", 0), ("warmup_steps", 0), ("retain_k", 1), ("saf_block_size", 1)):
        out[name] = V.check_int(o, name, getattr(cfg, name), min=lo)
    out["learning_rate"] = V.check_float(o, "learning_rate", cfg.learning_rate, min=0.0, min_exclusive=True)
    for name in ("weight_decay", "grad_clip", "gamma", "alpha", "sam_rho"):
        out[name] = V.check_float(o, name, getattr(cfg, name), min=0.0)
    out["delta"] = V.check_float(o, "delta", cfg.delta)
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


class UnlearnState(NamedTuple):
    """``step`` (int32), ``params`` (the model's parameter pytree), ``opt_state`` (optax)."""

    step: jax.Array
    params: Any
    opt_state: Any


def make_unlearn_optimizer(cfg: UnlearnConfig, mask: Any = None) -> optax.GradientTransformationExtraArgs:
    """``[project_orthogonal] -> [clip] -> [SalUn mask] -> adamw | sgd`` as one optax chain.

    With ``cfg.project`` the chain's ``update`` takes ``retain_grads=`` (stacked, leading k).
    """
    parts = []
    if cfg.project:
        parts.append(project_orthogonal(
            per_tensor=cfg.projection_per_tensor, metric=cfg.projection_metric,
            only_conflicting=cfg.projection_only_conflicting, retain_scale=cfg.alpha, forget_scale=1.0))
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    if mask is not None:
        parts.append(masked_updates(mask))
    lr = (optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps) if cfg.warmup_steps
          else cfg.learning_rate)
    if cfg.optimizer == "sgd":
        parts.append(optax.sgd(lr))
    else:
        parts.append(optax.adamw(lr, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def init_unlearn_state(params, cfg: UnlearnConfig, mask: Any = None) -> UnlearnState:
    """The initial :class:`UnlearnState` for ``params``.

    The parameters are copied: the step donates its state, and the caller's arrays
    (often also the frozen reference of NPO) must stay alive.
    """
    params = jax.tree.map(jnp.copy, params)
    return UnlearnState(jnp.zeros((), jnp.int32), params, make_unlearn_optimizer(cfg, mask).init(params))


def _nll(apply_fn, params, batch):
    logits = apply_fn(params, batch["input_ids"], batch["attention_mask"])
    return logits, sequence_nll(logits, batch["input_ids"], batch["loss_mask"])


def forget_loss_fn(apply_fn: Callable, cfg: UnlearnConfig) -> Callable:
    """``L_f(params, batch)`` of ``cfg.method``; ``batch`` may carry ``ref_logp`` (NPO).

    GA / GradDiff: ``-mean NLL``; NPO: :func:`jaxunlearn.losses.npo` with
    ``batch["ref_logp"]``; SimNPO: :func:`jaxunlearn.losses.simnpo`.
    """

    def loss(params, batch):
        _, nll = _nll(apply_fn, params, batch)
        if cfg.method in ("ga", "grad_diff"):
            return gradient_ascent(nll)
        if cfg.method == "npo":
            return npo(-nll, batch["ref_logp"], beta=0.1 if cfg.beta is None else cfg.beta)
        lengths = jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32), axis=-1)
        return simnpo(nll, lengths, beta=4.5 if cfg.beta is None else cfg.beta, delta=cfg.delta)

    return loss


def retain_loss_fn(apply_fn: Callable, cfg: UnlearnConfig) -> Callable:
    """``L_r(params, batch)``: mean retain NLL, or mean token KL to ``batch["ref_logits"]``."""

    def loss(params, batch):
        logits, nll = _nll(apply_fn, params, batch)
        if cfg.retain_loss == "kl":
            return kl_to_reference(logits, batch["ref_logits"], batch["loss_mask"])
        return jnp.mean(nll)

    return loss


def _check_batch(batch, name):
    for k in ("input_ids", "attention_mask", "loss_mask"):
        if k not in batch:
            raise KeyError(f"{name} batch lacks '{k}' (have {sorted(batch)})")
    if batch["input_ids"].shape[0] == 0:
        raise ValueError(f"{name} batch is empty")


def _buffer_ids(x) -> set:
    try:
        return {sh.data.unsafe_buffer_pointer() for sh in x.addressable_shards}
    except Exception:  # not a jax.Array (numpy, tracer): cannot alias a donated buffer
        return set()


def _check_not_aliased(state, ref_params) -> None:
    """The state is donated: a reference leaf sharing its buffer would be read after donation."""
    donated = set()
    for x in jax.tree.leaves(state):
        donated |= _buffer_ids(x)
    for path, x in jt.leaves_with_paths(ref_params):
        if _buffer_ids(x) & donated:
            raise ValueError(
                f"ref_params leaf '{path}' shares its buffer with the unlearning state, which the step "
                "donates; pass a copy (init_unlearn_state copies the params it is given)")


def make_unlearn_step(apply_fn: Callable, cfg: UnlearnConfig, *, mask: Any = None,
                      forget_loss: Callable | None = None) -> Callable:
    """Build the jitted ``step(state, forget_batch, retain_batch, ref_params=None)``.

    Args:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits``.
      cfg: :class:`UnlearnConfig`.
      mask: optional SalUn mask (pytree of 0/1 like the params) applied to every update.
      forget_loss: optional custom ``L_f(params, forget_batch) -> scalar`` replacing
        ``cfg.method``'s (the method's retain term and variants still apply).

    Returns:
      ``step(state, forget_batch, retain_batch, ref_params=None) -> (state, metrics)``
      with metrics ``forget_loss``, ``retain_loss``, ``update_norm``. ``ref_params`` is
      required when ``cfg.needs_reference`` (NPO, KL retain loss). ``state`` is donated.
    """
    tx = make_unlearn_optimizer(cfg, mask)
    f_loss = forget_loss or forget_loss_fn(apply_fn, cfg)
    r_loss = retain_loss_fn(apply_fn, cfg)
    ref_forget = forget_loss is None and cfg.method in _NEEDS_REF
    ref_retain = cfg.uses_retain and cfg.retain_loss == "kl"
    needs_ref = ref_forget or ref_retain

    def forget_value_and_grad(params, fb):
        if cfg.saf:
            obj = lambda p, b: saf_loss(f_loss, p, b, scheme=cfg.saf_scheme,  # noqa: E731
                                        block_size=cfg.saf_block_size, rho=cfg.saf_rho)
            return jax.value_and_grad(obj)(params, fb)
        if cfg.sam_rho > 0:
            return sam_gradient(f_loss, params, fb, rho=cfg.sam_rho)
        return jax.value_and_grad(f_loss)(params, fb)

    def step(state: UnlearnState, fb, rb, ref_params):
        params = state.params
        if ref_forget:
            _, ref_nll = _nll(apply_fn, ref_params, fb)
            fb = {**fb, "ref_logp": jax.lax.stop_gradient(-ref_nll)}
        if ref_retain:
            ref_logits = apply_fn(ref_params, rb["input_ids"], rb["attention_mask"])
            rb = {**rb, "ref_logits": jax.lax.stop_gradient(ref_logits)}
        lf, gf = forget_value_and_grad(params, fb)
        gf = jt.scale(gf, cfg.gamma)
        lr = jnp.zeros((), jnp.float32)
        if cfg.project:
            k = cfg.retain_k
            # micro-batch j = rows j, j + k, j + 2k, ...: strided, so with the batch sharded over the
            # data axes every micro-batch keeps rows on every shard (a contiguous split would not).
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), rb)
            lrs, R = jax.vmap(jax.value_and_grad(r_loss), in_axes=(None, 0))(params, micro)
            lr = jnp.mean(lrs)
            updates, opt_state = tx.update(gf, state.opt_state, params, retain_grads=R)
        else:
            g = gf
            if cfg.uses_retain:
                lr, gr = jax.value_and_grad(r_loss)(params, rb)
                g = jt.axpy(cfg.alpha, gr, gf)
            updates, opt_state = tx.update(g, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        metrics = {"forget_loss": lf, "retain_loss": lr, "update_norm": jt.global_norm(updates)}
        return UnlearnState(state.step + 1, new_params, opt_state), metrics

    jitted = jit_keeping_state_sharding(step)

    def run(state: UnlearnState, forget_batch, retain_batch=None, ref_params=None):
        _check_batch(forget_batch, "forget")
        if cfg.uses_retain:
            if retain_batch is None:
                raise ValueError(f"method {cfg.method!r} with these options needs a retain batch")
            _check_batch(retain_batch, "retain")
            if cfg.project and retain_batch["input_ids"].shape[0] % cfg.retain_k:
                raise ValueError(f"retain batch size {retain_batch['input_ids'].shape[0]} is not divisible by "
                                 f"retain_k={cfg.retain_k}")
        else:
            retain_batch = {}
        if needs_ref and ref_params is None:
            raise ValueError(f"method {cfg.method!r} (retain_loss={cfg.retain_loss!r}) needs ref_params")
        if needs_ref:
            _check_not_aliased(state, ref_params)
        fb = {k: forget_batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}
        rb = {k: retain_batch[k] for k in ("input_ids", "attention_mask", "loss_mask")} if retain_batch else {}
        return jitted(state, fb, rb, ref_params if needs_ref else None)

    return run
