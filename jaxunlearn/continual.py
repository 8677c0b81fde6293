"""Continual unlearning: state carried between deletion requests, Fisher-weighted and FIT-style updates.

Deletion requests arrive one after another; request ``r`` starts from the parameters request
``r - 1`` left. Two families of methods keep earlier work intact:

**Fisher-weighted anchoring** (``kind="lwf"``). A :class:`ContinualState` carries the running
diagonal Fisher ``F`` of what must be kept and the anchor ``theta*`` (the parameters after the
previous request). Request ``r``'s objective gains ``lambda sum_i F_i (theta_i - theta*_i)^2``,
whose gradient ``2 lambda F (theta - theta*)`` :func:`fisher_penalty` adds to the update (an optax
transform; its state holds ``F`` and ``theta*`` as arrays, so the jitted step closes over no
constants). This is EWC's quadratic penalty (Kirkpatrick et al., 2017, who write ``lambda / 2``:
their ``lambda`` is ``2 strength`` here); the stream calls it "lwf" as the issue names it, though
Li & Hoiem's Learning without Forgetting (2016) distils old outputs rather than penalising
weights. After each request the new Fisher is folded in (:func:`fold_fisher`):

- ``"mean"``: ``F_r = F_{r-1} + (F_new - F_{r-1}) / r``, the mean of every request's Fisher. EWC
  keeps one penalty per task, ``sum_t F_t (theta - theta*_t)^2``; with the one anchor of a stream
  that is ``r`` times this mean (the mean keeps ``lambda`` independent of ``r``).
- ``"decay"``: ``F_r = gamma F_{r-1} + F_new``, online EWC (Schwarz et al., 2018, "Progress &
  Compress"), which forgets old importances geometrically.

The Fisher is :func:`jaxunlearn.fisher.fisher_diagonal` of the summed answer NLL of each example
(:func:`jaxunlearn.methods.importance_loss`: fused for a decoder's :class:`~jaxunlearn.models.DecoderFn`)
on the retain data (what the model must keep) and, optionally, on the request just forgotten (so
later requests do not pull its parameters back), at the parameters after the request.

**FIT** (``kind="fit"``; Xu et al., 2026, "FIT: Defying Catastrophic Forgetting in Continual LLM
Unlearning", reference code ``XiaoyuXU1/FIT``). FIT's three mechanisms are redundancy Filtering,
Importance-aware algorithm selection and Targeted layer attribution; the importance is *not* a
Fisher. As the reference code does them:

- T (``Fit/layer.py``): each decoder layer's attribution is ``|L(theta with layer l zeroed) -
  L(theta)|`` on the request's forget data (every parameter of the block zeroed, norms included);
  only the top-k layers' attention and MLP parameters are updated (``--topk_for_forget 8`` of
  Llama-2-7B's 32 layers). Here: :func:`layer_attribution`, :func:`top_layers`, :func:`layer_mask`
  and :func:`layer_masked_updates`, a 0/1 rescaling of the update placed where the regulariser
  goes (before clipping: frozen entries contribute nothing to the clipped norm, as FIT's frozen
  parameters have no gradient). ``L`` is the mean answer-token NLL (:func:`~jaxunlearn.models.functional.answer_loss`).
- I (``Fit/algorithm.py``): the request's importance ``s = ||dL/de||_2`` (gradient of the LM loss
  with respect to the input embeddings) picks the unlearning objective: ``s >= 12`` NPO with a KL
  retain term, ``6 <= s < 12`` NPO, ``s < 6`` random labels. Choices made here
  (:func:`input_importance`): the apply functions of this library take token ids, so ``e`` is the
  embedding *table* (per-position gradients summed over positions holding the same token; equal to
  FIT's norm when no token repeats), and the loss is over answer tokens. The thresholds are FIT's
  for 7B models; they do not transfer to other scales, so selection is off by default
  (``select_algorithm``) and the score is reported either way. The random-label tier is GradDiff
  with ``gamma = 0`` whose retain set is the request with its answer tokens redrawn uniformly
  (:func:`random_label_rows`; FIT keeps the inputs and randomises only the labels, which the batch
  convention here, labels = shifted inputs, cannot express).
- F (filtering near-duplicate chunks of earlier requests by SimCSE similarity) needs a sentence
  encoder and is not implemented.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunlearn import tree as jt
from jaxunlearn.fisher import fisher_diagonal
from jaxunlearn.context import UnlearnContext, importance_batches, importance_loss
from jaxunlearn.models.functional import answer_loss
from jaxunlearn.models.scan import check_unrolled
from jaxunlearn.train import BATCH_KEYS
from jaxunlearn.validate import check_bool, check_choice, check_float, check_int

__all__ = ["CONTINUAL_KINDS", "FISHER_UPDATES", "FISHER_DATA", "FIT_THRESHOLDS", "FIT_TIERS", "ContinualConfig",
           "ContinualState", "FisherPenaltyState", "LayerMaskState", "init_continual_state", "fold_fisher",
           "fisher_penalty", "penalty_value", "request_fisher", "decoder_layer_part", "layer_attribution",
           "top_layers", "layer_mask", "layer_masked_updates", "input_importance", "select_tier", "tier_config",
           "random_label_rows", "parse_continual", "start_state", "plan_request", "finish_request"]

CONTINUAL_KINDS = ("lwf", "fit")
FISHER_UPDATES = ("mean", "decay")
FISHER_DATA = ("retain", "forget")
#: FIT's importance thresholds (``Fit/algorithm.py``: 6 and 12, for 7B models).
FIT_THRESHOLDS = (6.0, 12.0)
#: FIT's objectives by importance tier, lowest first: random labels, NPO, NPO + KL retain term.
FIT_TIERS = ("rl", "npo", "npo_kl")


@dataclasses.dataclass(frozen=True)
class ContinualConfig:
    """How a method carries importances across requests (validated at construction).

    Attributes:
      kind: ``"lwf"`` (Fisher-weighted anchor penalty) or ``"fit"`` (FIT's targeted layers).
      strength: ``lambda`` of ``lambda sum_i F_i (theta_i - theta*_i)^2`` (lwf; >= 0). Its scale
        follows the Fisher's (summed-NLL gradients of the model at hand); 1000 was chosen on the
        embedded benchmark's quick target (300 barely kept utility, 10^4 stopped forgetting;
        ``experiments/stream_notes.md``).
      fisher_data: what the Fisher is of: ``"retain"`` and/or ``"forget"`` (the request just done).
      fisher_update: ``"mean"`` (EWC) or ``"decay"`` (online EWC), see the module docstring.
      decay: ``gamma`` of ``"decay"`` (in [0, 1]; 0.9 is our choice, not a paper's).
      fisher_examples: examples per Fisher (a seeded subset; >= 1).
      fisher_batch_size: rows per Fisher batch (>= 1).
      top_k_layers: FIT's k (None: a quarter of the layers, FIT's 8 of 32, at least 1).
      select_algorithm: FIT's importance-tier choice of the objective (off: the method's own).
      thresholds: FIT's two importance thresholds (ascending).
    """

    kind: str = "lwf"
    strength: float = 1000.0
    fisher_data: tuple[str, ...] = ("retain",)
    fisher_update: str = "mean"
    decay: float = 0.9
    fisher_examples: int = 64
    fisher_batch_size: int = 16
    top_k_layers: int | None = None
    select_algorithm: bool = False
    thresholds: tuple[float, float] = FIT_THRESHOLDS

    def __post_init__(self):
        o = "ContinualConfig"
        check_choice(o, "kind", self.kind, CONTINUAL_KINDS)
        object.__setattr__(self, "strength", check_float(o, "strength", self.strength, min=0.0))
        data = (self.fisher_data,) if isinstance(self.fisher_data, str) else tuple(self.fisher_data)
        if not data or len(set(data)) != len(data):
            raise ValueError(f"{o}.fisher_data must name 'retain' and/or 'forget' once each, got {self.fisher_data!r}")
        for d in data:
            check_choice(o, "fisher_data", d, FISHER_DATA)
        object.__setattr__(self, "fisher_data", data)
        check_choice(o, "fisher_update", self.fisher_update, FISHER_UPDATES)
        g = check_float(o, "decay", self.decay, min=0.0)
        if g > 1.0:
            raise ValueError(f"{o}.decay must be in [0, 1], got {self.decay!r}")
        object.__setattr__(self, "decay", g)
        check_int(o, "fisher_examples", self.fisher_examples, min=1)
        check_int(o, "fisher_batch_size", self.fisher_batch_size, min=1)
        if self.top_k_layers is not None:
            check_int(o, "top_k_layers", self.top_k_layers, min=1)
        check_bool(o, "select_algorithm", self.select_algorithm)
        t = tuple(check_float(o, "thresholds", x) for x in self.thresholds)
        if len(t) != 2 or t[0] > t[1]:
            raise ValueError(f"{o}.thresholds must be two ascending numbers, got {self.thresholds!r}")
        object.__setattr__(self, "thresholds", t)


def parse_continual(spec: str | Mapping | ContinualConfig | None) -> ContinualConfig | None:
    """``"lwf"`` / ``"fit"`` / a dict of :class:`ContinualConfig` fields / a config -> the config;
    ``None`` or ``"none"`` -> None.

    Raises:
      ValueError: an unknown kind or field (named).
    """
    if spec is None or spec == "none":
        return None
    if isinstance(spec, ContinualConfig):
        return spec
    if isinstance(spec, str):
        if spec not in CONTINUAL_KINDS:
            raise ValueError(f"unknown continual method {spec!r}: one of {CONTINUAL_KINDS + ('none',)}")
        return ContinualConfig(kind=spec)
    if isinstance(spec, Mapping):
        fields = {f.name for f in dataclasses.fields(ContinualConfig)}
        unknown = sorted(set(spec) - fields)
        if unknown:
            raise ValueError(f"unknown ContinualConfig key(s) {unknown}; known: {sorted(fields)}")
        return ContinualConfig(**spec)
    raise TypeError(f"a continual config is 'lwf', 'fit', 'none', a dict or a ContinualConfig, got {spec!r}")


# ============================================================================ carried state

class ContinualState(NamedTuple):
    """What a stream carries between requests.

    Attributes:
      fisher: the running diagonal Fisher (float32 pytree like the params).
      anchor: the parameters after the last request (``theta*``).
      count: how many Fishers were folded in (int32 scalar).
    """

    fisher: Any
    anchor: Any
    count: jax.Array


def init_continual_state(params: Any) -> ContinualState:
    """An empty state: zero Fisher, anchor ``params``, count 0."""
    return ContinualState(jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params), params,
                          jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("rule",))
def _fold(fisher, new, count, decay, rule):
    if rule == "mean":
        k = (count + 1).astype(jnp.float32)
        return jax.tree.map(lambda f, n: f + (n.astype(jnp.float32) - f) / k, fisher, new)
    return jax.tree.map(lambda f, n: decay * f + n.astype(jnp.float32), fisher, new)


def fold_fisher(state: ContinualState, fisher: Any, anchor: Any, *, rule: str = "mean",
                decay: float = 0.9) -> ContinualState:
    """Fold a new Fisher into the running one and move the anchor.

    ``"mean"``: ``F <- F + (F_new - F) / (count + 1)`` (after ``r`` folds, the mean of the ``r``
    Fishers: EWC's per-task sum over ``r``); ``"decay"``: ``F <- decay F + F_new`` (online EWC,
    Schwarz et al., 2018). ``count`` grows by one; ``anchor`` replaces the old one.

    Raises:
      ValueError: an unknown rule, ``decay`` outside [0, 1], a Fisher or anchor whose structure or
        shapes differ from the state's (the leaf named).

    >>> s = init_continual_state({"w": jnp.zeros(2)})
    >>> s = fold_fisher(s, {"w": jnp.array([2.0, 4.0])}, {"w": jnp.ones(2)})
    >>> fold_fisher(s, {"w": jnp.array([4.0, 0.0])}, {"w": jnp.ones(2)}).fisher["w"].tolist()
    [3.0, 2.0]
    """
    check_choice("fold_fisher", "rule", rule, FISHER_UPDATES)
    g = check_float("fold_fisher", "decay", decay, min=0.0)
    if g > 1.0:
        raise ValueError(f"fold_fisher: decay must be in [0, 1], got {decay!r}")
    jt.check_same_shapes(state.fisher, fisher, ("state.fisher", "fisher"))
    jt.check_same_shapes(state.anchor, anchor, ("state.anchor", "anchor"))
    return ContinualState(_fold(state.fisher, fisher, state.count, jnp.float32(g), rule), anchor, state.count + 1)


def request_fisher(ctx: UnlearnContext, data: Mapping[str, np.ndarray], params: Any, *, max_examples: int = 64,
                   batch_size: int = 16, seed: int = 0) -> Any:
    """The diagonal Fisher ``(1/N) sum_n (grad l_n)^2`` of ``data`` at ``params``.

    ``l_n`` is :func:`jaxunlearn.methods.importance_loss` (the summed answer NLL; the fused Fisher
    for a decoder's :class:`~jaxunlearn.models.DecoderFn`), over a seeded subset of at most
    ``max_examples`` rows in batches of ``batch_size``
    (:func:`jaxunlearn.methods.importance_batches`), by :func:`jaxunlearn.fisher.fisher_diagonal`
    with ``ctx.fisher_kwargs`` (Kirkpatrick et al., 2017).
    """
    batches = importance_batches(data, batch_size, max_examples, seed)
    return fisher_diagonal(importance_loss(ctx), params, batches, **ctx.fisher_kwargs)


# ============================================================================ Fisher-weighted penalty

class FisherPenaltyState(NamedTuple):
    """State of :func:`fisher_penalty`: the Fisher ``F`` and the anchor ``theta*`` (arrays)."""

    fisher: Any
    anchor: Any


def penalty_value(params: Any, fisher: Any, anchor: Any, strength: float) -> jax.Array:
    """``strength * sum_i F_i (theta_i - theta*_i)^2`` in float32 (the term :func:`fisher_penalty` adds
    the gradient of)."""
    terms = jax.tree.map(lambda p, f, a: jnp.sum(f.astype(jnp.float32)
                                                 * jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32))),
                         params, fisher, anchor)
    return strength * jt.sum(terms)


def fisher_penalty(strength: float, fisher: Any, anchor: Any) -> optax.GradientTransformation:
    """Add the gradient of ``strength * sum_i F_i (theta_i - theta*_i)^2``: ``u <- u + 2 strength F (theta - theta*)``.

    The Fisher-weighted quadratic anchor of EWC (Kirkpatrick et al., 2017, whose ``lambda/2`` is
    ``strength``) as an additive gradient term, for
    :meth:`jaxunlearn.unlearn.UnlearnConfig.transform`'s ``regularizer`` slot. ``init`` puts
    copies of ``fisher`` and ``anchor`` into the state (checked against the parameters' structure
    and shapes; copies, as the unlearning step donates its state); ``update`` reads them from there and needs ``params``. Adds in float32, returns the
    updates' dtypes.

    Args:
      strength: ``lambda`` (>= 0).
      fisher: diagonal Fisher, a pytree like the parameters (>= 0).
      anchor: ``theta*``, a pytree like the parameters.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`FisherPenaltyState`.

    >>> tx = fisher_penalty(0.5, {"w": jnp.array([1.0, 2.0])}, {"w": jnp.zeros(2)})
    >>> p = {"w": jnp.array([1.0, 1.0])}
    >>> tx.update({"w": jnp.zeros(2)}, tx.init(p), p)[0]["w"].tolist()
    [1.0, 2.0]
    """
    strength = check_float("fisher_penalty", "strength", strength, min=0.0)
    jt.check_same_shapes(fisher, anchor, ("fisher", "anchor"))
    jt.check_nonnegative(fisher, "fisher")

    def init_fn(params):
        jt.check_same_shapes(params, fisher, ("params", "fisher"))
        # copies: the unlearning step donates its state, and the caller keeps its Fisher and anchor
        return FisherPenaltyState(jax.tree.map(lambda f: jnp.array(f, jnp.float32, copy=True), fisher),
                                  jax.tree.map(lambda a: jnp.array(a, copy=True), anchor))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("fisher_penalty needs the params: tx.update(updates, state, params)")
        out = jax.tree.map(lambda u, p, f, a: (jnp.asarray(u).astype(jnp.float32) + 2.0 * strength * f
                                               * (p.astype(jnp.float32) - a.astype(jnp.float32))
                                               ).astype(jnp.result_type(u)),
                           updates, params, state.fisher, state.anchor)
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


# ============================================================================ FIT: targeted layers

_LAYER = re.compile(r"^layers/(\d+)/([^/]+)")


def decoder_layer_part(path: str) -> tuple[int, str] | None:
    """``(layer index, part)`` of a decoder parameter path, None outside the blocks (embeddings,
    final norm, head).

    >>> decoder_layer_part("layers/3/mlp/up_proj/kernel"), decoder_layer_part("embed/embedding")
    ((3, 'mlp'), None)
    """
    m = _LAYER.match(path)
    return (int(m.group(1)), m.group(2)) if m else None


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _loss(apply_fn, params, batch):
    return answer_loss(apply_fn, params, batch)


def layer_attribution(apply_fn: Callable, params: Any, batch: Mapping[str, Any], *,
                      layer_part: Callable[[str], tuple[int, str] | None] = decoder_layer_part) -> dict[int, float]:
    """FIT's targeted layer attribution: ``{l: |L(theta^(-l)) - L(theta)|}`` for every layer ``l``.

    ``theta^(-l)`` is ``theta`` with every parameter of layer ``l`` set to zero (FIT's
    ``LayerAttributionSelector._mask_layers`` zeroes the whole block, norms included); ``L`` is the
    mean answer-token NLL of ``batch`` (:func:`~jaxunlearn.models.functional.answer_loss`). One
    compiled loss for all layers (the ablated parameters keep their shapes).

    Args:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits`` (hashable, e.g. a DecoderFn).
      params: the parameters.
      batch: the request's rows (``input_ids``, ``attention_mask``, ``loss_mask``).
      layer_part: ``path -> (layer, part) | None`` (:func:`decoder_layer_part`).

    Raises:
      ValueError: no parameter path belongs to a layer.

    References:
      Xu et al., "FIT: Defying Catastrophic Forgetting in Continual LLM Unlearning", 2026.
    """
    if layer_part is decoder_layer_part:
        check_unrolled(params, "layer_attribution")
    paths = [jt.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    layers = sorted({lp[0] for lp in map(layer_part, paths) if lp is not None})
    if not layers:
        raise ValueError("layer_attribution: no parameter path belongs to a layer (expected paths like "
                         f"'layers/0/mlp/...', got e.g. {paths[:3]})")
    b = {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}
    base = float(_loss(apply_fn, params, b))
    out = {}
    for layer in layers:
        ablated = jax.tree_util.tree_map_with_path(
            lambda p, x, _l=layer: jnp.zeros_like(x) if (layer_part(jt.path_str(p)) or (None,))[0] == _l else x,
            params)
        out[layer] = abs(float(_loss(apply_fn, ablated, b)) - base)
    return out


def top_layers(scores: Mapping[int, float], k: int | None = None) -> list[int]:
    """The ``k`` layers of highest attribution, sorted by index (ties: the lower index first);
    ``k=None``: a quarter of the layers (FIT's 8 of 32), at least 1.

    >>> top_layers({0: 0.1, 1: 0.5, 2: 0.5, 3: 0.0}, 2)
    [1, 2]
    """
    if not scores:
        raise ValueError("top_layers: no layer scores")
    k = max(1, round(len(scores) / 4)) if k is None else check_int("top_layers", "k", k, min=1)
    ranked = sorted(scores, key=lambda layer: (-scores[layer], layer))
    return sorted(ranked[:k])


def layer_mask(params: Any, layers: Sequence[int], *, parts: Sequence[str] = ("attn", "mlp"),
               layer_part: Callable[[str], tuple[int, str] | None] = decoder_layer_part) -> Any:
    """0/1 float32 pytree like ``params``: 1 on the ``parts`` of the chosen ``layers`` (FIT unfreezes
    ``layers.{i}.self_attn`` and ``layers.{i}.mlp``; norms, embeddings and head stay frozen).

    Raises:
      ValueError: the mask selects nothing.
    """
    if layer_part is decoder_layer_part:
        check_unrolled(params, "layer_mask")
    chosen, parts = set(int(x) for x in layers), set(parts)

    def one(path, x):
        lp = layer_part(jt.path_str(path))
        return jnp.full(jnp.shape(x), float(lp is not None and lp[0] in chosen and lp[1] in parts), jnp.float32)

    mask = jax.tree_util.tree_map_with_path(one, params)
    if not any(bool(jnp.any(m > 0)) for m in jax.tree.leaves(mask)):
        raise ValueError(f"layer_mask: layers {sorted(chosen)} with parts {sorted(parts)} select no parameter")
    return mask


class LayerMaskState(NamedTuple):
    """State of :func:`layer_masked_updates`: the 0/1 mask (arrays)."""

    mask: Any


def layer_masked_updates(mask: Any) -> optax.GradientTransformation:
    """``u <- where(m > 0, u, 0)``: updates only where the mask is set (FIT's targeted layers).

    The mask is put into the state at ``init`` (checked against the parameters) and read from it.
    In the regulariser slot of :meth:`jaxunlearn.unlearn.UnlearnConfig.transform` it masks the
    gradient before the optimizer: with AdamW's ``weight_decay > 0`` (0 in every shipped config) the
    decay would still move masked weights, which FIT's frozen parameters never are.

    >>> tx = layer_masked_updates({"w": jnp.array([1.0, 0.0])})
    >>> tx.update({"w": jnp.array([3.0, 4.0])}, tx.init({"w": jnp.zeros(2)}))[0]["w"].tolist()
    [3.0, 0.0]
    """
    jt.check_nonempty(mask, "mask")

    def init_fn(params):
        jt.check_same_shapes(params, mask, ("params", "mask"))
        return LayerMaskState(jax.tree.map(lambda m: jnp.array(m, jnp.float32, copy=True), mask))  # donated

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: jnp.where(m > 0, u, jnp.zeros_like(u)), updates, state.mask), state

    return optax.GradientTransformation(init_fn, update_fn)


# ============================================================================ FIT: importance tiers

@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _loss_grad(apply_fn, params, batch):
    return jax.grad(lambda p: answer_loss(apply_fn, p, batch))(params)


def input_importance(apply_fn: Callable, params: Any, batch: Mapping[str, Any], *,
                     embed_path: str = "embed/embedding") -> float:
    """FIT's request importance ``s = ||dL/dE||_2``: the gradient norm of the mean answer-token NLL
    with respect to the token embedding table ``embed_path`` (see the module docstring for how this
    differs from FIT's per-position input embeddings).

    Raises:
      KeyError: no leaf at ``embed_path`` (the paths present named).
    """
    leaves = dict(jt.leaves_with_paths(params))
    if embed_path not in leaves:
        raise KeyError(f"input_importance: no parameter at embed_path {embed_path!r} (have {sorted(leaves)[:8]} ...)")
    g = _loss_grad(apply_fn, params, {k: jnp.asarray(batch[k]) for k in BATCH_KEYS})
    return float(jt.global_norm(dict(jt.leaves_with_paths(g))[embed_path]))


def select_tier(score: float, thresholds: tuple[float, float] = FIT_THRESHOLDS) -> str:
    """FIT's objective for an importance score: ``"npo_kl"`` if ``s >= t1``, ``"npo"`` if
    ``t0 <= s < t1``, else ``"rl"`` (random labels).

    >>> [select_tier(s) for s in (3.0, 6.0, 12.0)]
    ['rl', 'npo', 'npo_kl']
    """
    t0, t1 = thresholds
    return "npo_kl" if score >= t1 else "npo" if score >= t0 else "rl"


def tier_config(cfg: Mapping[str, Any], tier: str) -> dict[str, Any]:
    """A gradient method config (JSON form) switched to FIT's objective of ``tier``, its other
    hyperparameters (steps, learning rate, batch sizes) kept: ``npo_kl`` NPO with the KL retain term
    (``alpha`` as configured), ``npo`` NPO alone (``alpha = 0``), ``rl`` descent on random labels
    (GradDiff with ``gamma = 0``, NLL retain term; pair with :func:`random_label_rows` as retain data).
    """
    check_choice("tier_config", "tier", tier, FIT_TIERS)
    out = {**cfg, "unlearn": dict(cfg["unlearn"])}
    u = out["unlearn"]
    if tier == "npo_kl":
        u.update(method="npo", retain_loss="kl")
    elif tier == "npo":
        u.update(method="npo", alpha=0.0)
    else:
        u.update(method="grad_diff", gamma=0.0, alpha=1.0, retain_loss="nll", project=False)
    return out


def random_label_rows(data: Mapping[str, np.ndarray], vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``data`` with every scored answer token (``loss_mask == 1``) redrawn uniformly from the
    vocabulary (FIT's random-label objective, ``Unlearning_algorithm/RL.py``)."""
    rng = np.random.default_rng(seed)
    ids = np.array(data["input_ids"], copy=True)
    scored = np.asarray(data["loss_mask"]) > 0
    ids[scored] = rng.integers(0, int(vocab_size), int(scored.sum()))
    return {**{k: np.asarray(v) for k, v in data.items()}, "input_ids": ids.astype(np.asarray(data["input_ids"]).dtype)}


# ============================================================================ the per-request protocol

def _fisher_of(ctx: UnlearnContext, c: ContinualConfig, params: Any, forget: Mapping | None, seed: int) -> Any:
    sets = [ctx.retain] if "retain" in c.fisher_data else []
    if "forget" in c.fisher_data and forget is not None:
        sets.append(forget)
    fishers = [request_fisher(ctx, d, params, max_examples=c.fisher_examples, batch_size=c.fisher_batch_size,
                              seed=seed) for d in sets]
    return jax.tree.map(lambda *fs: sum(fs) / len(fs), *fishers)


def start_state(ctx: UnlearnContext, c: ContinualConfig | None) -> ContinualState | None:
    """The state before the first request: for ``lwf`` the retain Fisher at the target folded in with
    the target as anchor (the first request is anchored too); None otherwise (or with only
    ``"forget"`` Fisher data: nothing is forgotten yet, the first request runs unanchored)."""
    if c is None or c.kind != "lwf":
        return None
    state = init_continual_state(ctx.params)
    if "retain" not in c.fisher_data:
        return state
    f = _fisher_of(ctx, dataclasses.replace(c, fisher_data=("retain",)), ctx.params, None, ctx.seed)
    return fold_fisher(state, f, ctx.params, rule=c.fisher_update, decay=c.decay)


def plan_request(ctx: UnlearnContext, cfg: Mapping[str, Any], c: ContinualConfig | None,
                 state: ContinualState | None) -> tuple[UnlearnContext, dict, Callable | None, dict]:
    """``(ctx, cfg, regularizer, info)`` of one request before it runs.

    ``lwf``: ``regularizer(start) = fisher_penalty(strength, state.fisher, state.anchor)`` (none
    while ``state.count == 0``). ``fit``: the top-k layers of :func:`layer_attribution` on the
    request's rows at ``ctx.params``, ``regularizer(start) = layer_masked_updates(mask)``; the
    importance score (:func:`input_importance`) is always computed, and with ``select_algorithm``
    the objective follows :func:`select_tier` (:func:`tier_config`; the ``rl`` tier replaces the
    retain data by :func:`random_label_rows` of the request). ``info`` records the choices.
    """
    info: dict[str, Any] = {}
    if c is None:
        return ctx, dict(cfg), None, info
    if c.kind == "lwf":
        if state is None or int(state.count) == 0:
            return ctx, dict(cfg), None, {"anchored": False}
        fisher, anchor = state.fisher, state.anchor
        info = {"anchored": True, "fisher_count": int(state.count),
                "fisher_mean": float(jt.sum(fisher) / max(jt.size(fisher), 1))}
        return ctx, dict(cfg), (lambda start: fisher_penalty(c.strength, fisher, anchor)), info
    forget = {k: ctx.forget[k] for k in BATCH_KEYS}
    scores = layer_attribution(ctx.apply_fn, ctx.params, forget)
    layers = top_layers(scores, c.top_k_layers)
    mask = layer_mask(ctx.params, layers)
    score = input_importance(ctx.apply_fn, ctx.params, forget)
    info = {"layer_scores": {str(k): v for k, v in scores.items()}, "layers": layers, "importance": score,
            "tier": select_tier(score, c.thresholds), "tier_applied": bool(c.select_algorithm)}
    if c.select_algorithm:
        cfg = tier_config(cfg, info["tier"])
        if info["tier"] == "rl":
            vocab = jax.eval_shape(ctx.apply_fn, ctx.params, jnp.asarray(forget["input_ids"][:1]),
                                   jnp.asarray(forget["attention_mask"][:1])).shape[-1]
            ctx = dataclasses.replace(ctx, retain=random_label_rows(ctx.forget, vocab, ctx.seed))
    return ctx, dict(cfg), (lambda start: layer_masked_updates(mask)), info


def finish_request(ctx: UnlearnContext, c: ContinualConfig | None, state: ContinualState | None,
                   new_params: Any) -> ContinualState | None:
    """The state after a request: for ``lwf`` the Fisher at ``new_params`` (of the retain data and/or
    the request's rows, ``fisher_data``) folded in, anchor ``new_params``; unchanged otherwise."""
    if c is None or c.kind != "lwf" or state is None:
        return state
    f = _fisher_of(ctx, c, new_params, ctx.forget, ctx.seed)
    return fold_fisher(state, f, new_params, rule=c.fisher_update, decay=c.decay)
