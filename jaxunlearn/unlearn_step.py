"""The unlearning step, optax-shaped: an :class:`Unlearner` ``(init, step)`` built by composition.

One step minimises

    L = gamma * L_f(theta; forget) + alpha * L_r(theta; retain)

and is assembled from four parts, each replaceable:

- a **forget loss** ``L_f(params, forget_batch) -> scalar`` (:func:`forget_loss_fn` gives
  GA / GradDiff ``-mean NLL``, NPO against a frozen reference, reference-free SimNPO);
- a **retain loss** ``L_r(params, retain_batch) -> scalar`` or None (:func:`retain_loss_fn`:
  the mean retain NLL, or ``KL(p_ref || p_theta)`` on retain answer tokens);
- a **gradient estimator** of the forget term (:mod:`jaxunlearn.estimators`: plain, SAM, SAF);
- an **optax transform** that turns the combined gradient into the update, e.g.
  ``[project_orthogonal] -> [clip] -> [SalUn mask] -> adamw | sgd``.

:func:`unlearner` puts them together, as ``optax.chain`` puts transforms together;
:class:`jaxunlearn.unlearn.UnlearnConfig` is the preset over it (as ``optax.adamw`` is over
``chain``). A SalUn mask goes in the transform, once, so ``init`` and ``step`` always share
one optimizer.

Geometric disentanglement (``retain_k``): the retain batch is split into ``k`` strided
micro-batches (rows ``j::k``) whose ``k`` gradients reach the transform as
``retain_grads=``; :func:`jaxunlearn.project_orthogonal` projects the forget gradient away
from their span and adds ``alpha * mean_j r_j``.

Adapter space (``params_fn``): the step may train a reparametrisation ``t`` of the model's
parameters, ``theta = params_fn(frozen, t)``, e.g. a LoRA adapter over a frozen (NF4) base
(:func:`jaxunlearn.adapters.adapter_params_fn`). The state then holds ``t``, the frozen part is
an argument of every step (never donated, never checkpointed with the state), the losses see
``theta``, and every other part is unchanged: the estimator acts on ``theta`` (so SAM's ascent
and SAF's fake quantisation act on the merged weights the model deploys) and its gradient is
pulled back to ``t`` by the chain rule, ``g_t = (d theta / d t)^T g_theta``; the retain
gradients are ``grad_t L_r(params_fn(frozen, t))``; the transform (projection, clipping,
masks, the optimizer) acts on ``t``.

The step is pure and runs in one ``jax.jit`` with the state donated and its shardings kept
(:func:`jaxunlearn.sharding.jit_keeping_state_sharding`); the reference model's outputs are
computed inside it from ``ref_params``, as declared by :class:`Reference` s (batch, key, function:
NPO's ``ref_logp``, IdkDPO's ``ref_logp`` and ``ref_alt_logp``, UNDIAL's and the KL's
``ref_logits``, RMU's frozen hidden states; :func:`forget_references` is the methods' table), and
``forget_keys`` declares the forget batch's keys (IdkNLL / IdkDPO's refusal answers).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxunlearn import tree as jt
from jaxunlearn import validate as V
from jaxunlearn.estimators import GradientEstimator, plain_estimator
from jaxunlearn.losses import (ALT_KEYS, alt_batch, batch_token_nll, dpo, kl_to_reference, npo, sequence_nll, simnpo,
                               undial, wga)
from jaxunlearn.sharding import jit_keeping_state_sharding

__all__ = ["METHODS", "RETAIN_LOSSES", "NLL_REDUCTIONS", "BATCH_KEYS", "UnlearnState", "Unlearner", "unlearner",
           "forget_loss_fn", "retain_loss_fn", "Reference", "reference_logp", "reference_logits", "forget_references",
           "forget_batch_keys"]

METHODS = ("ga", "grad_diff", "npo", "simnpo", "wga", "undial", "idk_nll", "idk_dpo")
RETAIN_LOSSES = ("nll", "kl")
NLL_REDUCTIONS = ("token", "sequence")
BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")
"""The keys every batch of a step carries (and, by default, the only ones that reach the losses)."""
_SPLITS = ("forget", "retain")


class UnlearnState(NamedTuple):
    """``step`` (int32), ``params`` (the model's parameter pytree), ``opt_state`` (optax)."""

    step: jax.Array
    params: Any
    opt_state: Any


# ---------------------------------------------------------------- losses


def _nll(apply_fn, params, batch):
    logits = apply_fn(params, batch["input_ids"], batch["attention_mask"])
    return logits, sequence_nll(logits, batch["input_ids"], batch["loss_mask"])


def _lengths(batch):
    return jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32), axis=-1)


def _reduce(nll, batch, reduction: str):
    """The batch NLL: ``"token"`` pools every answer token (:func:`jaxunlearn.batch_token_nll`,
    Hugging Face's loss); ``"sequence"`` is the mean over examples of the summed NLL."""
    return batch_token_nll(nll, _lengths(batch)) if reduction == "token" else jnp.mean(nll)


# ---------------------------------------------------------------- the reference model's outputs


class Reference(NamedTuple):
    """One output of the frozen reference model that a loss reads.

    Before the losses run, the step stores ``batch[key] = stop_gradient(fn(ref_model, batch))``
    in the ``split`` batch, ``ref_model`` the reference's parameters (in adapter space the
    merged ones, ``params_fn(frozen, ref_params)``) and ``batch`` the keys the step passes on
    (:data:`BATCH_KEYS`, plus ``forget_keys`` for the forget batch).

    Attributes:
      split: ``"forget"`` or ``"retain"``.
      key: the batch key the output is stored under (e.g. ``"ref_logp"``).
      fn: ``fn(ref_model_params, batch) -> array``.
    """

    split: str
    key: str
    fn: Callable[[Any, Mapping[str, jax.Array]], jax.Array]


def _logp_of(apply_fn, prefix, params, batch):
    b = {k: batch[prefix + k] for k in BATCH_KEYS}
    return -_nll(apply_fn, params, b)[1]


def _logits_of(apply_fn, params, batch):
    return apply_fn(params, batch["input_ids"], batch["attention_mask"])


def reference_logp(apply_fn: Callable, split: str = "forget", *, prefix: str = "") -> Reference:
    """The reference's per-example summed answer log-likelihood ``log p_ref(y|x) = -sequence_nll``,
    stored as ``ref_{prefix}logp``, of the batch's ``{prefix}input_ids`` / ``{prefix}attention_mask`` /
    ``{prefix}loss_mask`` (``prefix="alt_"``: of the alternate completions, ``ref_alt_logp``).

    Args:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits``.
      split: ``"forget"`` or ``"retain"``.
      prefix: ``""`` or ``"alt_"``.
    """
    V.check_choice("reference_logp", "split", split, _SPLITS)
    V.check_choice("reference_logp", "prefix", prefix, ("", "alt_"))
    return Reference(split, f"ref_{prefix}logp", lambda params, batch: _logp_of(apply_fn, prefix, params, batch))


def reference_logits(apply_fn: Callable, split: str = "forget") -> Reference:
    """The reference's logits of the batch, stored as ``ref_logits`` (UNDIAL's teacher, the KL retain loss).

    Args:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits``.
      split: ``"forget"`` or ``"retain"``.
    """
    V.check_choice("reference_logits", "split", split, _SPLITS)
    return Reference(split, "ref_logits", lambda params, batch: _logits_of(apply_fn, params, batch))


_FORGET_REFERENCE = {"npo": ("logp",), "undial": ("logits",), "idk_dpo": ("logp", "alt_logp")}
"""Which reference outputs each named method's forget loss reads (the others read none)."""


def forget_references(apply_fn: Callable, method: str) -> tuple[Reference, ...]:
    """The reference outputs the forget loss of ``method`` (:func:`forget_loss_fn`) reads.

    NPO: ``ref_logp``; UNDIAL: ``ref_logits``; IdkDPO: ``ref_logp`` and ``ref_alt_logp``
    (DPO's reference handling is NPO's, on both completions); the other methods: none.

    >>> [r.key for r in forget_references(lambda p, ids, mask: None, "idk_dpo")]
    ['ref_logp', 'ref_alt_logp']
    """
    V.check_choice("forget_references", "method", method, METHODS)
    make = {"logp": lambda: reference_logp(apply_fn), "alt_logp": lambda: reference_logp(apply_fn, prefix="alt_"),
            "logits": lambda: reference_logits(apply_fn)}
    return tuple(make[name]() for name in _FORGET_REFERENCE.get(method, ()))


def forget_batch_keys(method: str) -> tuple[str, ...]:
    """The forget-batch keys the forget loss of ``method`` reads: :data:`BATCH_KEYS`, plus the
    refusal answers :data:`jaxunlearn.losses.ALT_KEYS` for ``"idk_nll"`` / ``"idk_dpo"``."""
    V.check_choice("forget_batch_keys", "method", method, METHODS)
    return BATCH_KEYS + ALT_KEYS if method in ("idk_nll", "idk_dpo") else BATCH_KEYS


# ---------------------------------------------------------------- the forget and retain losses


def forget_loss_fn(apply_fn: Callable, method: str, *, beta: float | None = None,
                   delta: float = 0.0, reduction: str = "token") -> Callable:
    """The forget loss ``L_f(params, batch) -> scalar`` of a named method.

    With ``NLL_n`` the summed answer NLL of example n (:func:`jaxunlearn.sequence_nll`) and
    ``|y_n|`` its answer tokens (the closing EOS included):

    - ``"ga"``, ``"grad_diff"``: the negated batch NLL, ``-sum_n NLL_n / sum_n |y_n|`` with
      ``reduction="token"`` (Hugging Face's ``-model(**batch).loss``, as open-unlearning's
      GradAscent / GradDiff), or ``-mean_n NLL_n`` with ``"sequence"``
      (:func:`jaxunlearn.gradient_ascent`);
    - ``"npo"``: :func:`jaxunlearn.npo` of ``-NLL`` against ``batch["ref_logp"]`` (the
      reference's summed answer log-likelihood; :func:`unlearner` adds it with
      ``forget_ref_logp=True``), ``beta`` default 0.1: per-sequence *summed* log-likelihoods,
      as the paper and open-unlearning's ``compute_dpo_loss``, whatever ``reduction``;
    - ``"simnpo"``: :func:`jaxunlearn.simnpo` (reference-free; per-sequence ``NLL_n / |y_n|``
      as the paper, whatever ``reduction``), ``beta`` default 4.5, margin ``delta``;
    - ``"wga"``: :func:`jaxunlearn.losses.wga`, token-pooled GA with each answer token weighted
      by ``sg(p)^beta``, ``beta`` default 1.0 (open-unlearning's WGA config);
    - ``"undial"``: :func:`jaxunlearn.losses.undial`, self-distillation toward the reference's
      logits ``batch["ref_logits"]`` with the true token's logit lowered by ``beta``, default 10
      (open-unlearning's UNDIAL config; :func:`unlearner` adds them with ``forget_ref_logits=True``);
    - ``"idk_nll"``: the batch NLL (``reduction`` as GA's) of the refusal answers ``alt_*``
      (:data:`jaxunlearn.losses.ALT_KEYS`): fine-tuning toward "I don't know" (TOFU's IDK
      objective; the retain term is GradDiff's);
    - ``"idk_dpo"``: :func:`jaxunlearn.losses.dpo` with the refusal as the preferred completion and
      the forget answer as the rejected one, against ``batch["ref_logp"]`` and
      ``batch["ref_alt_logp"]`` (:func:`forget_references`), ``beta`` default 0.1 (open-unlearning's
      ``configs/trainer/DPO.yaml``), per-sequence summed log-likelihoods whatever ``reduction``.

    Args:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits``.
      method: one of :data:`METHODS`.
      beta: NPO / SimNPO / IdkDPO inverse temperature, WGA exponent, UNDIAL logit reduction (> 0;
        None: the method's default).
      delta: SimNPO margin (finite).
      reduction: ``"token"`` (default, the reference trainers') or ``"sequence"``; the
        batch NLL of GA / GradDiff (see above).

    Returns:
      ``loss(params, batch) -> float32 scalar``, ``batch`` in the convention of :mod:`jaxunlearn.losses`.

    Raises:
      ValueError / TypeError: an unknown ``method`` or ``reduction``, a bad ``beta`` or ``delta``.

    References:
      Jang et al., 2023 (GA); Zhang et al., "Negative Preference Optimization", 2024 (NPO);
      Fan et al., "Simplicity Prevails: Rethinking Negative Preference Optimization", 2024 (SimNPO);
      Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", 2024 (IdkNLL, IdkDPO).
    """
    V.check_choice("forget_loss_fn", "method", method, METHODS)
    beta = V.check_float("forget_loss_fn", "beta", beta, min=0.0, min_exclusive=True, allow_none=True)
    delta = V.check_float("forget_loss_fn", "delta", delta)
    V.check_choice("forget_loss_fn", "reduction", reduction, NLL_REDUCTIONS)

    def loss(params, batch):
        if method == "idk_nll":  # the refusal answers only: no forward on the forget answers
            alt = alt_batch(batch)
            return _reduce(_nll(apply_fn, params, alt)[1], alt, reduction)
        logits, nll = _nll(apply_fn, params, batch)
        ids, mask = batch["input_ids"], batch["loss_mask"]
        if method == "idk_dpo":
            _, nll_alt = _nll(apply_fn, params, alt_batch(batch))
            return dpo(-nll_alt, batch["ref_alt_logp"], -nll, batch["ref_logp"], beta=0.1 if beta is None else beta)
        if method in ("ga", "grad_diff"):
            return -_reduce(nll, batch, reduction)
        if method == "npo":
            return npo(-nll, batch["ref_logp"], beta=0.1 if beta is None else beta)
        if method == "simnpo":
            return simnpo(nll, _lengths(batch), beta=4.5 if beta is None else beta, delta=delta)
        if method == "wga":
            return wga(logits, ids, mask, beta=1.0 if beta is None else beta)
        return undial(logits, batch["ref_logits"], ids, mask, beta=10.0 if beta is None else beta)

    return loss


def retain_loss_fn(apply_fn: Callable, kind: str = "nll", *, reduction: str = "token") -> Callable:
    """The retain loss ``L_r(params, batch) -> scalar``: the batch NLL or the KL to the reference.

    ``"nll"``: with ``reduction="token"`` (default) every answer token of the batch pooled,
    ``sum_n NLL_n / sum_n |y_n|`` (:func:`jaxunlearn.batch_token_nll`: Hugging Face's
    ``model(**batch).loss``, the retain term of open-unlearning's GradDiff / NPO / SimNPO, so
    their published ``alpha`` transfers); with ``"sequence"`` the mean over examples of the
    summed answer NLL (larger by about the mean answer length). ``"kl"``:
    :func:`jaxunlearn.kl_to_reference`, the mean over answer tokens of
    ``KL(p_ref || p_theta)`` against ``batch["ref_logits"]`` (the reference's logits;
    :func:`unlearner` adds them with ``retain_ref_logits=True``).

    Args:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits``.
      kind: one of :data:`RETAIN_LOSSES`.
      reduction: ``"token"`` or ``"sequence"`` (the ``"nll"`` batch NLL; see above).

    Returns:
      ``loss(params, batch) -> float32 scalar``.

    Raises:
      ValueError / TypeError: an unknown ``kind`` or ``reduction``.
    """
    V.check_choice("retain_loss_fn", "kind", kind, RETAIN_LOSSES)
    V.check_choice("retain_loss_fn", "reduction", reduction, NLL_REDUCTIONS)

    def loss(params, batch):
        logits, nll = _nll(apply_fn, params, batch)
        if kind == "kl":
            return kl_to_reference(logits, batch["ref_logits"], batch["loss_mask"])
        return _reduce(nll, batch, reduction)

    return loss


# ---------------------------------------------------------------- the unlearner


class Unlearner(NamedTuple):
    """An unlearning algorithm as a pair of pure functions (the shape of an optax transform).

    Attributes:
      init: ``init(params) -> UnlearnState`` (step 0, a copy of ``params``, the optimizer state).
      step: ``step(state, forget_batch, retain_batch=None, ref_params=None, *, frozen=None)
        -> (state, metrics)``; ``metrics`` holds the scalars ``forget_loss``, ``retain_loss``
        (0 without a retain loss) and ``update_norm``. ``state`` is donated. ``frozen``: the
        frozen part of an adapter-space unlearner (``params_fn``).
      uses_retain: whether ``step`` reads ``retain_batch``.
      needs_reference: whether ``step`` reads ``ref_params``.
      tx: the optax transform ``init`` and ``step`` share (e.g. to create its state sharded,
        :func:`jaxunlearn.sharding.init_opt_state`).
      params_fn: ``params_fn(frozen, t) -> params`` of an adapter-space unlearner, else None.
      forget_keys: the forget-batch keys ``step`` reads (:data:`BATCH_KEYS`, plus e.g. the
        refusal answers :data:`jaxunlearn.losses.ALT_KEYS`): a run draws its batches with them.
      references: the reference outputs ``step`` computes (:class:`Reference`).
    """

    init: Callable[[Any], UnlearnState]
    step: Callable[..., tuple[UnlearnState, dict]]
    uses_retain: bool
    needs_reference: bool
    tx: optax.GradientTransformation
    params_fn: Callable | None = None
    forget_keys: tuple[str, ...] = BATCH_KEYS
    references: tuple[Reference, ...] = ()


def _check_batch(batch, name, keys=BATCH_KEYS):
    for k in keys:
        if k not in batch:
            hint = ("; the preferred (refusal) answers of a preference method: "
                    "jaxunlearn.data.refusal.with_refusals adds them" if k in ALT_KEYS else "")
            raise KeyError(f"{name} batch lacks '{k}' (have {sorted(batch)}){hint}")
    if batch["input_ids"].shape[0] == 0:
        raise ValueError(f"{name} batch is empty")


def _buffer_ids(x) -> set:
    try:
        return {sh.data.unsafe_buffer_pointer() for sh in x.addressable_shards}
    except Exception:  # not a jax.Array (numpy, tracer): cannot alias a donated buffer
        return set()


def _check_not_aliased(state, other, name: str = "ref_params") -> None:
    """The state is donated: a leaf of ``other`` sharing its buffer would be read after donation."""
    donated = set()
    for x in jax.tree.leaves(state):
        donated |= _buffer_ids(x)
    for path, x in jt.leaves_with_paths(other):
        if _buffer_ids(x) & donated:
            raise ValueError(
                f"{name} leaf '{path}' shares its buffer with the unlearning state, which the step "
                "donates; pass a copy (Unlearner.init copies the params it is given)")


def _init_state(tx: optax.GradientTransformation, params) -> UnlearnState:
    # a copy: the step donates its state, and the caller's arrays (often also the frozen
    # reference of NPO) must stay alive
    params = jax.tree.map(jnp.copy, params)
    return UnlearnState(jnp.zeros((), jnp.int32), params, tx.init(params))


def unlearner(
    forget_loss: Callable[[Any, Any], jax.Array],
    tx: optax.GradientTransformation,
    *,
    retain_loss: Callable[[Any, Any], jax.Array] | None = None,
    estimator: GradientEstimator | None = None,
    gamma: float = 1.0,
    alpha: float | None = None,
    retain_k: int | None = None,
    apply_fn: Callable | None = None,
    forget_ref_logp: bool = False,
    retain_ref_logits: bool = False,
    forget_ref_logits: bool = False,
    references: Sequence[Reference] = (),
    forget_keys: Sequence[str] | None = None,
    params_fn: Callable[[Any, Any], Any] | None = None,
    jit: bool = True,
) -> Unlearner:
    """Compose an :class:`Unlearner` from a forget loss, a retain loss, an estimator and a transform.

    One step, with ``(L_f, g_f) = estimator(forget_loss, theta, forget_batch)``:

    - ``retain_k=None``: ``g = gamma g_f + alpha grad L_r(theta; retain_batch)`` (no retain
      term without ``retain_loss``), then ``u, s = tx.update(g, s, theta)``;
    - ``retain_k=k``: the retain batch is split into k strided micro-batches (rows ``j::k``),
      ``R`` stacks their k gradients of ``L_r``, and ``u, s = tx.update(gamma g_f, s, theta,
      retain_grads=R)``: the transform weights the retain term (e.g.
      ``project_orthogonal(retain_scale=alpha)`` returns ``gamma g_perp + alpha mean_j r_j``);

    and ``theta <- theta + u`` (``optax.apply_updates``). With ``params_fn`` the state holds
    ``t`` and the model's parameters are ``theta = params_fn(frozen, t)``: ``g_f`` is
    ``(d theta / d t)^T`` times the estimator's gradient at ``theta``, the retain gradients
    are taken with respect to ``t``, and ``t <- t + u`` (see the module docstring). Before the
    losses are called, every :class:`Reference` in ``references`` stores its output of the frozen
    reference model in its batch, without gradient; the flags are shorthands for the common ones:
    ``forget_ref_logp`` = :func:`reference_logp` (``forget_batch["ref_logp"]``, the per-example
    summed answer log-likelihood, NPO), ``forget_ref_logits`` = :func:`reference_logits` of the
    forget batch (UNDIAL), ``retain_ref_logits`` = :func:`reference_logits` of the retain batch
    (the KL retain loss).

    ``step`` checks its inputs before running: the forget batch carries ``forget_keys``, the
    retain batch ``input_ids``, ``attention_mask`` and ``loss_mask`` (only these reach the
    losses), and neither is empty; a retain batch is given when there is a retain loss, with a
    size divisible by ``retain_k``; ``ref_params`` is given when a reference is read, and shares
    no buffer with the donated state.

    Args:
      forget_loss: ``L_f(params, forget_batch) -> scalar`` (e.g. :func:`forget_loss_fn`).
      tx: the optax transform of the combined gradient (a SalUn mask, :func:`jaxunlearn.masked_updates`,
        goes in it); with ``retain_k`` its ``update`` takes ``retain_grads=``.
      retain_loss: ``L_r(params, retain_batch) -> scalar`` (e.g. :func:`retain_loss_fn`), or None.
      estimator: the forget gradient's estimator (:mod:`jaxunlearn.estimators`; None: plain).
      gamma: forget weight (>= 0).
      alpha: retain weight (>= 0; None: 1.0). Only without ``retain_k``.
      retain_k: number of retain gradients handed to ``tx`` (>= 1; needs ``retain_loss``), or None.
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits`` of the reference model
        (needed with the flags below).
      forget_ref_logp: add ``ref_logp`` to the forget batch (NPO).
      retain_ref_logits: add ``ref_logits`` to the retain batch (the KL retain loss).
      forget_ref_logits: add ``ref_logits`` to the forget batch (UNDIAL).
      references: further reference outputs the losses read (:class:`Reference`, e.g.
        :func:`forget_references` of a method; RMU's frozen hidden states), keys distinct.
      forget_keys: the forget-batch keys passed to the losses (None: :data:`BATCH_KEYS`; must
        include them).
      params_fn: ``params_fn(frozen, t) -> params``: unlearn in the space of ``t`` (e.g.
        :func:`jaxunlearn.adapters.adapter_params_fn`), ``frozen`` given to every ``step``;
        ``ref_params`` are then in ``t``'s space too (the reference model is
        ``params_fn(frozen, ref_params)``, e.g. the initial adapter). None: ``t = params``.
      jit: compile ``step`` (donating the state, keeping its shardings); False gives the
        same checked step unjitted, to call inside one's own ``jax.jit`` or ``lax.scan``.

    Returns:
      An :class:`Unlearner`.

    Raises:
      ValueError / TypeError: a bad argument (named), ``alpha`` with ``retain_k``, ``retain_k``
        or a retain reference without ``retain_loss``, a flag reference without ``apply_fn``, two
        references under one key, ``forget_keys`` without :data:`BATCH_KEYS`.
      The returned ``step`` raises ``KeyError`` (a batch key missing) and ``ValueError``
        (empty batch, missing retain batch or ``ref_params``, indivisible retain batch, aliased
        ``ref_params`` or ``frozen``, ``frozen`` missing with ``params_fn`` or given without).

    References:
      Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020 (the projection);
      Fan et al., "SalUn", ICLR 2024 (the mask).

    >>> import jax.numpy as jnp, optax
    >>> apply = lambda p, ids, mask: p["E"][ids] @ p["W"]            # a bigram LM
    >>> params = {"E": jnp.eye(4), "W": jnp.eye(4)}
    >>> batch = {"input_ids": jnp.array([[0, 1, 2]]), "attention_mask": jnp.ones((1, 3)),
    ...          "loss_mask": jnp.array([[0.0, 1.0, 1.0]])}
    >>> u = unlearner(forget_loss_fn(apply, "ga"), optax.sgd(0.1))
    >>> state = u.init(params)
    >>> state, metrics = u.step(state, batch)
    >>> int(state.step), round(float(metrics["forget_loss"]), 4)   # -NLL / 2 tokens = -log(e + 3)
    (1, -1.7437)
    """
    o = "unlearner"
    if not callable(forget_loss):
        raise TypeError(f"{o}.forget_loss must be callable, got {forget_loss!r}")
    if retain_loss is not None and not callable(retain_loss):
        raise TypeError(f"{o}.retain_loss must be callable or None, got {retain_loss!r}")
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(f"{o}.tx must be an optax GradientTransformation, got {tx!r}")
    estimator = plain_estimator() if estimator is None else estimator
    if not callable(estimator):
        raise TypeError(f"{o}.estimator must be callable, got {estimator!r}")
    gamma = V.check_float(o, "gamma", gamma, min=0.0)
    if retain_k is not None:
        retain_k = V.check_int(o, "retain_k", retain_k, min=1)
        if retain_loss is None:
            raise ValueError(f"{o}: retain_k={retain_k} needs a retain_loss (its gradients span the subspace)")
        if alpha is not None:
            raise ValueError(f"{o}: with retain_k the transform weights the retain term (e.g. "
                             f"project_orthogonal(retain_scale=alpha)); got alpha={alpha!r}")
    alpha = 1.0 if alpha is None else V.check_float(o, "alpha", alpha, min=0.0)
    forget_ref_logp = V.check_bool(o, "forget_ref_logp", forget_ref_logp)
    retain_ref_logits = V.check_bool(o, "retain_ref_logits", retain_ref_logits)
    forget_ref_logits = V.check_bool(o, "forget_ref_logits", forget_ref_logits)
    jit = V.check_bool(o, "jit", jit)
    if params_fn is not None and not callable(params_fn):
        raise TypeError(f"{o}.params_fn must be callable or None, got {params_fn!r}")
    if retain_ref_logits and retain_loss is None:
        raise ValueError(f"{o}: retain_ref_logits=True needs a retain_loss")
    if (forget_ref_logp or retain_ref_logits or forget_ref_logits) and not callable(apply_fn):
        raise ValueError(f"{o}: forget_ref_logp / forget_ref_logits / retain_ref_logits need the reference's apply_fn, "
                         f"got {apply_fn!r}")
    refs = ([reference_logp(apply_fn, "forget")] if forget_ref_logp else []) + \
        ([reference_logits(apply_fn, "forget")] if forget_ref_logits else []) + \
        ([reference_logits(apply_fn, "retain")] if retain_ref_logits else []) + _check_references(o, references)
    f_keys = _check_forget_keys(o, forget_keys)
    seen = {("forget", k) for k in f_keys}
    for r in refs:
        if (r.split, r.key) in seen:
            raise ValueError(f"{o}: two references (or a reference and forget_keys) store '{r.key}' in the "
                             f"{r.split} batch")
        seen.add((r.split, r.key))
        if r.split == "retain" and retain_loss is None:
            raise ValueError(f"{o}: reference '{r.key}' of the retain batch needs a retain_loss")
    refs = tuple(refs)
    needs_ref = bool(refs)
    uses_retain = retain_loss is not None

    def step(state: UnlearnState, fb, rb, ref_params, frozen):
        params = state.params

        def full(t):  # the model's parameters of the trained pytree t
            return t if params_fn is None else params_fn(frozen, t)

        if needs_ref:
            ref_params = full(ref_params)
            out = {"forget": {}, "retain": {}}
            for r in refs:  # every output from the batches as given, none from another's
                out[r.split][r.key] = jax.lax.stop_gradient(r.fn(ref_params, fb if r.split == "forget" else rb))
            fb, rb = {**fb, **out["forget"]}, {**rb, **out["retain"]}
        if params_fn is None:
            lf, gf = estimator(forget_loss, params, fb)
        else:  # the estimator at the model's parameters, its gradient pulled back to t
            theta, pull_back = jax.vjp(full, params)
            lf, g_theta = estimator(forget_loss, theta, fb)
            (gf,) = pull_back(g_theta)
        gf = jt.scale(gf, gamma)
        lr = jnp.zeros((), jnp.float32)
        r_loss = None if retain_loss is None else (lambda t, b: retain_loss(full(t), b))
        if retain_k is not None:
            k = retain_k
            # micro-batch j = rows j, j + k, j + 2k, ...: strided, so with the batch sharded over the
            # data axes every micro-batch keeps rows on every shard (a contiguous split would not).
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), rb)
            lrs, R = jax.vmap(jax.value_and_grad(r_loss), in_axes=(None, 0))(params, micro)
            lr = jnp.mean(lrs)
            updates, opt_state = tx.update(gf, state.opt_state, params, retain_grads=R)
        else:
            g = gf
            if uses_retain:
                lr, gr = jax.value_and_grad(r_loss)(params, rb)
                g = jt.axpy(alpha, gr, gf)
            updates, opt_state = tx.update(g, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        metrics = {"forget_loss": lf, "retain_loss": lr, "update_norm": jt.global_norm(updates)}
        return UnlearnState(state.step + 1, new_params, opt_state), metrics

    compiled = jit_keeping_state_sharding(step) if jit else step

    def checked_step(state: UnlearnState, forget_batch, retain_batch=None, ref_params=None, *, frozen=None):
        _check_batch(forget_batch, "forget", f_keys)
        if params_fn is not None and frozen is None:
            raise ValueError("this unlearner trains a reparametrisation (params_fn) and needs frozen=, "
                             "the frozen part of the model (e.g. the adapter's base)")
        if params_fn is None and frozen is not None:
            raise ValueError("frozen= is only for an unlearner built with params_fn (adapter space)")
        if frozen is not None:
            _check_not_aliased(state, frozen, "frozen")
        if uses_retain:
            if retain_batch is None:
                raise ValueError("this unlearner has a retain loss and needs a retain batch")
            _check_batch(retain_batch, "retain")
            n = retain_batch["input_ids"].shape[0]
            if retain_k is not None and n % retain_k:
                raise ValueError(f"retain batch size {n} is not divisible by retain_k={retain_k}")
        if needs_ref:
            if ref_params is None:
                what = " and ".join(f"the {r.split} loss reads {r.key}" for r in refs)
                raise ValueError(f"this unlearner needs ref_params, the frozen reference model ({what})")
            _check_not_aliased(state, ref_params)
        fb = {k: forget_batch[k] for k in f_keys}
        rb = {k: retain_batch[k] for k in BATCH_KEYS} if uses_retain else {}
        return compiled(state, fb, rb, ref_params if needs_ref else None, frozen)

    return Unlearner(lambda params: _init_state(tx, params), checked_step, uses_retain, needs_ref, tx, params_fn,
                     f_keys, refs)


def _check_references(owner: str, references) -> list[Reference]:
    if isinstance(references, Reference) or not isinstance(references, Sequence):
        raise TypeError(f"{owner}.references must be a sequence of Reference, got {references!r}")
    for i, r in enumerate(references):
        if not isinstance(r, Reference) or not callable(r.fn):
            raise TypeError(f"{owner}.references[{i}] must be a Reference with a callable fn, got {r!r}")
        V.check_choice(owner, f"references[{i}].split", r.split, _SPLITS)
        if not isinstance(r.key, str) or not r.key or r.key in BATCH_KEYS + ALT_KEYS:
            raise ValueError(f"{owner}.references[{i}].key must be a new batch key (not a data key), got {r.key!r}")
    return list(references)


def _check_forget_keys(owner: str, keys) -> tuple[str, ...]:
    if keys is None:
        return BATCH_KEYS
    if isinstance(keys, str) or not isinstance(keys, Sequence) or not all(isinstance(k, str) for k in keys):
        raise TypeError(f"{owner}.forget_keys must be a sequence of strings, got {keys!r}")
    missing = [k for k in BATCH_KEYS if k not in keys]
    if missing:
        raise ValueError(f"{owner}.forget_keys must include {BATCH_KEYS}; missing {missing}")
    return tuple(dict.fromkeys(keys))
