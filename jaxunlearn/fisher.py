"""Diagonal Fisher information and gradient-based importances of parameters.

Notation: ``l_n(theta)`` is the loss of example ``n`` (its summed token NLL, see
:mod:`jaxunlearn.losses`), ``g_n = grad l_n`` its gradient, ``w_n >= 0`` its
weight (1 unless the batch carries ``"example_weight"``), ``W = sum_n w_n``.

- :func:`fisher_diagonal`: ``F = (1/W) sum_n w_n g_n**2`` (elementwise), the
  diagonal of the empirical Fisher (data labels) or of the true Fisher (labels
  sampled from the model).
- :func:`mean_grad`: ``g_bar = (1/W) sum_n w_n g_n``, one batch gradient per batch.
- :func:`grad_importance`: ``g_bar**2``, ``|g_bar|``, ``|W g_bar|`` (SalUn) or the
  per-example ``(1/W) sum_n w_n |g_n|``.
- :func:`per_example_grads`: the stacked ``g_n`` of one batch.

Batches. ``batches`` is an iterable of batches: dicts (or any pytrees) of arrays sharing
a leading batch axis, all with the same keys, sizes free. ``loss_fn(params, example)`` sees
one example (the batch axis removed). An ``"example_weight"`` key (``(B,)``, ``>= 0``, e.g.
a 0/1 mask of padded rows) is removed from the examples and weights them; rows of weight 0
never contribute, even if their loss is not finite.

Each estimator supplies only its *local sums* (:class:`PerExampleSums`, :class:`GradSums`)
to the batch-reduction engine :mod:`jaxunlearn.reduction`, which validates and places the
batches, runs one jitted accumulate step per batch (the local sums, holding ``loss_fn``, are
its static argument: equal loss objects share the compiled code) and, with ``mesh=`` or
params / a first batch placed on a mesh, makes the run data-parallel (``shard_map`` over the
data axes, parameters gathered, never per-example gradients; results with the params'
shardings; per-example keys depend on the global row only). Per-example gradients are
``vmap(grad(loss_fn))`` over chunks of ``chunk_size`` examples summed by a ``lax.scan``, so
at most ``chunk_size`` gradients are alive at once. Sums are float32 whatever the parameter
dtype (a bfloat16 Fisher loses most small entries; cast the result if you need to).

Fused Fisher (a protocol). A loss object may offer its own Fisher sums, a method
``fisher_sums(sample_fn=None)`` returning local sums (:class:`FusedFisherLoss`). With
``method="auto"`` (the default) :func:`fisher_diagonal` uses them when offered, ``"fused"``
requires them, ``"vmap"`` ignores them. The decoder loss ``fn.example_nll`` of
``fn, params = jaxunlearn.models.DecoderFn.of(model)`` offers the fused Fisher of
:mod:`jaxunlearn.fisher_fused` (one forward and backward pass per batch, dense layers by the
``jaxunlearn.kernels.fisher`` kernel); this module never names a model.

References:
  Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", 2017
  (diagonal Fisher as importance). Kunstner, Hennig, Balles, "Limitations of the
  empirical Fisher approximation for natural gradient descent", 2019 (empirical vs
  true Fisher). Fan et al., "SalUn: Empowering machine unlearning via gradient-based
  weight saliency", 2024.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Literal, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxunlearn import reduction as rd
from jaxunlearn import tree as jt

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]
SampleFn = Callable[[PyTree, PyTree, jax.Array], PyTree]

__all__ = [
    "WEIGHT_KEY",
    "FusedFisherLoss",
    "PerExampleSums",
    "GradSums",
    "fisher_local_sums",
    "fisher_diagonal",
    "grad_importance",
    "mean_grad",
    "per_example_grads",
    "sample_labels_fn",
]

WEIGHT_KEY = rd.WEIGHT_KEY
_LABELS = ("empirical", "sampled")
_METHODS = ("vmap", "auto", "fused")
_KINDS = ("squared_mean", "abs_mean", "abs_sum", "mean_abs")
_REDUCE = {"square": jnp.square, "abs": jnp.abs}


@runtime_checkable
class FusedFisherLoss(Protocol):
    """A per-example loss that offers its own Fisher sums (used by :func:`fisher_diagonal`).

    ``loss(params, example) -> l_n`` as any ``loss_fn``; ``loss.fisher_sums(sample_fn)``
    returns a :class:`jaxunlearn.reduction.LocalSums` computing ``(sum_n w_n (grad l_n)**2,
    sum_n w_n)`` over the rows it is given (first drawing each row's labels with
    ``sample_fn(params, example, key)`` when given), equal to :class:`PerExampleSums` of the
    loss up to round-off.
    """

    def __call__(self, params: PyTree, example: PyTree) -> jax.Array: ...

    def fisher_sums(self, sample_fn: SampleFn | None = None) -> rd.LocalSums: ...


# ---------------------------------------------------------------- local sums


@dataclasses.dataclass(frozen=True)
class PerExampleSums:
    """Local sums ``(sum_n w_n r(g_n), sum_n w_n)`` of per-example gradients, ``r`` = square or abs.

    ``g_n = grad loss_fn(params, x_n)``, by ``vmap(grad)`` over chunks of ``chunk_size`` rows
    summed by a ``lax.scan``; with ``sample_fn`` each row is first replaced by
    ``sample_fn(params, x_n, key_n)`` (no gradient through the sampling). Rows of weight 0
    never contribute. A :class:`jaxunlearn.reduction.LocalSums`.

    Attributes:
      loss_fn: ``loss_fn(params, example) -> scalar``.
      sample_fn: label sampler (true Fisher) or None.
      chunk_size: rows per ``vmap`` chunk.
      reduce: ``"square"`` (Fisher) or ``"abs"`` (mean absolute gradient).
    """

    loss_fn: LossFn
    sample_fn: SampleFn | None = None
    chunk_size: int = 8
    reduce: str = "square"

    def __call__(self, params: PyTree, data: Mapping[str, Any]) -> tuple[PyTree, jax.Array]:
        red = _REDUCE[self.reduce]
        sample_fn, loss_fn = self.sample_fn, self.loss_fn

        def one_grad(example, key):
            if sample_fn is not None:
                example = sample_fn(params, example, key)
            return jax.grad(loss_fn)(params, example)

        def body(carry, chunk):
            keys = chunk["key"] if sample_fn is not None else None
            grads = jax.vmap(one_grad, in_axes=(0, None if keys is None else 0))(chunk["ex"], keys)
            w = chunk["w"]

            def add(c, g):
                v = red(g.astype(jnp.float32))
                wb = w.reshape((-1,) + (1,) * (v.ndim - 1))
                return c + jnp.sum(jnp.where(wb > 0, wb * v, 0.0), axis=0)

            return jax.tree.map(add, carry, grads)

        acc = rd.scan_chunks(body, jt.zeros_like(params, dtype=jnp.float32), data, self.chunk_size)
        return acc, jnp.sum(data["w"])


@dataclasses.dataclass(frozen=True)
class GradSums:
    """Local sums ``(grad sum_n w_n l_n, sum_n w_n)``: one batch gradient, no per-example gradients.

    Rows of weight 0 are replaced by a row of positive weight before the forward pass (so
    padding never produces NaN); a data shard of padding only contributes zeros. A
    :class:`jaxunlearn.reduction.LocalSums`.

    Attributes:
      loss_fn: ``loss_fn(params, example) -> scalar``.
    """

    loss_fn: LossFn

    def __call__(self, params: PyTree, data: Mapping[str, Any]) -> tuple[PyTree, jax.Array]:
        weight = data["w"]
        examples = rd.valid_rows(data["ex"], weight)
        wsum = jnp.sum(weight)

        def total_loss(p):
            losses = jax.vmap(self.loss_fn, in_axes=(None, 0))(p, examples).astype(jnp.float32)
            return jnp.sum(weight * losses)

        g = jax.grad(total_loss)(params)
        return jax.tree.map(lambda x: jnp.where(wsum > 0, x.astype(jnp.float32), 0.0), g), wsum


def fisher_local_sums(
    loss_fn: LossFn,
    *,
    method: Literal["vmap", "auto", "fused"] = "auto",
    chunk_size: int = 8,
    sample_fn: SampleFn | None = None,
) -> rd.LocalSums:
    """The local sums :func:`fisher_diagonal` runs for ``loss_fn``: the fused ones if the loss offers them.

    ``"auto"``: ``loss_fn.fisher_sums(sample_fn)`` when ``loss_fn`` is a :class:`FusedFisherLoss`,
    else :class:`PerExampleSums` ``(loss_fn, sample_fn, chunk_size)``; ``"fused"``: the former or
    an error; ``"vmap"``: the latter.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``.
      method: ``"auto"``, ``"fused"`` or ``"vmap"``.
      chunk_size: examples per ``vmap`` chunk (vmap path).
      sample_fn: label sampler (``labels="sampled"``), or None.

    Returns:
      A :class:`jaxunlearn.reduction.LocalSums` (for :func:`jaxunlearn.reduction.accumulate`).

    Raises:
      ValueError: unknown ``method``, bad ``chunk_size``.
      NotImplementedError: ``method="fused"`` for a loss that offers no fused sums.

    Example:
      >>> loss = lambda p, ex: p["w"] * ex["x"]
      >>> fisher_local_sums(loss, chunk_size=4).chunk_size  # a plain function: the vmap path
      4
    """
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {_METHODS}")
    rd.check_chunk_size(chunk_size)
    if method != "vmap" and isinstance(loss_fn, FusedFisherLoss):
        return loss_fn.fisher_sums(sample_fn)
    if method == "fused":
        raise NotImplementedError(
            "fisher_diagonal(method='fused') needs a loss that offers fused Fisher sums (a `fisher_sums` "
            "method), such as the decoder loss `fn.example_nll` of `fn, params = "
            "jaxunlearn.models.DecoderFn.of(model)`; use method='vmap' for any other loss")
    return PerExampleSums(loss_fn, sample_fn, int(chunk_size), "square")


def _check_labels(name: str, labels: str, rng: Any, sample_fn: Any) -> bool:
    """Validate the label options; True for ``labels="sampled"``."""
    if labels not in _LABELS:
        raise ValueError(f"unknown labels {labels!r}; expected one of {_LABELS}")
    if labels == "sampled":
        if rng is None:
            raise ValueError(f"{name}(labels='sampled') needs an `rng` key")
        if sample_fn is None:
            raise ValueError(f"{name}(labels='sampled') needs `sample_fn(params, example, key)`; "
                             "see sample_labels_fn")
        return True
    if sample_fn is not None:
        raise ValueError("sample_fn is only used with labels='sampled'")
    return False


# ---------------------------------------------------------------- public API


def fisher_diagonal(
    loss_fn: LossFn,
    params: PyTree,
    batches: Iterable[PyTree],
    *,
    chunk_size: int = 8,
    labels: Literal["empirical", "sampled"] = "empirical",
    rng: jax.Array | None = None,
    sample_fn: SampleFn | None = None,
    method: Literal["vmap", "auto", "fused"] = "auto",
    check_finite: bool = True,
    mesh: Mesh | None = None,
) -> PyTree:
    """Diagonal Fisher information: the mean over examples of squared per-example gradients.

    ``F_i = (1/W) sum_n w_n (d l_n / d theta_i)**2`` with ``W = sum_n w_n`` (``w_n = 1``
    unless a batch carries ``"example_weight"``, see the module docstring).

    With ``labels="empirical"`` the targets are the data's (empirical Fisher). With
    ``labels="sampled"`` (true Fisher) each example is first passed through
    ``sample_fn(params, example, key) -> example``, which must return the example
    with its targets replaced by a draw from the model (for the batch convention of
    :mod:`jaxunlearn.losses`, build it with :func:`sample_labels_fn`); the gradient
    does not flow through the sampling. Example ``n`` of batch ``b`` gets the key
    ``fold_in(fold_in(rng, b), n)``, so results do not depend on ``chunk_size``.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, one example's summed NLL; for a
        decoder, ``fn.example_nll`` of ``fn, params = jaxunlearn.models.DecoderFn.of(model)``
        (which offers the fused path).
      params: pytree of floating-point arrays (a dict, an ``nnx.State``, ...).
      batches: iterable of batches (dicts of arrays with a leading batch axis).
      chunk_size: examples per ``vmap`` chunk; at most this many gradients are alive.
        Need not divide the batch size.
      labels: ``"empirical"`` or ``"sampled"``.
      rng: PRNG key, required with ``labels="sampled"``.
      sample_fn: label sampler, required with ``labels="sampled"``.
      method: ``"vmap"`` (chunked per-example gradients, any ``loss_fn``); ``"fused"``
        (the loss object's own sums, :class:`FusedFisherLoss`: for the decoder loss one
        forward/backward pass per batch with the dense-layer Fisher kernel, ignoring
        ``chunk_size``); ``"auto"``: ``"fused"`` when the loss offers it, ``"vmap"`` otherwise.
      check_finite: raise ``FloatingPointError`` naming the first leaf with NaN/Inf.
      mesh: run data-parallel on this ``jax.sharding.Mesh`` (:mod:`jaxunlearn.reduction`);
        ``None``: the mesh the params (else the first batch) are
        sharded on, unsharded if they are not.

    Returns:
      A pytree like ``params`` with float32 leaves; with a mesh, each leaf has its
      parameter's ``NamedSharding`` (replicated for params not placed on the mesh).

    Raises:
      ValueError: empty ``batches``, batches with different keys or inconsistent batch
        sizes, zero total weight, unknown ``labels``/``method``, missing ``rng``/``sample_fn``,
        params sharded on a mesh other than ``mesh``.
      TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
      NotImplementedError: ``method="fused"`` with a loss that offers no fused sums.
      FloatingPointError: NaN or Inf in the result (names the leaf path).

    References:
      Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", 2017.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda p, ex: 0.5 * jnp.sum((p["w"] * ex["x"] - ex["y"]) ** 2)
      >>> batch = {"x": jnp.array([1.0, 2.0]), "y": jnp.array([0.0, 0.0])}
      >>> fisher_diagonal(loss, {"w": jnp.array(1.0)}, [batch])["w"]  # (1 + 16) / 2
      Array(8.5, dtype=float32)
    """
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {_METHODS}")
    sampled = _check_labels("fisher_diagonal", labels, rng, sample_fn)
    local = fisher_local_sums(loss_fn, method=method, chunk_size=chunk_size,
                              sample_fn=sample_fn if sampled else None)
    rd.check_params(params, "fisher_diagonal")
    acc, total = rd.reduce_batches(local, params, batches, name="fisher_diagonal", rng=rng if sampled else None,
                                   mesh=mesh)
    return rd.finish(acc, total, "fisher_diagonal", check_finite)


def mean_grad(
    loss_fn: LossFn,
    params: PyTree,
    batches: Iterable[PyTree],
    *,
    check_finite: bool = True,
    mesh: Mesh | None = None,
) -> PyTree:
    """Weighted mean gradient over all examples of all batches.

    ``g_bar = (1/W) sum_n w_n grad l_n``, computed as one gradient of the batch loss
    ``sum_n w_n l_n`` per batch (no per-example gradients, :class:`GradSums`). Rows of
    weight 0 are replaced by a row of positive weight before the forward pass, so
    padding never produces NaN.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``.
      params: pytree of floating-point arrays.
      batches: iterable of batches (see the module docstring).
      check_finite: raise ``FloatingPointError`` naming the first leaf with NaN/Inf.
      mesh: data-parallel mesh, as in :func:`fisher_diagonal` (each data shard takes the
        gradient of its rows; the sums are reduced across shards).

    Returns:
      A pytree like ``params`` with float32 leaves (with the params' shardings on a mesh).

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p, ex: p["w"] * ex["x"]
      >>> mean_grad(loss, {"w": jnp.float32(3.0)}, [{"x": jnp.array([1.0, 2.0])}])["w"]
      Array(1.5, dtype=float32)
    """
    rd.check_params(params, "mean_grad")
    acc, total = rd.reduce_batches(GradSums(loss_fn), params, batches, name="mean_grad", mesh=mesh)
    return rd.finish(acc, total, "mean_grad", check_finite)


def grad_importance(
    loss_fn: LossFn,
    params: PyTree,
    batches: Iterable[PyTree],
    *,
    kind: Literal["squared_mean", "abs_mean", "abs_sum", "mean_abs"] = "squared_mean",
    chunk_size: int = 8,
    check_finite: bool = True,
    mesh: Mesh | None = None,
) -> PyTree:
    """Gradient-based parameter importance (PerTA-grad, SalUn saliency).

    With ``g_bar = (1/W) sum_n w_n grad l_n`` (:func:`mean_grad`):

    - ``"squared_mean"``: ``g_bar**2`` (PerTA-grad, squared mean gradient);
    - ``"abs_mean"``: ``|g_bar|`` (PerTA-grad, magnitude of the mean gradient);
    - ``"abs_sum"``: ``|sum_n w_n grad l_n| = W |g_bar|`` (SalUn weight saliency);
    - ``"mean_abs"``: ``(1/W) sum_n w_n |grad l_n|``, the mean of per-example absolute
      gradients (per-example work, chunked like :func:`fisher_diagonal`).

    The first three need one batch gradient per batch only.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``.
      params: pytree of floating-point arrays.
      batches: iterable of batches (see the module docstring).
      kind: one of the formulas above.
      chunk_size: chunk size of the per-example path (``"mean_abs"`` only).
      check_finite: raise ``FloatingPointError`` naming the first leaf with NaN/Inf.
      mesh: data-parallel mesh, as in :func:`fisher_diagonal`.

    Returns:
      A pytree like ``params`` with float32, non-negative leaves (with the params'
      shardings on a mesh).

    References:
      Fan et al., "SalUn: Empowering machine unlearning via gradient-based weight
      saliency", ICLR 2024.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p, ex: p["w"] * ex["x"]
      >>> grad_importance(loss, {"w": jnp.float32(3.0)}, [{"x": jnp.array([1.0, -2.0])}], kind="mean_abs")["w"]
      Array(1.5, dtype=float32)
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {_KINDS}")
    rd.check_params(params, "grad_importance")
    if kind == "mean_abs":
        rd.check_chunk_size(chunk_size)
        local, op = PerExampleSums(loss_fn, None, int(chunk_size), "abs"), "mean"
    else:
        local, op = GradSums(loss_fn), {"squared_mean": "mean_square", "abs_mean": "mean_abs", "abs_sum": "abs"}[kind]
    acc, total = rd.reduce_batches(local, params, batches, name="grad_importance", mesh=mesh)
    return rd.finish(acc, total, "grad_importance", check_finite, op)


@functools.partial(jax.jit, static_argnames=("loss_fn", "chunk_size"))
def _per_example_grads(params, examples, *, loss_fn, chunk_size):
    grad = jax.grad(loss_fn)
    return jax.lax.map(lambda ex: grad(params, ex), examples, batch_size=chunk_size)


def per_example_grads(
    loss_fn: LossFn, params: PyTree, batch: PyTree, *, chunk_size: int | None = None
) -> PyTree:
    """Stacked per-example gradients ``g_n = grad l_n`` of one batch.

    Computed by ``jax.lax.map(..., batch_size=chunk_size)`` (``vmap`` over chunks;
    ``None``: the whole batch at once). The whole result is ``B x`` the size of
    ``params``; use :func:`fisher_diagonal` to reduce without storing it. An
    ``"example_weight"`` key is removed from the examples and ignored.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``.
      params: pytree of floating-point arrays.
      batch: one batch (arrays with a leading batch axis of size B).
      chunk_size: examples per vectorised chunk.

    Returns:
      A pytree like ``params`` whose leaves have a leading axis B, in the parameter dtypes.
    """
    rd.check_params(params, "per_example_grads")
    (_, examples, _), = rd.checked_batches([batch], "per_example_grads")
    if chunk_size is not None:
        rd.check_chunk_size(chunk_size)
    return _per_example_grads(params, examples, loss_fn=loss_fn, chunk_size=chunk_size)


def sample_labels_fn(
    logits_fn: Callable[[PyTree, PyTree], jax.Array], *, autoregressive: bool = True
) -> SampleFn:
    """Label sampler for the true Fisher, for the batch convention of :mod:`jaxunlearn.losses`.

    Returns ``sample_fn(params, example, key) -> example`` for
    :func:`fisher_diagonal` (``labels="sampled"``): every answer token ``x_t``
    (``loss_mask[t] > 0``, ``t >= 1``) of ``example["input_ids"]`` is replaced by a
    draw ``y_t ~ softmax(logits[t - 1])``; other tokens are kept.

    - ``autoregressive=True`` (exact): tokens are drawn left to right, each from the
      model conditioned on the already sampled prefix, so the sequence is a sample of
      ``p(y | prompt)`` and ``loss_fn`` on it is ``-log p(y | prompt)``. Costs ``T - 1``
      forward passes per example (no KV cache).
    - ``autoregressive=False`` (one forward pass): every answer token is drawn from the
      model conditioned on the *data* prefix (teacher forcing); the loss then sees
      contexts that contain the sampled tokens, so this is an approximation.

    Args:
      logits_fn: ``logits_fn(params, example) -> (T, V)`` logits of one example (no
        batch axis); must be causal (logits at t depend on tokens <= t only).
      autoregressive: see above.

    Returns:
      ``sample_fn(params, example, key) -> example``.
    """

    def sample_fn(params: PyTree, example: PyTree, key: jax.Array) -> PyTree:
        if not isinstance(example, Mapping) or "input_ids" not in example or "loss_mask" not in example:
            raise ValueError("sample_labels_fn needs examples with 'input_ids' and 'loss_mask'")
        ids = example["input_ids"]
        mask = example["loss_mask"]
        if ids.ndim != 1 or mask.shape != ids.shape:
            raise ValueError(
                f"sample_labels_fn: expected one example with input_ids (T,) and loss_mask (T,), "
                f"got {ids.shape} and {mask.shape}"
            )
        length = ids.shape[0]
        params = jax.lax.stop_gradient(params)
        if not autoregressive:
            logits = logits_fn(params, example)[:-1].astype(jnp.float32)
            draws = jax.random.categorical(key, logits, axis=-1).astype(ids.dtype)
            new = ids.at[1:].set(jnp.where(mask[1:] > 0, draws, ids[1:]))
            return {**example, "input_ids": new}
        keys = jax.random.split(key, length - 1)

        def step(t, cur):
            logits = logits_fn(params, {**example, "input_ids": cur})
            logit_t = jax.lax.dynamic_index_in_dim(logits, t, axis=0, keepdims=False)
            y = jax.random.categorical(keys[t], logit_t.astype(jnp.float32)).astype(ids.dtype)
            return cur.at[t + 1].set(jnp.where(mask[t + 1] > 0, y, cur[t + 1]))

        new = jax.lax.fori_loop(0, length - 1, step, ids)
        return {**example, "input_ids": new}

    return sample_fn
