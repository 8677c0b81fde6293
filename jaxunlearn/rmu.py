"""RMU, representation misdirection for unlearning (Li et al., "The WMDP Benchmark", ICML 2024).

With ``h(theta; x)`` the residual stream after one block of the model (``(B, T, D)``;
:meth:`jaxunlearn.models.Decoder.hidden_state`, the forward stopped after that block), RMU
minimises

    L = gamma * ||h(theta; x_f) - c u||^2 + alpha * ||h(theta; x_r) - h(theta_frozen; x_r)||^2

each norm being :func:`jaxunlearn.losses.activation_loss` (per row the mean over its answer
tokens of the squared error averaged over the width, then the mean over rows): the forget
activations are pushed toward a fixed random direction ``u`` scaled by the steering coefficient
``c`` (scrambling what later layers read from them), the retain activations kept at the frozen
model's. Only a few blocks' MLP parameters are updated (a mask in the optax chain, as SalUn's).

It is built from the shared pieces of :mod:`jaxunlearn.unlearn_step`: :func:`rmu_unlearner` is
:func:`~jaxunlearn.unlearn_step.unlearner` with the two activation losses and the frozen model's
retain hidden states supplied by the reference mechanism (:func:`reference_hidden`, a
:class:`~jaxunlearn.unlearn_step.Reference`: computed inside the step from ``ref_params``, the
frozen starting model, without gradient). :func:`build_rmu` turns an
:class:`~jaxunlearn.method_configs.RMUMethod` into one (:func:`jaxunlearn.methods.run_method`
runs it).

Conventions follow open-unlearning's ``src/trainer/unlearn/rmu.py`` (itself from the WMDP code,
``rmu/unlearn.py``): ``u = r / ||r||`` with ``r ~ Uniform[0, 1)^D`` (``torch.rand``), the hidden
state hooked at the output of ``model.layers.{l}``, the token mask ``labels != -100`` (the answer
tokens: ``loss_mask`` here), and the retain target the frozen copy's activations.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxunlearn import tree as jt
from jaxunlearn import validate as V
from jaxunlearn.losses import activation_loss
from jaxunlearn.method_configs import RMU_PROJECTIONS, RMUMethod
from jaxunlearn.placement import replicate_unplaced
from jaxunlearn.models.scan import check_unrolled
from jaxunlearn.saliency import masked_updates
from jaxunlearn.unlearn import UnlearnConfig
from jaxunlearn.unlearn_step import Reference, Unlearner, unlearner

__all__ = ["control_vector", "rmu_forget_loss", "rmu_retain_loss", "reference_hidden", "rmu_trainable_mask",
           "rmu_unlearner", "decoder_hidden_fn", "build_rmu"]

HiddenFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def control_vector(seed: int, dim: int, steering_coeff: float) -> jax.Array:
    """RMU's forget target ``c u``: ``u = r / ||r||``, ``r ~ Uniform[0, 1)^dim`` drawn from
    ``jax.random.key(seed)`` (WMDP's and open-unlearning's ``torch.rand``), ``c = steering_coeff``.

    Returns:
      float32 ``(dim,)`` of norm ``steering_coeff``.

    >>> v = control_vector(0, 8, 2.0)
    >>> round(float(jnp.linalg.norm(v)), 5), bool(jnp.all(v >= 0))
    (2.0, True)
    """
    seed = V.check_int("control_vector", "seed", seed)
    dim = V.check_int("control_vector", "dim", dim, min=1)
    c = V.check_float("control_vector", "steering_coeff", steering_coeff, min=0.0, min_exclusive=True)
    r = jax.random.uniform(jax.random.key(seed), (dim,), jnp.float32)
    return c * r / jnp.linalg.norm(r)


def _hidden(hidden_fn: HiddenFn, params, batch) -> jax.Array:
    return hidden_fn(params, batch["input_ids"], batch["attention_mask"])


def rmu_forget_loss(hidden_fn: HiddenFn, control: jax.Array) -> Callable:
    """``L_f(params, batch) = activation_loss(hidden_fn(params, ids, mask), control, loss_mask)``.

    Args:
      hidden_fn: ``hidden_fn(params, input_ids, attention_mask) -> (B, T, D)``.
      control: the target ``c u`` (``(D,)``, :func:`control_vector`).
    """
    if not callable(hidden_fn):
        raise TypeError(f"rmu_forget_loss.hidden_fn must be callable, got {hidden_fn!r}")
    control = jnp.asarray(control, jnp.float32)
    if control.ndim != 1:
        raise ValueError(f"rmu_forget_loss.control must be a (D,) vector, got shape {control.shape}")

    def loss(params, batch):
        return activation_loss(_hidden(hidden_fn, params, batch), control, batch["loss_mask"])

    return loss


def rmu_retain_loss(hidden_fn: HiddenFn) -> Callable:
    """``L_r(params, batch) = activation_loss(hidden_fn(params, ids, mask), batch["ref_hidden"], loss_mask)``,
    ``ref_hidden`` the frozen model's hidden states (:func:`reference_hidden`)."""
    if not callable(hidden_fn):
        raise TypeError(f"rmu_retain_loss.hidden_fn must be callable, got {hidden_fn!r}")

    def loss(params, batch):
        return activation_loss(_hidden(hidden_fn, params, batch), batch["ref_hidden"], batch["loss_mask"])

    return loss


def reference_hidden(hidden_fn: HiddenFn) -> Reference:
    """The frozen model's hidden states of the retain batch, stored as ``ref_hidden``."""
    if not callable(hidden_fn):
        raise TypeError(f"reference_hidden.hidden_fn must be callable, got {hidden_fn!r}")
    return Reference("retain", "ref_hidden", lambda params, batch: _hidden(hidden_fn, params, batch))


def rmu_trainable_mask(params: Any, layers: Sequence[int], projections: Sequence[str] = ("down_proj",)) -> Any:
    """1.0 on the parameters of the MLP projections ``projections`` of blocks ``layers`` of a
    :class:`~jaxunlearn.models.Decoder` (paths ``layers/{l}/mlp/{projection}/...``), 0.0 elsewhere.

    Raises:
      ValueError: a block or projection without a parameter in ``params`` (named).
    """
    check_unrolled(params, "rmu_trainable_mask")
    projections = tuple(V.check_choice("rmu_trainable_mask", "projections", p, RMU_PROJECTIONS) for p in projections)
    prefixes = {f"layers/{int(l)}/mlp/{p}/": (l, p) for l in layers for p in projections}
    hit = set()

    def one(path, x):
        name = jt.path_str(path)
        on = [pre for pre in prefixes if name.startswith(pre)]
        hit.update(on)
        return jnp.full(jnp.shape(x), 1.0 if on else 0.0, jnp.float32)

    mask = jax.tree_util.tree_map_with_path(one, params)
    missing = [pre for pre in prefixes if pre not in hit]
    if missing:
        raise ValueError(f"rmu_trainable_mask: no parameter under {missing[0]!r} (the trainable blocks and MLP "
                         "projections must exist in the model)")
    return mask


def rmu_unlearner(hidden_fn: HiddenFn, control: jax.Array, tx: optax.GradientTransformation, *,
                  alpha: float = 1.0, gamma: float = 1.0, jit: bool = True) -> Unlearner:
    """RMU as an :class:`~jaxunlearn.unlearn_step.Unlearner`.

    ``unlearner(rmu_forget_loss(hidden_fn, control), tx, retain_loss=rmu_retain_loss(hidden_fn),
    gamma=gamma, alpha=alpha, references=(reference_hidden(hidden_fn),))``: one step is
    ``u, s = tx.update(gamma grad L_f + alpha grad L_r, s, theta)``, ``theta <- theta + u``, the
    frozen model's retain hidden states computed from ``ref_params`` inside the step. Put the
    trainable mask (:func:`rmu_trainable_mask`, with :func:`jaxunlearn.masked_updates`) in ``tx``.

    Args:
      hidden_fn: ``hidden_fn(params, input_ids, attention_mask) -> (B, T, D)``.
      control: the forget target ``c u`` (:func:`control_vector`).
      tx: the optax transform.
      alpha: retain weight (>= 0).
      gamma: forget weight (>= 0).
      jit: see :func:`~jaxunlearn.unlearn_step.unlearner`.

    References:
      Li et al., "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning", ICML
      2024; open-unlearning ``src/trainer/unlearn/rmu.py``.

    >>> import optax
    >>> hidden = lambda p, ids, mask: p["E"][ids]                     # a one-layer "model"
    >>> params = {"E": jnp.eye(3)}
    >>> batch = {"input_ids": jnp.array([[0, 1, 2]]), "attention_mask": jnp.ones((1, 3)),
    ...          "loss_mask": jnp.array([[0.0, 1.0, 1.0]])}
    >>> u = rmu_unlearner(hidden, jnp.zeros(3), optax.sgd(0.1))
    >>> state, m = u.step(u.init(params), batch, batch, params)
    >>> round(float(m["forget_loss"]), 4), float(m["retain_loss"])   # ||e_i||^2 / 3 = 1/3; at the frozen model
    (0.3333, 0.0)
    """
    return unlearner(rmu_forget_loss(hidden_fn, control), tx, retain_loss=rmu_retain_loss(hidden_fn), gamma=gamma,
                     alpha=alpha, references=(reference_hidden(hidden_fn),), jit=jit)


def decoder_hidden_fn(apply_fn: Any, layer: int) -> HiddenFn:
    """``hidden_fn(params, ids, mask) = apply_fn.hidden_state(params, ids, mask, layer=layer)`` of a
    :class:`~jaxunlearn.models.DecoderFn`.

    Raises:
      TypeError: ``apply_fn`` has no ``hidden_state`` (RMU needs the model's hidden states).
    """
    if not callable(getattr(apply_fn, "hidden_state", None)):
        raise TypeError(f"RMU needs the model's hidden states: the apply function must be a DecoderFn "
                        f"(jaxunlearn.models.DecoderFn.of(model)) with hidden_state, got {apply_fn!r}")
    layer = V.check_int("decoder_hidden_fn", "layer", layer, min=0)
    return lambda params, ids, mask: apply_fn.hidden_state(params, ids, mask, layer=layer)


def build_rmu(apply_fn: Any, cfg: RMUMethod, params: Any, *, seed: int = 0, mesh=None,
              param_specs: Any = None) -> Unlearner:
    """The :class:`~jaxunlearn.unlearn_step.Unlearner` of an :class:`~jaxunlearn.method_configs.RMUMethod`.

    The hidden states of block ``cfg.layer`` (:func:`decoder_hidden_fn`), the control vector of
    ``seed`` at the model's width, and the optax chain ``mask -> clip -> AdamW -> mask``
    (:meth:`jaxunlearn.unlearn.UnlearnConfig.transform` between two :func:`jaxunlearn.masked_updates`
    of the trainable mask): the clip sees the trainable parameters' gradient only and weight
    decay leaves the frozen ones alone, as an optimizer over the trainable parameters alone
    (open-unlearning's ``RMU.create_optimizer``).

    Args:
      apply_fn: the model's :class:`~jaxunlearn.models.DecoderFn`.
      cfg: the RMU config.
      params: the model's parameters (their paths give the mask, their width the control vector).
      seed: draws the control vector.
      mesh, param_specs: see :meth:`jaxunlearn.unlearn.UnlearnConfig.transform`.

    Raises:
      TypeError: ``apply_fn`` without hidden states. ValueError: ``cfg.layer`` or a trainable block
      beyond the model's blocks.
    """
    if not isinstance(cfg, RMUMethod):
        raise TypeError(f"build_rmu.cfg must be an RMUMethod, got {type(cfg).__name__}")
    hidden_fn = decoder_hidden_fn(apply_fn, cfg.layer)
    probe = jnp.zeros((1, 1), jnp.int32)
    dim = jax.eval_shape(hidden_fn, params, probe, jnp.ones((1, 1), jnp.int32)).shape[-1]
    mask = replicate_unplaced(rmu_trainable_mask(params, cfg.trainable_layers, cfg.trainable_params), mesh)
    opt = UnlearnConfig(steps=cfg.steps, learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                        weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, optimizer="adamw")
    tx = optax.chain(masked_updates(mask), opt.transform(mesh=mesh, param_specs=param_specs), masked_updates(mask))
    return rmu_unlearner(hidden_fn, control_vector(seed, dim, cfg.steering_coeff), tx, alpha=cfg.alpha,
                         gamma=cfg.gamma)
