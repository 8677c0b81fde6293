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
(:func:`jaxunlearn.sharding.jit_keeping_state_sharding`); the reference model's outputs
(NPO's ``ref_logp``, the KL's ``ref_logits``) are computed inside it from ``ref_params``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxunlearn import tree as jt
from jaxunlearn import validate as V
from jaxunlearn.estimators import GradientEstimator, plain_estimator
from jaxunlearn.losses import batch_token_nll, kl_to_reference, npo, sequence_nll, simnpo, undial, wga
from jaxunlearn.sharding import jit_keeping_state_sharding

__all__ = ["METHODS", "RETAIN_LOSSES", "NLL_REDUCTIONS", "UnlearnState", "Unlearner", "unlearner", "forget_loss_fn",
           "retain_loss_fn"]

METHODS = ("ga", "grad_diff", "npo", "simnpo", "wga", "undial")
RETAIN_LOSSES = ("nll", "kl")
NLL_REDUCTIONS = ("token", "sequence")
_BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")


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
      (open-unlearning's UNDIAL config; :func:`unlearner` adds them with ``forget_ref_logits=True``).

    Args:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits``.
      method: one of :data:`METHODS`.
      beta: NPO / SimNPO inverse temperature (> 0; None: the method's default).
      delta: SimNPO margin (finite).
      reduction: ``"token"`` (default, the reference trainers') or ``"sequence"``; the
        batch NLL of GA / GradDiff (see above).

    Returns:
      ``loss(params, batch) -> float32 scalar``, ``batch`` in the convention of :mod:`jaxunlearn.losses`.

    Raises:
      ValueError / TypeError: an unknown ``method`` or ``reduction``, a bad ``beta`` or ``delta``.

    References:
      Jang et al., 2023 (GA); Zhang et al., "Negative Preference Optimization", 2024 (NPO);
      Fan et al., "Simplicity Prevails: Rethinking Negative Preference Optimization", 2024 (SimNPO).
    """
    V.check_choice("forget_loss_fn", "method", method, METHODS)
    beta = V.check_float("forget_loss_fn", "beta", beta, min=0.0, min_exclusive=True, allow_none=True)
    delta = V.check_float("forget_loss_fn", "delta", delta)
    V.check_choice("forget_loss_fn", "reduction", reduction, NLL_REDUCTIONS)

    def loss(params, batch):
        logits, nll = _nll(apply_fn, params, batch)
        ids, mask = batch["input_ids"], batch["loss_mask"]
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
    """

    init: Callable[[Any], UnlearnState]
    step: Callable[..., tuple[UnlearnState, dict]]
    uses_retain: bool
    needs_reference: bool
    tx: optax.GradientTransformation
    params_fn: Callable | None = None


def _check_batch(batch, name):
    for k in _BATCH_KEYS:
        if k not in batch:
            raise KeyError(f"{name} batch lacks '{k}' (have {sorted(batch)})")
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
    are taken with respect to ``t``, and ``t <- t + u`` (see the module docstring). Before the losses are called, the
    frozen reference model ``apply_fn(ref_params, ...)`` supplies ``forget_batch["ref_logp"]``
    (its per-example summed answer log-likelihood, with ``forget_ref_logp``),
    ``forget_batch["ref_logits"]`` (with ``forget_ref_logits``, UNDIAL) and
    ``retain_batch["ref_logits"]`` (with ``retain_ref_logits``), all without gradient.

    ``step`` checks its inputs before running: the batches carry ``input_ids``,
    ``attention_mask`` and ``loss_mask`` (only these reach the losses) and are not empty; a
    retain batch is given when there is a retain loss, with a size divisible by ``retain_k``;
    ``ref_params`` is given when a reference is read, and shares no buffer with the donated state.

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
        (needed with ``forget_ref_logp`` or ``retain_ref_logits``).
      forget_ref_logp: add ``ref_logp`` to the forget batch (NPO).
      retain_ref_logits: add ``ref_logits`` to the retain batch (the KL retain loss).
      forget_ref_logits: add ``ref_logits`` to the forget batch (UNDIAL).
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
        or ``retain_ref_logits`` without ``retain_loss``, a reference without ``apply_fn``.
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
    needs_ref = forget_ref_logp or retain_ref_logits or forget_ref_logits
    if needs_ref and not callable(apply_fn):
        raise ValueError(f"{o}: forget_ref_logp / forget_ref_logits / retain_ref_logits need the reference's apply_fn, "
                         f"got {apply_fn!r}")
    uses_retain = retain_loss is not None

    def step(state: UnlearnState, fb, rb, ref_params, frozen):
        params = state.params

        def full(t):  # the model's parameters of the trained pytree t
            return t if params_fn is None else params_fn(frozen, t)

        if needs_ref:
            ref_params = full(ref_params)
        if forget_ref_logp:
            _, ref_nll = _nll(apply_fn, ref_params, fb)
            fb = {**fb, "ref_logp": jax.lax.stop_gradient(-ref_nll)}
        if forget_ref_logits:
            fb = {**fb, "ref_logits": jax.lax.stop_gradient(apply_fn(ref_params, fb["input_ids"],
                                                                     fb["attention_mask"]))}
        if retain_ref_logits:
            ref_logits = apply_fn(ref_params, rb["input_ids"], rb["attention_mask"])
            rb = {**rb, "ref_logits": jax.lax.stop_gradient(ref_logits)}
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
        _check_batch(forget_batch, "forget")
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
                what = " and ".join(w for w, on in (("the forget loss reads ref_logp", forget_ref_logp),
                                                    ("the forget loss reads ref_logits", forget_ref_logits),
                                                    ("the retain loss reads ref_logits", retain_ref_logits)) if on)
                raise ValueError(f"this unlearner needs ref_params, the frozen reference model ({what})")
            _check_not_aliased(state, ref_params)
        fb = {k: forget_batch[k] for k in _BATCH_KEYS}
        rb = {k: retain_batch[k] for k in _BATCH_KEYS} if uses_retain else {}
        return compiled(state, fb, rb, ref_params if needs_ref else None, frozen)

    return Unlearner(lambda params: _init_state(tx, params), checked_step, uses_retain, needs_ref, tx, params_fn)
