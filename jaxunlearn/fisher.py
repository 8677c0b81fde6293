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

Batches. ``batches`` is an iterable of batches; a batch is a dict (or any pytree)
of arrays that share a leading batch axis; every batch has the same keys, their
sizes may differ. ``loss_fn(params, example)`` sees one example: the same dict
with the batch axis removed. If a dict batch has the key ``"example_weight"``
(shape ``(B,)``, non-negative, typically a 0/1 mask of padded rows), it is removed
from the example given to ``loss_fn`` and weights that example; rows of weight
0 never contribute, even if their loss is not finite.

Per-example gradients are ``jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))``
over chunks of ``chunk_size`` examples, summed by a ``lax.scan`` over chunks, so
at most ``chunk_size`` gradients are alive at once. The batch is padded (by
repeating its last row, with weight 0) to a multiple of ``chunk_size`` inside
one jitted function per batch shape; ``loss_fn`` is a static argument of that
function, so calls with the same ``loss_fn`` object reuse the compiled code.
For the standard loss of a :class:`jaxunlearn.models.Decoder`
(``loss_fn = jaxunlearn.fisher_fused.decoder_nll(model)``), ``method="auto"`` (the
default) or ``"fused"`` computes the same Fisher from one forward and backward pass
per batch instead (:mod:`jaxunlearn.fisher_fused`, dense layers by the
``jaxunlearn.kernels.fisher`` kernel).
Sums are accumulated in float32 and the results have float32 leaves whatever
the parameter dtype (a bfloat16 Fisher loses most small entries; cast the result
yourself if you need the parameter dtype).

References:
  Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", 2017
  (diagonal Fisher as importance). Kunstner, Hennig, Balles, "Limitations of the
  empirical Fisher approximation for natural gradient descent", 2019 (empirical vs
  true Fisher). Fan et al., "SalUn: Empowering machine unlearning via gradient-based
  weight saliency", 2024.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import tree as jt

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]
SampleFn = Callable[[PyTree, PyTree, jax.Array], PyTree]

__all__ = [
    "WEIGHT_KEY",
    "fisher_diagonal",
    "grad_importance",
    "mean_grad",
    "per_example_grads",
    "sample_labels_fn",
]

WEIGHT_KEY = "example_weight"
_LABELS = ("empirical", "sampled")
_METHODS = ("vmap", "auto", "fused")
_KINDS = ("squared_mean", "abs_mean", "abs_sum", "mean_abs")


# ---------------------------------------------------------------- batches


def _split_weight(batch: PyTree) -> tuple[PyTree, jax.Array | None]:
    """``(batch without the weight key, weight or None)``."""
    if isinstance(batch, Mapping) and WEIGHT_KEY in batch:
        rest = {k: v for k, v in batch.items() if k != WEIGHT_KEY}
        return rest, batch[WEIGHT_KEY]
    return batch, None


def _structure_desc(batch: PyTree) -> str:
    if isinstance(batch, Mapping):
        return f"keys {sorted(map(str, batch.keys()))}"
    return str(jax.tree_util.tree_structure(batch))


def _check_batch(
    batch: PyTree, index: int, reference: tuple[Any, str] | None
) -> tuple[PyTree, jax.Array]:
    """Validate one batch against ``reference = (treedef, description)`` of batch 0.

    Returns ``(examples, weight of shape (B,))`` (the weight is cast under jit).
    """
    if reference is not None and jax.tree_util.tree_structure(batch) != reference[0]:
        raise ValueError(
            f"batch {index} has {_structure_desc(batch)} but batch 0 has {reference[1]}: "
            "every batch needs the same keys"
        )
    examples, weight = _split_weight(batch)
    leaves = jt.leaves_with_paths(examples)
    if not leaves:
        raise ValueError(f"batch {index} has no arrays (besides '{WEIGHT_KEY}')")
    sizes = {}
    for path, x in leaves:
        shape = jnp.shape(x)
        if len(shape) == 0:
            raise ValueError(f"batch {index}: '{path}' is a scalar; every array needs a batch axis")
        sizes[path] = shape[0]
    distinct = set(sizes.values())
    if len(distinct) != 1:
        raise ValueError(f"batch {index}: arrays disagree on the batch size: {sizes}")
    (size,) = distinct
    if size == 0:
        raise ValueError(f"batch {index} is empty (batch size 0)")
    if weight is None:
        return examples, np.ones((size,), np.float32)
    if jnp.shape(weight) != (size,):
        raise ValueError(
            f"batch {index}: '{WEIGHT_KEY}' has shape {jnp.shape(weight)}, expected ({size},)"
        )
    concrete = isinstance(weight, np.ndarray) or (
        isinstance(weight, jax.Array)
        and not isinstance(weight, jax.core.Tracer)
        and weight.is_fully_addressable
    )
    if concrete:
        w = np.asarray(weight, dtype=np.float32)
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"batch {index}: '{WEIGHT_KEY}' must be finite and >= 0")
    return examples, weight


def _iter_checked(batches: Iterable[PyTree], name: str):
    """Yield ``(index, examples, weight)``; ValueError on an empty iterable.

    A list or tuple is validated entirely before the first batch is yielded (so bad
    input fails before any compilation); other iterables are validated as they come.
    """
    if isinstance(batches, Mapping):
        raise TypeError(f"{name}: `batches` must be an iterable of batches, not one batch (a dict)")
    if isinstance(batches, (list, tuple)):
        if not batches:
            raise ValueError(f"{name}: `batches` is empty; need at least one batch")
        ref = (jax.tree_util.tree_structure(batches[0]), _structure_desc(batches[0]))
        checked = [_check_batch(b, i, None if i == 0 else ref) for i, b in enumerate(batches)]
        for i, (examples, weight) in enumerate(checked):
            yield i, examples, weight
        return
    it = iter(batches)
    first = next(it, _EMPTY)
    if first is _EMPTY:
        raise ValueError(f"{name}: `batches` is empty; need at least one batch")
    ref = (jax.tree_util.tree_structure(first), _structure_desc(first))
    yield (0, *_check_batch(first, 0, None))
    del first
    for i, b in enumerate(it, start=1):
        yield (i, *_check_batch(b, i, ref))


_EMPTY = object()


def _check_params(params: PyTree, name: str) -> None:
    jt.check_nonempty(params, f"{name}: params")
    for path, x in jt.leaves_with_paths(params):
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(
                f"{name}: params leaf '{path}' has dtype {jnp.result_type(x)}; "
                "only floating-point parameters can be differentiated"
            )


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _valid_rows(examples: PyTree, weight: jax.Array) -> PyTree:
    """Replace rows of weight 0 by the first row of positive weight (so their loss is finite)."""
    pos = weight > 0
    first = jnp.argmax(pos)
    idx = jnp.where(pos, jnp.arange(weight.shape[0]), first)
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), examples)


# ---------------------------------------------------------------- per-example accumulation


def _pad_rows(x: jax.Array, pad: int) -> jax.Array:
    if pad == 0:
        return x
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode="edge")


@functools.partial(jax.jit, static_argnames=("loss_fn", "sample_fn", "chunk_size", "reduce"))
def _accumulate_batch(
    acc: PyTree,
    total: jax.Array,
    params: PyTree,
    examples: PyTree,
    weight: jax.Array,
    batch_key: jax.Array | None,
    *,
    loss_fn: LossFn,
    sample_fn: SampleFn | None,
    chunk_size: int,
    reduce: str,
) -> PyTree:
    """``(acc + sum_n w_n reduce(g_n), total + sum_n w_n)`` over one batch, by chunks."""
    weight = jnp.asarray(weight).astype(jnp.float32)
    size = weight.shape[0]
    n_chunks = -(-size // chunk_size)
    pad = n_chunks * chunk_size - size
    examples = jax.tree.map(lambda x: _pad_rows(jnp.asarray(x), pad), examples)
    weight = jnp.pad(weight, (0, pad))

    def chunked(x):
        return x.reshape((n_chunks, chunk_size) + x.shape[1:])

    xs: dict[str, Any] = {"ex": jax.tree.map(chunked, examples), "w": chunked(weight)}
    if sample_fn is not None:
        # one key per example index: independent of chunk_size and padding.
        idx = jnp.arange(size + pad, dtype=jnp.uint32)
        keys = jax.vmap(lambda i: jax.random.fold_in(batch_key, i))(idx)
        xs["key"] = chunked(keys)

    def one_grad(example, key):
        if sample_fn is not None:
            example = sample_fn(params, example, key)
        return jax.grad(loss_fn)(params, example)

    if reduce == "square":
        red = jnp.square
    elif reduce == "abs":
        red = jnp.abs
    else:  # pragma: no cover - internal
        raise ValueError(reduce)

    def body(carry, chunk):
        keys = chunk.get("key")
        grads = jax.vmap(one_grad, in_axes=(0, None if keys is None else 0))(chunk["ex"], keys)
        w = chunk["w"]

        def add(c, g):
            v = red(g.astype(jnp.float32))
            wb = w.reshape((-1,) + (1,) * (v.ndim - 1))
            return c + jnp.sum(jnp.where(wb > 0, wb * v, 0.0), axis=0)

        return jax.tree.map(add, carry, grads), None

    total = total + jnp.sum(weight)
    acc, _ = jax.lax.scan(body, acc, xs)
    return acc, total


def _per_example_reduce(
    name: str,
    loss_fn: LossFn,
    params: PyTree,
    batches: Iterable[PyTree],
    *,
    chunk_size: int,
    reduce: str,
    sample_fn: SampleFn | None,
    rng: jax.Array | None,
) -> tuple[PyTree, jax.Array]:
    acc, total = _zeros_f32(params)
    for i, examples, weight in _iter_checked(batches, name):
        key = None if sample_fn is None else jax.random.fold_in(rng, i)
        acc, total = _accumulate_batch(
            acc,
            total,
            params,
            examples,
            weight,
            key,
            loss_fn=loss_fn,
            sample_fn=sample_fn,
            chunk_size=int(chunk_size),
            reduce=reduce,
        )
    return acc, total


@jax.jit
def _zeros_f32(params: PyTree) -> tuple[PyTree, jax.Array]:
    return jt.zeros_like(params, dtype=jnp.float32), jnp.zeros((), jnp.float32)


@functools.partial(jax.jit, static_argnames=("op",))
def _finalize_jit(acc: PyTree, total: jax.Array, *, op: str):
    if op == "abs":
        out = jax.tree.map(jnp.abs, acc)
    else:
        out = jax.tree.map(lambda a: a / total, acc)
        if op == "mean_square":
            out = jax.tree.map(jnp.square, out)
        elif op == "mean_abs":
            out = jax.tree.map(jnp.abs, out)
    flags = jax.tree.map(lambda x: (jnp.any(jnp.isnan(x)), jnp.any(jnp.isinf(x))), out)
    return out, flags


def _finish(
    acc: PyTree, total: jax.Array, name: str, check_finite: bool, op: str = "mean"
) -> PyTree:
    """``op`` of the accumulated sums (``"mean"``: ``acc / W``; ``"mean_square"``:
    ``(acc / W)**2``; ``"mean_abs"``: ``|acc / W|``; ``"abs"``: ``|acc|``), checked on
    the host with one transfer of the total and of a NaN/Inf flag pair per leaf."""
    out, flags = _finalize_jit(acc, total, op=op)
    total_h, flags_h = jax.device_get((total, flags))
    if not float(total_h) > 0:
        raise ValueError(
            f"{name}: the total example weight is {float(total_h)}; need at least one example"
        )
    if check_finite:
        flat, _ = jax.tree_util.tree_flatten_with_path(
            flags_h, is_leaf=lambda x: isinstance(x, tuple)
        )
        for path, (has_nan, has_inf) in flat:
            if has_nan or has_inf:
                bad = "NaN" if has_nan else "Inf"
                raise FloatingPointError(f"{name} has {bad} values at '{jt.path_str(path)}'")
    return out


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
      loss_fn: ``loss_fn(params, example) -> scalar``, one example's summed NLL.
      params: pytree of floating-point arrays (a dict, an ``nnx.State``, ...).
      batches: iterable of batches (dicts of arrays with a leading batch axis).
      chunk_size: examples per ``vmap`` chunk; at most this many gradients are alive.
        Need not divide the batch size.
      labels: ``"empirical"`` or ``"sampled"``.
      rng: PRNG key, required with ``labels="sampled"``.
      sample_fn: label sampler, required with ``labels="sampled"``.
      method: ``"vmap"`` (chunked per-example gradients, any ``loss_fn``);
        ``"fused"`` (one forward/backward pass per batch with the dense-layer Fisher
        kernel, :func:`jaxunlearn.fisher_fused.fisher_diagonal_fused`), which needs
        ``loss_fn`` to be the standard decoder loss
        :func:`jaxunlearn.fisher_fused.decoder_nll` ``(model)`` and ignores
        ``chunk_size`` (the whole batch is one pass); ``"auto"``: ``"fused"`` for
        that loss, ``"vmap"`` otherwise.
      check_finite: raise ``FloatingPointError`` naming the first leaf with NaN/Inf.

    Returns:
      A pytree like ``params`` with float32 leaves.

    Raises:
      ValueError: empty ``batches``, batches with different keys or inconsistent batch
        sizes, zero total weight, unknown ``labels``/``method``, missing ``rng``/``sample_fn``.
      NotImplementedError: ``method="fused"`` with a loss other than ``decoder_nll(model)``.
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
    if labels not in _LABELS:
        raise ValueError(f"unknown labels {labels!r}; expected one of {_LABELS}")
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {_METHODS}")
    _check_chunk_size(chunk_size)
    if method != "vmap":
        from jaxunlearn import fisher_fused  # lazy: it imports the models package and this module

        if isinstance(loss_fn, fisher_fused.DecoderNLL):
            return fisher_fused.fisher_diagonal_fused(
                loss_fn.graphdef, params, batches, labels=labels, rng=rng, sample_fn=sample_fn,
                check_finite=check_finite,
            )
        if method == "fused":
            raise NotImplementedError(
                "fisher_diagonal(method='fused') is implemented for the standard decoder loss only: "
                "pass loss_fn=jaxunlearn.fisher_fused.decoder_nll(model) (or call "
                "fisher_diagonal_fused), or use method='vmap' for any other loss"
            )
    if labels == "sampled":
        if rng is None:
            raise ValueError("fisher_diagonal(labels='sampled') needs an `rng` key")
        if sample_fn is None:
            raise ValueError(
                "fisher_diagonal(labels='sampled') needs `sample_fn(params, example, key)`; "
                "see sample_labels_fn"
            )
    elif sample_fn is not None:
        raise ValueError("sample_fn is only used with labels='sampled'")
    _check_params(params, "fisher_diagonal")
    acc, total = _per_example_reduce(
        "fisher_diagonal",
        loss_fn,
        params,
        batches,
        chunk_size=chunk_size,
        reduce="square",
        sample_fn=sample_fn if labels == "sampled" else None,
        rng=rng,
    )
    return _finish(acc, total, "fisher_diagonal", check_finite)


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _batch_grad_sum(acc, total, params, examples, weight, *, loss_fn):
    """``(acc + grad sum_n w_n l_n, total + sum_n w_n)`` for one batch."""
    weight = jnp.asarray(weight).astype(jnp.float32)
    examples = _valid_rows(examples, weight)

    def total_loss(p):
        losses = jax.vmap(loss_fn, in_axes=(None, 0))(p, examples).astype(jnp.float32)
        return jnp.sum(weight * losses)

    g = jax.grad(total_loss)(params)
    acc = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, g)
    return acc, total + jnp.sum(weight)


def _batch_grad_reduce(name, loss_fn, params, batches):
    acc, total = _zeros_f32(params)
    for _, examples, weight in _iter_checked(batches, name):
        acc, total = _batch_grad_sum(acc, total, params, examples, weight, loss_fn=loss_fn)
    return acc, total


def mean_grad(
    loss_fn: LossFn, params: PyTree, batches: Iterable[PyTree], *, check_finite: bool = True
) -> PyTree:
    """Weighted mean gradient over all examples of all batches.

    ``g_bar = (1/W) sum_n w_n grad l_n``, computed as one gradient of the batch loss
    ``sum_n w_n l_n`` per batch (no per-example gradients). Rows of weight 0 are
    replaced by a row of positive weight before the forward pass, so padding never
    produces NaN.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``.
      params: pytree of floating-point arrays.
      batches: iterable of batches (see the module docstring).
      check_finite: raise ``FloatingPointError`` naming the first leaf with NaN/Inf.

    Returns:
      A pytree like ``params`` with float32 leaves.
    """
    _check_params(params, "mean_grad")
    acc, total = _batch_grad_reduce("mean_grad", loss_fn, params, batches)
    return _finish(acc, total, "mean_grad", check_finite)


def grad_importance(
    loss_fn: LossFn,
    params: PyTree,
    batches: Iterable[PyTree],
    *,
    kind: Literal["squared_mean", "abs_mean", "abs_sum", "mean_abs"] = "squared_mean",
    chunk_size: int = 8,
    check_finite: bool = True,
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

    Returns:
      A pytree like ``params`` with float32, non-negative leaves.

    References:
      Fan et al., "SalUn: Empowering machine unlearning via gradient-based weight
      saliency", ICLR 2024.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {_KINDS}")
    _check_params(params, "grad_importance")
    if kind == "mean_abs":
        _check_chunk_size(chunk_size)
        acc, total = _per_example_reduce(
            "grad_importance",
            loss_fn,
            params,
            batches,
            chunk_size=chunk_size,
            reduce="abs",
            sample_fn=None,
            rng=None,
        )
        return _finish(acc, total, "grad_importance", check_finite)
    acc, total = _batch_grad_reduce("grad_importance", loss_fn, params, batches)
    op = {"squared_mean": "mean_square", "abs_mean": "mean_abs", "abs_sum": "abs"}[kind]
    return _finish(acc, total, "grad_importance", check_finite, op)


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
    _check_params(params, "per_example_grads")
    examples, _ = _check_batch(batch, 0, None)
    if chunk_size is not None:
        _check_chunk_size(chunk_size)
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
