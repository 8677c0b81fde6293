"""REMIND: the loss over an input neighbourhood tells forgotten examples from retained or unseen ones.

Cohen, Nemcovesky and Mendelson (2025): after unlearning, the answer loss of a forgotten example
is *flat* over small variations of its input, while retained and never-seen examples sit in
sharper, more volatile input loss landscapes. REMIND ("Residual Memorization In Neighborhood
Dynamics") probes that landscape with queries only and classifies examples from its features.
For each example ``(x, y)`` (question ``x``, answer ``y``):

1. **Neighbourhood** (:func:`neighbourhood`). ``K`` variants ``x~_1 .. x~_K`` by the paper's
   *embedding-proximity perturbation*: each eligible token ``x_i`` is replaced, with probability
   ``p``, by its ``j``-th nearest neighbour ``x_i^(j)`` in the model's input-embedding space
   (cosine similarity, :func:`embedding_neighbours`). The answer is never perturbed.
2. **Landscape** (:func:`landscape_losses`). The mean answer NLL
   ``L_k = -(1/|y|) sum_t log p(y_t | x~_k, y_<t)`` of every variant, and ``L_0`` of the
   original: one (B, K + 1) array, the original first. The neighbourhood is an extra batch axis:
   ``B (K + 1)`` rows in one jitted forward pass.
3. **Features** (:func:`landscape_features`, names :data:`REMIND_FEATURES`), with ``s_k`` the
   strength (replacement probability) of variant ``k`` and ``s_0 = 0``:

   - ``loss`` = ``L_0``; ``mean`` = ``(1/K) sum_k L_k``; ``std`` = ``sqrt((1/K) sum_k (L_k - mean)^2)``;
   - ``min`` / ``max`` = ``min_k L_k`` / ``max_k L_k``;
   - ``mean_rise`` = ``mean - L_0`` (how much the neighbourhood raises the loss);
   - ``slope`` = the least-squares slope of ``L`` against ``s`` over the ``K + 1`` points
     ``(s_k, L_k)``, ``k = 0..K``: ``sum_k (s_k - s_bar)(L_k - L_bar) / sum_k (s_k - s_bar)^2``.

   A flat landscape has small ``std``, ``max - min``, ``mean_rise`` and ``slope``.
4. **Detector** (:func:`remind_auc`). An L2-regularised logistic regression on the standardised
   features, cross-validated over stratified folds (:func:`stratified_folds`), separates the
   forget examples (positives, label 1) from the others (retained or unseen, label 0); the score
   is the mean over folds of the held-out ROC-AUC (the Mann-Whitney statistic,
   :func:`jaxunlearn.eval.mia.roc_auc`). **1 = the forget examples are perfectly detectable from
   their landscape** (residual traces of unlearning, or of memorisation, remain); 0.5 = they look
   like the other examples. A cross-validated AUC under the null scatters around 0.5 (and a bit
   below with few examples): compare a method's AUC with the reference (retain-only) model's.

What the paper fixes and what is chosen here. The paper's full text and its reference code
(on anonymous.4open.science, not GitHub) could not be read; the abstracts and a third-party summary
of the method give the perturbation rule of step 1 (``K`` variants, each token replaced with a
probability by its ``j``-th cosine neighbour) and "features of the loss over the neighbourhood ->
classifier". Everything else is this implementation's choice:

- *Which tokens are perturbed*: the question, i.e. the real (``attention_mask`` 1) non-answer
  (``loss_mask`` 0) positions, never a padding, answer or special token (the ``special_ids`` of
  :func:`embedding_neighbours` are neither perturbed nor used as replacements; a ``perturb_mask`` in
  the batch narrows the positions, e.g. to a chat template's question text). The loss is the
  answer's, so all variants share their target.
- *Which neighbour*: ``j`` uniform in ``1 .. max_rank`` per replaced token (default 1: the nearest,
  self excluded; in the small BPE vocabularies of this library's benchmarks further ranks are
  rarely close).
- *Strength*: the replacement probability takes the levels ``strengths`` (default 0.1, 0.2, 0.3,
  0.4), ``K / len(strengths)`` variants each, so the landscape is also read as a function of the
  strength (``slope``). Default ``K = 16``.
- *Features and classifier*: the paper classifies landscape statistics; the seven above, a
  logistic regression (not a named model of the paper) and 5 folds are this implementation's.
  The later (ACL 2026) version of the paper reports a three-class (retained / forgotten / holdout)
  AUC; here the task is binary, forget versus everything else passed as ``other``.

Randomness: row ``r`` of a call draws from ``fold_in(key, row_offset + r)`` (split into one key
for the Bernoulli uniforms ``u`` (K, T) and one for the ranks ``j - 1`` (K, T)); position ``t``
of variant ``k`` is replaced iff it is eligible and ``u[k, t] < s_k``. A row's neighbourhood thus
depends on ``key`` and its index in the set only, not on the batch it was evaluated in.

Cost: ``K + 1`` forward passes of the padded length per example (17 by default), plus one chunked
``(V, V)`` similarity pass per neighbour table: compute it once and pass ``neighbours=`` to give
every compared model the same neighbourhoods.

References:
  Cohen, Nemcovesky, Mendelson, "REMIND: Input Loss Landscapes Reveal Residual Memorization in
  Post-Unlearning LLMs", arXiv:2511.04228, 2025 (ACL 2026 as "REMIND: Memorization and Unlearning in
  LLMs Through the Lens of Input Loss Landscapes").
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.eval.mia import roc_auc
from jaxunlearn.eval.runner import fixed_batches
from jaxunlearn.losses import mean_token_nll
from jaxunlearn.validate import check_float, check_int, is_concrete

__all__ = ["REMIND_FEATURES", "RemindConfig", "variant_strengths", "embedding_neighbours", "find_embedding",
           "eligible_positions", "neighbourhood", "landscape_losses", "landscape_features", "stratified_folds",
           "fit_logistic", "remind_auc", "remind_evaluate"]

#: Names of the landscape features, in the column order of :func:`landscape_features`.
REMIND_FEATURES: tuple[str, ...] = ("loss", "mean", "std", "min", "max", "mean_rise", "slope")

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")


@dataclasses.dataclass(frozen=True)
class RemindConfig:
    """The neighbourhood of :func:`neighbourhood` (defaults: this implementation's, module docstring).

    Attributes:
      num_variants: ``K``, perturbed variants per example (>= 1, a multiple of ``len(strengths)``).
      strengths: replacement probabilities, each in (0, 1]; variant ``k`` (0-based) has strength
        ``strengths[k * S // K]`` (``S = len(strengths)``): equal, consecutive blocks per level.
      max_rank: a replaced token becomes its ``j``-th nearest embedding neighbour, ``j`` uniform
        in ``1 .. max_rank`` (>= 1).
    """

    num_variants: int = 16
    strengths: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)
    max_rank: int = 1

    def __post_init__(self):
        o = "RemindConfig"
        k = check_int(o, "num_variants", self.num_variants, min=1)
        if isinstance(self.strengths, (str, bytes)) or not isinstance(self.strengths, Sequence) \
                or not self.strengths:
            raise TypeError(f"{o}.strengths must be a non-empty sequence of numbers, got {self.strengths!r}")
        levels = tuple(check_float(o, f"strengths[{i}]", s, min=0.0, min_exclusive=True)
                       for i, s in enumerate(self.strengths))
        if max(levels) > 1.0:
            raise ValueError(f"{o}.strengths must be probabilities in (0, 1], got {self.strengths!r}")
        if k % len(levels):
            raise ValueError(f"{o}.num_variants must be a multiple of len(strengths)={len(levels)}, got {k}")
        check_int(o, "max_rank", self.max_rank, min=1)
        object.__setattr__(self, "strengths", levels)


def variant_strengths(cfg: RemindConfig) -> np.ndarray:
    """The strength ``s_k`` of each variant, float64 (K,): ``strengths[k * S // K]``.

    >>> variant_strengths(RemindConfig(num_variants=4, strengths=(0.1, 0.3))).tolist()
    [0.1, 0.1, 0.3, 0.3]
    """
    if not isinstance(cfg, RemindConfig):
        raise TypeError(f"cfg must be a RemindConfig, got {type(cfg).__name__}")
    k, s = cfg.num_variants, len(cfg.strengths)
    return np.asarray([cfg.strengths[i * s // k] for i in range(k)], np.float64)


# ------------------------------------------------------------------------------------------ neighbours

@functools.partial(jax.jit, static_argnames=("max_rank",))
def _top_neighbours(rows: jax.Array, unit: jax.Array, row_ids: jax.Array, banned: jax.Array, *, max_rank: int):
    sims = rows @ unit.T                                            # (chunk, V) cosine similarities
    cols = jnp.arange(unit.shape[0])
    sims = jnp.where((cols[None, :] == row_ids[:, None]) | banned[None, :], -jnp.inf, sims)
    return jax.lax.top_k(sims, max_rank)[1].astype(jnp.int32)


def embedding_neighbours(embedding, max_rank: int = 1, *, special_ids: Sequence[int] = (),
                         chunk: int = 1024) -> np.ndarray:
    """The ``max_rank`` nearest neighbours of every token in the input-embedding space.

    ``out[v, j - 1]`` is the token of ``j``-th largest cosine similarity
    ``<e_v, e_u> / (|e_v| |e_u|)`` to token ``v`` over the tokens ``u != v`` that are not special
    (REMIND's embedding-proximity neighbours); special tokens' rows are ``-1`` (never perturbed).
    Norms floored at 1e-12; float32, ``chunk`` rows at a time (``jax.lax.top_k``: ties to the smaller id).

    Args:
      embedding: (V, H) input-embedding table (a Decoder's ``embed/embedding``, :func:`find_embedding`).
      max_rank: neighbours kept per token (>= 1, at most the number of non-special tokens - 1).
      special_ids: token ids never perturbed nor used as replacements (BOS, EOS, PAD, SEP,
        chat-template tokens: e.g. ``tokenizer.all_special_ids``).
      chunk: rows per similarity pass.

    Returns: int32 (V, max_rank).

    Raises:
      ValueError: ``embedding`` not 2-D or not finite, ``max_rank`` too large, a bad special id.
    """
    emb = np.asarray(embedding, np.float32)
    if emb.ndim != 2 or emb.shape[0] < 2 or emb.shape[1] < 1 or not np.isfinite(emb).all():
        raise ValueError(f"embedding must be a finite (vocab >= 2, hidden) table, got shape {emb.shape}")
    vocab = emb.shape[0]
    max_rank = check_int("embedding_neighbours", "max_rank", max_rank, min=1)
    chunk = min(check_int("embedding_neighbours", "chunk", chunk, min=1), vocab)
    if isinstance(special_ids, (str, bytes)) or not isinstance(special_ids, (Sequence, np.ndarray)):
        raise TypeError(f"special_ids must be a sequence of token ids, got {special_ids!r}")
    special = sorted({check_int("embedding_neighbours", f"special_ids[{i}]", t, min=0)
                      for i, t in enumerate(special_ids)})
    if special and special[-1] >= vocab:
        raise ValueError(f"special_ids holds {special[-1]}, outside the vocabulary of {vocab} tokens")
    if max_rank > vocab - len(special) - 1:
        raise ValueError(f"max_rank={max_rank} > the {vocab - len(special) - 1} candidate neighbours of a token "
                         f"({vocab} tokens, {len(special)} special)")
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    banned = np.zeros(vocab, bool)
    banned[special] = True
    unit_j, banned_j = jnp.asarray(unit), jnp.asarray(banned)
    out = np.empty((vocab, max_rank), np.int32)
    for start in range(0, vocab, chunk):
        ids = np.arange(start, min(start + chunk, vocab))
        rows = np.zeros((chunk, unit.shape[1]), np.float32)     # one shape: one compilation
        rows[: len(ids)] = unit[ids]
        pad_ids = np.full(chunk, -1, np.int32)
        pad_ids[: len(ids)] = ids
        out[ids] = np.asarray(_top_neighbours(jnp.asarray(rows), unit_j, jnp.asarray(pad_ids), banned_j,
                                              max_rank=max_rank))[: len(ids)]
    out[special] = -1
    return out


def find_embedding(params) -> jax.Array:
    """The input-embedding table in a parameter pytree: the one 2-D leaf whose path names
    ``embed`` (a :class:`~jaxunlearn.models.Decoder`'s ``['embed']['embedding']``).

    Raises:
      ValueError: no such leaf, or several (pass ``embedding=`` explicitly).
    """
    hits = [(jax.tree_util.keystr(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if "embed" in jax.tree_util.keystr(p).lower() and jnp.ndim(leaf) == 2]
    if len(hits) != 1:
        what = "no 2-D leaf" if not hits else f"{len(hits)} 2-D leaves ({', '.join(p for p, _ in hits)})"
        raise ValueError(f"params have {what} whose path names 'embed': pass embedding= (the (vocab, hidden) "
                         "input-embedding table) or neighbours=")
    return hits[0][1]


# ------------------------------------------------------------------------------------------ neighbourhood

def _check_batch(owner: str, batch: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        raise TypeError(f"{owner}: batch must be a mapping of arrays, got {type(batch).__name__}")
    for k in BATCH_KEYS:
        if k not in batch:
            raise KeyError(f"{owner}: batch lacks '{k}' (have {sorted(batch)})")
    names = BATCH_KEYS + (("perturb_mask",) if "perturb_mask" in batch else ())
    out = {k: batch[k] if isinstance(batch[k], jax.Array) else np.asarray(batch[k]) for k in names}
    shape = jnp.shape(out["input_ids"])
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 2:
        raise ValueError(f"{owner}: batch['input_ids'] must be (B >= 1, T >= 2), got shape {shape}")
    if not jnp.issubdtype(out["input_ids"].dtype, jnp.integer):
        raise TypeError(f"{owner}: batch['input_ids'] must hold integer token ids, got {out['input_ids'].dtype}")
    for k in names[1:]:
        if jnp.shape(out[k]) != shape:
            raise ValueError(f"{owner}: batch['{k}'] has shape {jnp.shape(out[k])}, input_ids {shape}")
    return out


def _check_neighbours(owner: str, neighbours, vocab_size: int | None, cfg: RemindConfig) -> jax.Array:
    """``neighbours`` as int32, checked against ``vocab_size`` (None: its own row count)."""
    if neighbours is None:
        raise ValueError(f"{owner}: neighbours is required (embedding_neighbours(embedding, cfg.max_rank, "
                         "special_ids=...))")
    shape = jnp.shape(neighbours)
    vocab_size = shape[0] if vocab_size is None and len(shape) == 2 else vocab_size
    if len(shape) != 2 or shape[0] != vocab_size or shape[1] < cfg.max_rank:
        raise ValueError(f"{owner}: neighbours must be (vocab_size{'' if vocab_size is None else '=' + str(vocab_size)}"
                         f", >= max_rank={cfg.max_rank}), got shape {shape}")
    if not jnp.issubdtype(jnp.asarray(neighbours).dtype, jnp.integer):
        raise TypeError(f"{owner}: neighbours must hold integer token ids, got {jnp.asarray(neighbours).dtype}")
    nb = np.asarray(neighbours) if is_concrete(neighbours) else None
    if nb is not None and (nb.min() < -1 or nb.max() >= vocab_size
                           or ((nb[:, 0] >= 0) & (nb[:, : cfg.max_rank] < 0).any(axis=1)).any()):
        raise ValueError(f"{owner}: neighbours must hold ids in [0, {vocab_size}), -1 only on whole rows "
                         f"(special tokens) of the first max_rank={cfg.max_rank} columns")
    return jnp.asarray(neighbours, jnp.int32)


def _check_ids(owner: str, ids, vocab_size: int) -> None:
    if is_concrete(ids) and ((a := np.asarray(ids)).min() < 0 or a.max() >= vocab_size):
        raise ValueError(f"{owner}: token ids must be in [0, vocab_size={vocab_size}), got [{a.min()}, {a.max()}]")


def eligible_positions(batch: Mapping[str, Any], neighbours) -> jax.Array:
    """Where REMIND may perturb: ``attention_mask > 0`` and ``loss_mask == 0`` (the question side
    of a real token), the token has neighbours (``neighbours[id, 0] >= 0``: not special), and
    ``perturb_mask > 0`` when the batch has one. Bool (..., T)."""
    ids = jnp.asarray(batch["input_ids"])
    ok = (jnp.asarray(batch["attention_mask"]) > 0) & (jnp.asarray(batch["loss_mask"]) == 0)
    ok = ok & (jnp.asarray(neighbours)[ids, 0] >= 0)
    if "perturb_mask" in batch:
        ok = ok & (jnp.asarray(batch["perturb_mask"]) > 0)
    return ok


@functools.partial(jax.jit, static_argnames=("cfg",))
def _perturb(key, batch, neighbours, row_offset, *, cfg: RemindConfig):
    ids = jnp.asarray(batch["input_ids"]).astype(jnp.int32)
    b, t = ids.shape
    k = cfg.num_variants
    probs = jnp.asarray(variant_strengths(cfg), jnp.float32)
    eligible = eligible_positions(batch, neighbours)

    def draws(r):
        ku, kj = jax.random.split(jax.random.fold_in(key, row_offset + r))
        return jax.random.uniform(ku, (k, t)), jax.random.randint(kj, (k, t), 0, cfg.max_rank)

    u, rank = jax.vmap(draws)(jnp.arange(b))                       # (B, K, T) each
    replaced = eligible[:, None, :] & (u < probs[None, :, None])
    swapped = neighbours[ids[:, None, :], rank]                     # (B, K, T)
    new = jnp.where(replaced, swapped, ids[:, None, :])
    out = {key_: jnp.broadcast_to(jnp.asarray(batch[key_])[:, None, :], (b, k, t))
           for key_ in ("attention_mask", "loss_mask")}
    out.update(input_ids=new, replaced=replaced)
    return out


def _check_key(owner: str, key, cfg) -> None:
    if not isinstance(cfg, RemindConfig):
        raise TypeError(f"{owner}: cfg must be a RemindConfig, got {type(cfg).__name__}")
    if isinstance(key, numbers.Number) or not hasattr(key, "dtype"):
        raise TypeError(f"{owner}: key must be a jax.random key (jax.random.key(seed)), got {key!r}")


def _prepare(owner: str, key, batch, cfg, neighbours, vocab_size: int | None):
    """Every check of a landscape call, before any work: ``(batch, neighbours as int32)``."""
    _check_key(owner, key, cfg)
    b = _check_batch(owner, batch)
    nb = _check_neighbours(owner, neighbours, vocab_size, cfg)
    _check_ids(owner, b["input_ids"], nb.shape[0])
    return b, nb


def neighbourhood(key, batch: Mapping[str, Any], cfg: RemindConfig, vocab_size: int, *, neighbours,
                  row_offset=0) -> dict[str, jax.Array]:
    """The ``K`` perturbed variants of every row (REMIND's embedding-proximity perturbation).

    ``out["input_ids"][b, k, t] = neighbours[x_t, j - 1]`` where ``replaced[b, k, t]``, else
    ``x_t``; ``replaced = eligible & (u < s_k)`` with :func:`eligible_positions`, ``s_k`` of
    :func:`variant_strengths` and the draws of the module docstring (row ``b`` from
    ``fold_in(key, row_offset + b)``). The masks are the row's, repeated ``K`` times. Jitted.

    Args:
      key: a ``jax.random`` key.
      batch: ``input_ids`` (B, T), ``attention_mask`` (B, T), ``loss_mask`` (B, T) (answer tokens
        1), optional ``perturb_mask`` (B, T).
      cfg: the neighbourhood.
      vocab_size: the vocabulary (``neighbours`` has one row per token).
      neighbours: int (vocab_size, >= max_rank) from :func:`embedding_neighbours` (-1 rows: special).
      row_offset: index of the batch's first row in its set (an int, may be traced).

    Returns:
      ``{"input_ids", "attention_mask", "loss_mask"}`` (B, K, T) and ``"replaced"`` bool (B, K, T).

    Raises: TypeError / ValueError / KeyError naming a bad config, key, batch key or shape,
      ``neighbours`` or token id, before any work.
    """
    vocab_size = check_int("neighbourhood", "vocab_size", vocab_size, min=2)
    b, nb = _prepare("neighbourhood", key, batch, cfg, neighbours, vocab_size)
    return _perturb(key, b, nb, jnp.asarray(row_offset, jnp.int32), cfg=cfg)


@functools.partial(jax.jit, static_argnames=("apply_fn", "cfg"))
def _landscape_pass(apply_fn, params, batch, key, neighbours, row_offset, *, cfg: RemindConfig):
    var = _perturb(key, batch, neighbours, row_offset, cfg=cfg)
    b, t = jnp.shape(batch["input_ids"])
    k1 = cfg.num_variants + 1

    def stack(name, dtype):
        orig = jnp.asarray(batch[name]).astype(dtype)[:, None, :]
        return jnp.concatenate([orig, var[name].astype(dtype)], axis=1).reshape(b * k1, t)

    ids = stack("input_ids", jnp.int32)
    attn = stack("attention_mask", jnp.asarray(batch["attention_mask"]).dtype)
    lm = stack("loss_mask", jnp.float32)
    return mean_token_nll(apply_fn(params, ids, attn), ids, lm).reshape(b, k1)


def landscape_losses(apply_fn: Callable, params, batch: Mapping[str, Any], key, cfg: RemindConfig, *,
                     neighbours, row_offset=0) -> jax.Array:
    """REMIND's input loss landscape: the mean answer NLL of the original row and its ``K`` variants.

    ``out[b, 0] = L_0`` (the batch row), ``out[b, k] = L_k`` (variant ``k - 1`` of
    :func:`neighbourhood`), ``L = -(1/|y|) sum_t log p(y_t | ...)`` over the ``loss_mask`` tokens
    (:func:`jaxunlearn.losses.mean_token_nll`). One jitted pass over ``B (K + 1)`` rows
    (``apply_fn`` and ``cfg`` static).

    Args:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits`` (hashable, e.g. a
        :class:`~jaxunlearn.models.DecoderFn`).
      params: its parameters.
      batch, key, cfg, neighbours, row_offset: as in :func:`neighbourhood`.

    Returns: float32 (B, K + 1).
    """
    b, nb = _prepare("landscape_losses", key, batch, cfg, neighbours, None)
    return _landscape_pass(apply_fn, params, b, key, nb, jnp.asarray(row_offset, jnp.int32), cfg=cfg)


def landscape_features(losses, strengths) -> jax.Array:
    """The landscape features :data:`REMIND_FEATURES` of each row (formulas in the module docstring).

    Args:
      losses: (B, K + 1) from :func:`landscape_losses` (original first).
      strengths: the ``K`` variant strengths (:func:`variant_strengths`), or the
        :class:`RemindConfig` that made ``losses``.

    Returns: float32 (B, 7), columns in the order of :data:`REMIND_FEATURES`.
    Raises: ValueError: ``losses`` not (B >= 1, K + 1 >= 2), ``strengths`` not (K,) positive.
    """
    if isinstance(strengths, RemindConfig):
        strengths = variant_strengths(strengths)
    losses = jnp.asarray(losses, jnp.float32)
    if losses.ndim != 2 or losses.shape[0] < 1 or losses.shape[1] < 2:
        raise ValueError(f"losses must be (B >= 1, K + 1 >= 2), got shape {losses.shape}")
    s = np.asarray(strengths, np.float64)
    if s.shape != (losses.shape[1] - 1,):
        raise ValueError(f"strengths must be ({losses.shape[1] - 1},) for losses {losses.shape}, got {s.shape}")
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"strengths must be finite and > 0, got {s.tolist()}")
    orig, var = losses[:, 0], losses[:, 1:]
    mean = jnp.mean(var, axis=1)
    std = jnp.sqrt(jnp.mean(jnp.square(var - mean[:, None]), axis=1))
    x = np.concatenate([[0.0], s])
    xc = jnp.asarray((x - x.mean()) / np.sum((x - x.mean()) ** 2), jnp.float32)
    slope = (losses - jnp.mean(losses, axis=1, keepdims=True)) @ xc
    return jnp.stack([orig, mean, std, jnp.min(var, axis=1), jnp.max(var, axis=1), mean - orig, slope], axis=1)


# ------------------------------------------------------------------------------------------ detector

def stratified_folds(labels, folds: int, seed: int = 0) -> np.ndarray:
    """Fold of each example, balanced per class: for each class in increasing label order, its
    examples in the order of ``np.random.default_rng(seed).permutation`` get folds ``0, 1, ..,
    folds - 1, 0, 1, ..`` (one generator for all classes). int64 (N,).

    Raises:
      ValueError: a class with fewer than ``folds`` examples, ``folds < 2``.
    """
    folds = check_int("stratified_folds", "folds", folds, min=2)
    seed = check_int("stratified_folds", "seed", seed, min=0)
    y = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    out = np.empty(y.size, np.int64)
    for c in np.unique(y):
        idx = np.nonzero(y == c)[0]
        if idx.size < folds:
            raise ValueError(f"class {c!r} has {idx.size} example(s) < folds={folds}")
        out[rng.permutation(idx)] = np.arange(idx.size) % folds
    return out


def fit_logistic(x, y, *, l2: float = 1.0, max_iter: int = 100, tol: float = 1e-10) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method (float64, backtracking line search).

    Minimises ``sum_i [log(1 + exp(z_i)) - y_i z_i] + (l2 / 2) |w|^2`` with ``z = x w + b``
    (the intercept ``b`` unpenalised): scikit-learn's ``LogisticRegression(C=1 / l2)``. Stops when
    the Newton decrement squared is below ``tol``.

    Args: ``x`` (N, F) features, ``y`` (N,) labels in {0, 1}, ``l2`` the penalty (> 0).
    Returns: ``(w (F,), b)``.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.size or y.size == 0:
        raise ValueError(f"fit_logistic: x must be (N, F) with N = len(y) >= 1, got {x.shape} and {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("fit_logistic: y must hold 0/1 labels")
    l2 = check_float("fit_logistic", "l2", l2, min=0.0, min_exclusive=True)
    a = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)       # last column: the intercept
    reg = np.r_[np.full(x.shape[1], l2), 0.0]

    def objective(th):
        z = a @ th
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * (reg * th) @ th)

    theta = np.zeros(a.shape[1])
    f = objective(theta)
    for _ in range(max_iter):
        p = 0.5 * (1.0 + np.tanh(0.5 * (a @ theta)))                # sigmoid, overflow-free
        grad = a.T @ (p - y) + reg * theta
        hess = (a * (p * (1.0 - p))[:, None]).T @ a + np.diag(reg) + 1e-12 * np.eye(a.shape[1])
        step = np.linalg.solve(hess, grad)
        if grad @ step < tol:
            break
        t = 1.0
        while (f_new := objective(theta - t * step)) > f - 0.25 * t * (grad @ step) and t > 1e-12:
            t *= 0.5
        theta, f = theta - t * step, f_new
    return theta[:-1], float(theta[-1])


def _features(name: str, x) -> np.ndarray:
    a = np.asarray(x, np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (N, F) array of features, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf at rows {np.nonzero(~np.isfinite(a).all(1))[0][:10].tolist()}")
    return a


def remind_auc(features_pos, features_neg, *, seed: int = 0, folds: int = 5, l2: float = 1.0) -> float:
    """REMIND's detector: cross-validated held-out ROC-AUC of forget (positive) vs other examples.

    For each of the ``folds`` stratified folds (:func:`stratified_folds` on the labels, positives
    1 and negatives 0, with ``seed``): standardise the features with the training part's mean and
    standard deviation (a constant feature: deviation 1), fit :func:`fit_logistic`, score the
    held-out part by ``z = x w + b`` and take :func:`jaxunlearn.eval.mia.roc_auc` of its
    positives' vs negatives' scores. Returns the mean of the fold AUCs.

    Args:
      features_pos: (n_pos, F) landscape features of the forget examples.
      features_neg: (n_neg, F) of the retained / unseen examples.
      seed: the fold assignment.
      folds: number of folds (>= 2; each class needs at least as many examples).
      l2: the logistic regression's penalty (scikit-learn ``C = 1 / l2``).

    Returns: a float in [0, 1]: 1 = perfectly separable, 0.5 = no better than chance.

    Raises:
      ValueError: an empty, non-2-D or non-finite feature array (named), different feature counts,
      a class smaller than ``folds``.
    """
    pos = _features("features_pos", features_pos)
    neg = _features("features_neg", features_neg)
    if pos.shape[1] != neg.shape[1]:
        raise ValueError(f"features_pos has {pos.shape[1]} features, features_neg {neg.shape[1]}")
    folds = check_int("remind_auc", "folds", folds, min=2)
    for name, a in (("features_pos", pos), ("features_neg", neg)):
        if a.shape[0] < folds:
            raise ValueError(f"{name} has {a.shape[0]} example(s) < folds={folds}")
    x = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    fold = stratified_folds(y, folds, seed)
    aucs = []
    for f in range(folds):
        train, test = fold != f, fold == f
        mu, sd = x[train].mean(0), np.where(x[train].std(0) > 0, x[train].std(0), 1.0)
        w, b = fit_logistic((x[train] - mu) / sd, y[train], l2=l2)
        z = ((x[test] - mu) / sd) @ w + b
        aucs.append(roc_auc(z[y[test] == 1], z[y[test] == 0]))
    return float(np.mean(aucs))


def _landscape_of_set(apply_fn, params, data, key, cfg, neighbours, batch_size) -> np.ndarray:
    keys = [k for k in (*BATCH_KEYS, "perturb_mask") if k in data]
    parts = []
    for i, (batch, n_valid) in enumerate(fixed_batches(data, batch_size, keys)):
        losses = landscape_losses(apply_fn, params, batch, key, cfg, neighbours=neighbours,
                                  row_offset=i * batch_size)
        parts.append(np.asarray(losses)[:n_valid])
    return np.concatenate(parts)


def remind_evaluate(apply_fn: Callable, params, encoded_forget: Mapping[str, np.ndarray],
                    encoded_other: Mapping[str, np.ndarray], *, key, cfg: RemindConfig | None = None,
                    batch_size: int = 8, neighbours=None, embedding=None, special_ids: Sequence[int] = (),
                    folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """REMIND end to end: landscapes of both sets, their features, the detector's AUC.

    The forget set's landscapes use ``fold_in(key, 0)``, the other set's ``fold_in(key, 1)``
    (row ``r`` of a set: ``fold_in(fold_in(key, side), r)``, whatever ``batch_size``).

    Args:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits`` (hashable).
      params: the evaluated model's parameters.
      encoded_forget: the forget examples: ``input_ids``, ``attention_mask``, ``loss_mask``
        (N, T) numpy arrays (optional ``perturb_mask``), e.g. an ``EvalSplit.answer``.
      encoded_other: the retained / unseen examples, same keys (any length T).
      key: a ``jax.random`` key.
      cfg: the neighbourhood (default :class:`RemindConfig`).
      batch_size: examples per jitted pass (``batch_size * (K + 1)`` rows).
      neighbours: a table of :func:`embedding_neighbours`; computed here from ``embedding`` (or
        :func:`find_embedding` of ``params``) and ``special_ids`` when None. Pass the same table
        to compare models on the same neighbourhoods.
      embedding: the (V, H) input-embedding table, when ``neighbours`` is None.
      special_ids: token ids never perturbed (e.g. ``tokenizer.all_special_ids``), when
        ``neighbours`` is None.
      folds, seed: of :func:`remind_auc`.

    Returns:
      ``{"auc": float, "features": list of names, "n_pos": int, "n_neg": int,
      "feature_means": {"forget": {name: mean}, "other": {name: mean}},
      "forward_passes_per_example": K + 1}``.

    Raises: KeyError / ValueError / TypeError naming a bad set or argument, before any forward pass.
    """
    owner = "remind_evaluate"
    cfg = RemindConfig() if cfg is None else cfg
    _check_key(owner, key, cfg)
    batch_size = check_int(owner, "batch_size", batch_size, min=1)
    folds = check_int(owner, "folds", folds, min=2)
    sets = {"encoded_forget": encoded_forget, "encoded_other": encoded_other}
    for name, data in sets.items():
        n = len(_check_batch(f"{owner}: {name}", data)["input_ids"])
        if n < folds:
            raise ValueError(f"{owner}: {name} has {n} example(s) < folds={folds}")
    if neighbours is None:
        emb = find_embedding(params) if embedding is None else embedding
        neighbours = embedding_neighbours(emb, cfg.max_rank, special_ids=special_ids)
    neighbours = _check_neighbours(owner, neighbours, None, cfg)
    for name, data in sets.items():
        _check_ids(f"{owner}: {name}", data["input_ids"], neighbours.shape[0])
    feats = {}
    for side, (name, data) in enumerate(sets.items()):
        losses = _landscape_of_set(apply_fn, params, data, jax.random.fold_in(key, side), cfg,
                                   neighbours, batch_size)
        feats[name] = np.asarray(landscape_features(losses, cfg), np.float64)
    pos, neg = feats["encoded_forget"], feats["encoded_other"]
    return {"auc": remind_auc(pos, neg, seed=seed, folds=folds), "features": list(REMIND_FEATURES),
            "n_pos": int(len(pos)), "n_neg": int(len(neg)),
            "feature_means": {side: dict(zip(REMIND_FEATURES, np.mean(f, axis=0).tolist()))
                              for side, f in (("forget", pos), ("other", neg))},
            "forward_passes_per_example": cfg.num_variants + 1}
