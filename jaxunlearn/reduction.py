"""The batch-reduction engine: weighted sums over the examples of many batches, optionally data-parallel.

Every estimator of :mod:`jaxunlearn.fisher` (and the fused Fisher of
:mod:`jaxunlearn.fisher_fused`) is a sum over examples, ``S = sum_n w_n r_n(params)`` with
``w_n >= 0`` the example weights, and a final operation on ``(S, W = sum_n w_n)`` (``S / W``,
``(S / W)**2``, ...). An estimator supplies only its *local sums*, a hashable
:class:`LocalSums` ``local(params, data) -> (S_local, W_local)`` over the rows it is given;
this module does the rest, once for all of them:

- validation (:func:`checked_batches`, :func:`check_params`): batches are dicts (or any
  pytrees) of arrays sharing a leading batch axis; every batch has the same keys; an optional
  ``"example_weight"`` key (:data:`WEIGHT_KEY`, shape ``(B,)``, finite, ``>= 0``) weights the
  rows and is removed from the examples (:func:`split_weight`);
- placement (:func:`placement`): the mesh of a call and the ``PartitionSpec`` of each params leaf;
- one jitted accumulate step per batch (:func:`accumulate`, ``local`` a static argument, so
  calls with equal ``local`` objects reuse the compiled code), looped by :func:`reduce_batches`;
- the final operation and the NaN/Inf check (:func:`finish`).

``data`` handed to ``local`` is ``{"ex": examples, "w": float32 weights (n,), "key": per-example
PRNG keys (n,) or None}``; the key of example ``n`` of batch ``b`` is
``fold_in(fold_in(rng, b), n)`` (:func:`example_keys`), so results do not depend on how rows are
chunked or sharded. ``local`` must return float32 sums shaped like ``params`` and contribute
nothing for rows of weight 0 (:func:`valid_rows` replaces them by a row of positive weight
before any forward pass, so garbage padding rows give no NaN).

Data parallelism. With a mesh (``mesh=``, else the mesh the params, else the first batch, are
placed on), each batch runs under ``jax.shard_map`` manual over the mesh's data axes
(:func:`jaxunlearn.sharding.data_axes`: ``"data"``, ``"fsdp"``) only; other axes (``"tp"``) stay
automatic inside, so XLA still partitions the model over them. Each data shard:

1. all-gathers its params over the data axes that split them (the FSDP gather: one ``O(P)``
   gather of parameters, never of per-example gradients);
2. computes ``local`` on its rows;
3. reduces the sums: ``psum_scatter`` over the data axes that split the leaf (``"fsdp"``), then
   ``psum`` over the others (``"data"``), so every device receives only its block.

Results carry the params' ``NamedSharding`` s (params not placed on the mesh count as
replicated). A batch whose size the data-parallel size does not divide is padded with weight-0
rows (its last row repeated).

Example:
  >>> import jax.numpy as jnp
  >>> def local(params, data):  # sum_n w_n x_n * a (a toy "gradient"), and sum_n w_n
  ...     return {"a": jnp.sum(data["w"] * data["ex"]["x"]) * params["a"]}, jnp.sum(data["w"])
  >>> acc, total = reduce_batches(local, {"a": jnp.float32(2.0)}, [{"x": jnp.array([1.0, 3.0])}], name="demo")
  >>> finish(acc, total, "demo")["a"]  # (1 + 3) * 2 / 2
  Array(4., dtype=float32)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxunlearn import sharding as sh
from jaxunlearn import tree as jt
from jaxunlearn.placement import mesh_of

PyTree = Any

__all__ = [
    "WEIGHT_KEY",
    "LocalSums",
    "split_weight",
    "check_params",
    "check_chunk_size",
    "checked_batches",
    "placement",
    "zeros",
    "accumulate",
    "reduce_batches",
    "finish",
    "example_keys",
    "valid_rows",
    "scan_chunks",
]

WEIGHT_KEY = "example_weight"
_EMPTY = object()
_OPS = ("mean", "mean_square", "mean_abs", "abs")


class LocalSums(Protocol):
    """Local sums of one estimator: ``local(params, data) -> (sums like params, weight sum)``.

    Hashable and compared by value (a frozen dataclass): it is a static argument of
    :func:`accumulate`. Optional attributes: ``check_vma`` (default True; False for code not
    typed for ``shard_map``'s manual axes, e.g. a ``lax.scan`` from an invariant zero carry or a
    Pallas call; the params are gathered and the sums reduced explicitly either way) and
    ``check_batch(params, examples, index)`` (host-side validation of each batch before it runs).
    """

    def __call__(self, params: PyTree, data: Mapping[str, Any]) -> tuple[PyTree, jax.Array]: ...


# ---------------------------------------------------------------- validation


def split_weight(batch: PyTree) -> tuple[PyTree, jax.Array | None]:
    """``(batch without the weight key, its "example_weight" or None)``.

    >>> split_weight({"x": 1, "example_weight": 2})
    ({'x': 1}, 2)
    """
    if isinstance(batch, Mapping) and WEIGHT_KEY in batch:
        return {k: v for k, v in batch.items() if k != WEIGHT_KEY}, batch[WEIGHT_KEY]
    return batch, None


def _structure_desc(batch: PyTree) -> str:
    if isinstance(batch, Mapping):
        return f"keys {sorted(map(str, batch.keys()))}"
    return str(jax.tree_util.tree_structure(batch))


def _check_batch(batch: PyTree, index: int, reference: tuple[Any, str] | None) -> tuple[PyTree, Any]:
    """Validate one batch against ``reference = (treedef, description)`` of batch 0;
    ``(examples, weight (B,))`` (ones when the batch has no weight)."""
    if reference is not None and jax.tree_util.tree_structure(batch) != reference[0]:
        raise ValueError(f"batch {index} has {_structure_desc(batch)} but batch 0 has {reference[1]}: "
                         "every batch needs the same keys")
    examples, weight = split_weight(batch)
    leaves = jt.leaves_with_paths(examples)
    if not leaves:
        raise ValueError(f"batch {index} has no arrays (besides '{WEIGHT_KEY}')")
    sizes = {}
    for path, x in leaves:
        if len(jnp.shape(x)) == 0:
            raise ValueError(f"batch {index}: '{path}' is a scalar; every array needs a batch axis")
        sizes[path] = jnp.shape(x)[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch {index}: arrays disagree on the batch size: {sizes}")
    (size,) = set(sizes.values())
    if size == 0:
        raise ValueError(f"batch {index} is empty (batch size 0)")
    if weight is None:
        return examples, np.ones((size,), np.float32)
    if jnp.shape(weight) != (size,):
        raise ValueError(f"batch {index}: '{WEIGHT_KEY}' has shape {jnp.shape(weight)}, expected ({size},)")
    concrete = isinstance(weight, np.ndarray) or (
        isinstance(weight, jax.Array) and not isinstance(weight, jax.core.Tracer) and weight.is_fully_addressable)
    if concrete:
        w = np.asarray(weight, dtype=np.float32)
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"batch {index}: '{WEIGHT_KEY}' must be finite and >= 0")
    return examples, weight


def checked_batches(batches: Iterable[PyTree], name: str) -> Iterator[tuple[int, PyTree, Any]]:
    """Yield ``(index, examples, weight (B,))`` of each batch, validated.

    A list or tuple is validated entirely before the first batch is yielded (bad input fails
    before any compilation); other iterables are validated as they come.

    Raises:
      TypeError: ``batches`` is one batch (a dict), not an iterable of batches.
      ValueError: no batches; batches with different keys; arrays without a batch axis or
        disagreeing on its size; an empty batch; a weight of the wrong shape, negative or not finite.
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


def check_params(params: PyTree, name: str) -> None:
    """Raise unless ``params`` is a non-empty pytree of floating-point arrays (naming the first bad leaf)."""
    jt.check_nonempty(params, f"{name}: params")
    for path, x in jt.leaves_with_paths(params):
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(f"{name}: params leaf '{path}' has dtype {jnp.result_type(x)}; "
                            "only floating-point parameters can be differentiated")


def check_chunk_size(chunk_size: Any, what: str = "chunk_size") -> None:
    """Raise ``ValueError`` unless ``chunk_size`` is a positive int."""
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{what} must be a positive int, got {chunk_size!r}")


# ---------------------------------------------------------------- helpers for local sums


def example_keys(batch_key: jax.Array | None, size: int) -> jax.Array | None:
    """``fold_in(batch_key, n)`` for ``n < size`` (one key per example index), or None."""
    if batch_key is None:
        return None
    return jax.vmap(lambda i: jax.random.fold_in(batch_key, i))(jnp.arange(size, dtype=jnp.uint32))


def valid_rows(examples: PyTree, weight: jax.Array) -> PyTree:
    """``examples`` with each row of weight 0 replaced by the first row of positive weight."""
    pos = weight > 0
    idx = jnp.where(pos, jnp.arange(weight.shape[0]), jnp.argmax(pos))
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), examples)


def _take_rows(x: jax.Array, n: int) -> jax.Array:
    """The first ``n`` rows of ``x``, its last row repeated past its end (works for key arrays)."""
    if x.shape[0] == n:
        return x
    return jnp.take(x, jnp.minimum(jnp.arange(n), x.shape[0] - 1), axis=0)


def _pad_data(data: Mapping[str, Any], size: int) -> dict[str, Any]:
    """``data`` padded to ``size`` rows: weight-0 rows repeating the last example (and key)."""
    w = data["w"]
    return {"ex": jax.tree.map(lambda x: _take_rows(jnp.asarray(x), size), data["ex"]),
            "w": jnp.pad(w, (0, size - w.shape[0])),
            "key": None if data.get("key") is None else _take_rows(data["key"], size)}


def scan_chunks(body: Callable[[Any, Mapping[str, Any]], Any], init: Any, data: Mapping[str, Any],
                chunk_size: int | None) -> Any:
    """``carry = body(carry, chunk)`` over chunks of ``chunk_size`` rows of ``data`` (a ``lax.scan``).

    The rows are padded to a multiple of ``chunk_size`` with weight-0 rows (``"w"`` 0, the last
    example and key repeated); one chunk runs without a loop. ``None``: the whole ``data`` at once.
    """
    size = data["w"].shape[0]
    chunk = size if chunk_size is None else min(int(chunk_size), size)
    n_chunks = -(-size // chunk)
    data = _pad_data(data, n_chunks * chunk)
    if n_chunks == 1:
        return body(init, data)
    xs = jax.tree.map(lambda x: x.reshape((n_chunks, chunk) + x.shape[1:]), data)
    carry, _ = jax.lax.scan(lambda c, x: (body(c, x), None), init, xs)
    return carry


# ---------------------------------------------------------------- placement and data parallelism


def placement(mesh: Mesh | None, params: PyTree, examples: PyTree, name: str
              ) -> tuple[Mesh | None, tuple[P, ...] | None]:
    """``(mesh, PartitionSpec per params leaf)`` of a call, or ``(None, None)`` (unsharded).

    ``mesh=None``: the mesh of the params' ``NamedSharding`` s, else of ``examples``'; none found:
    unsharded. A params leaf with a ``NamedSharding`` on the mesh keeps its spec; any other leaf
    (host array, single-device array) is replicated (``P()``).

    Raises:
      TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
      ValueError: a params leaf sharded on a different mesh.
    """
    if mesh is None:
        mesh = mesh_of(params) or mesh_of(examples)
        if mesh is None:
            return None, None
    elif not isinstance(mesh, Mesh):
        raise TypeError(f"{name}: mesh must be a jax.sharding.Mesh (e.g. jaxunlearn.sharding.make_mesh("
                        f"'fsdp=8')), got {type(mesh).__name__}")
    specs = []
    for path, x in jt.leaves_with_paths(params):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and not isinstance(x, jax.core.Tracer):
            if s.mesh != mesh:
                raise ValueError(
                    f"{name}: params leaf '{path}' is sharded on mesh {dict(s.mesh.shape)} ({s.mesh.axis_names}), "
                    f"not on the mesh of this call {dict(mesh.shape)}; place the params on one mesh "
                    "(jaxunlearn.sharding.shard_params)")
            specs.append(s.spec)
        else:
            specs.append(P())
    return mesh, tuple(specs)


def _spec_dims(spec: P, axes: tuple[str, ...]) -> list[tuple[int, tuple[str, ...]]]:
    """``[(dim, mesh axes among `axes` that split dim)]`` of a PartitionSpec, in spec order."""
    out = []
    for d, entry in enumerate(spec):
        names = () if entry is None or entry is P.UNCONSTRAINED else (entry,) if isinstance(entry, str) else entry
        ax = tuple(a for a in names if a in axes)
        if ax:
            out.append((d, ax))
    return out


def _manual_spec(spec: P, axes: tuple[str, ...]) -> P:
    """``spec`` with only the mesh axes in ``axes`` (the shard_map's manual axes) kept."""
    entries: list[Any] = [None] * len(spec)
    for d, ax in _spec_dims(spec, axes):
        entries[d] = ax[0] if len(ax) == 1 else ax
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def _gather_param(x: jax.Array, spec: P, axes: tuple[str, ...], vary: bool) -> jax.Array:
    """Inside the shard_map: a param leaf's data-axis shards gathered (tiled); with ``vary``
    (``check_vma=True``) typed as varying over every data axis, so ``jax.grad`` inside does not
    ``psum`` its per-example cotangent across shards."""
    dims = _spec_dims(spec, axes)
    for d, ax in dims:  # all_gather keeps x varying over ax
        x = jax.lax.all_gather(x, ax, axis=d, tiled=True)
    used = {a for _, ax in dims for a in ax}
    missing = tuple(a for a in axes if a not in used)  # replicated over these by the in_spec
    return jax.lax.pcast(x, missing, to="varying") if missing and vary else x


def _reduce_sum(x: jax.Array, spec: P, axes: tuple[str, ...]) -> jax.Array:
    """Inside the shard_map: a per-shard sum reduced over the data axes, scattered like ``spec``."""
    dims = _spec_dims(spec, axes)
    used = {a for _, ax in dims for a in ax}
    rest = tuple(a for a in axes if a not in used)
    for d, ax in dims:  # scatter first: the psum below then moves only this device's block
        x = jax.lax.psum_scatter(x, ax, scatter_dimension=d, tiled=True)
    return jax.lax.psum(x, rest) if rest else x


def _data_parallel_sums(local: LocalSums, mesh: Mesh, specs: tuple[P, ...], params: PyTree,
                        data: PyTree) -> tuple[PyTree, jax.Array]:
    """Under jit: ``local`` on each data shard of ``data`` (rows divisible by the data-parallel
    size), its sums reduced across shards; without data axes ``local`` runs on the global arrays."""
    axes = sh.data_axes(mesh)
    if not axes:
        return local(params, data)
    check_vma = bool(getattr(local, "check_vma", True))
    leaves, treedef = jax.tree.flatten(params)
    manual = [_manual_spec(s, axes) for s in specs]

    def body(local_leaves, shard):
        full = [_gather_param(x, s, axes, check_vma) for x, s in zip(local_leaves, manual)]
        sums, wsum = local(jax.tree.unflatten(treedef, full), shard)
        out = [_reduce_sum(x, s, axes) for x, s in zip(treedef.flatten_up_to(sums), manual)]
        return out, jax.lax.psum(wsum, axes)

    batch_spec = P(axes if len(axes) > 1 else axes[0])
    # manual over the data axes, and over the axes of size 1 (nothing to split): a mesh with no
    # tensor parallelism is then manual throughout, and the kernels inside run per shard
    # (jaxunlearn.kernels.dispatch.kernel_unless_partitioned); a tp axis > 1 stays with XLA.
    names = frozenset(axes) | {a for a in mesh.axis_names if mesh.shape[a] == 1}
    fn = jax.shard_map(body, mesh=mesh, in_specs=(manual, batch_spec), out_specs=(manual, P()),
                       axis_names=names, check_vma=check_vma)
    out, total = fn(leaves, data)
    return jax.tree.unflatten(treedef, out), total


def _constrain(tree: PyTree, mesh: Mesh | None, specs: tuple[P, ...] | None) -> PyTree:
    if mesh is None:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [jax.lax.with_sharding_constraint(x, NamedSharding(mesh, s))
                                        for x, s in zip(leaves, specs)])


# ---------------------------------------------------------------- the accumulate step and the loop


@functools.partial(jax.jit, static_argnames=("mesh", "specs"))
def zeros(params: PyTree, mesh: Mesh | None = None, specs: tuple[P, ...] | None = None
          ) -> tuple[PyTree, jax.Array]:
    """``(float32 zeros like params, placed by specs on mesh when given; a zero total)``: the start of a sum."""
    return _constrain(jt.zeros_like(params, dtype=jnp.float32), mesh, specs), jnp.zeros((), jnp.float32)


@functools.partial(jax.jit, static_argnames=("local_sums", "mesh", "specs"))
def accumulate(acc: PyTree, total: jax.Array, params: PyTree, examples: PyTree, weight: jax.Array,
               batch_key: jax.Array | None, *, local_sums: LocalSums, mesh: Mesh | None = None,
               specs: tuple[P, ...] | None = None) -> tuple[PyTree, jax.Array]:
    """One batch: ``(acc + sum_n w_n r_n, total + sum_n w_n)``, jitted (``local_sums`` static).

    Without a mesh, ``local_sums`` sees the whole batch; with one, each data shard runs it on its
    rows (padded to a multiple of the data-parallel size with weight-0 rows) under
    ``jax.shard_map`` and the sums are reduced back to the params' shardings (module docstring).

    Args:
      acc, total: the running sums (from :func:`zeros`).
      params: the parameters.
      examples: the batch without its weight (:func:`split_weight`).
      weight: ``(B,)`` example weights.
      batch_key: this batch's PRNG key (per-example keys are folded from it), or None.
      local_sums: the estimator's :class:`LocalSums`.
      mesh, specs: from :func:`placement`.

    Returns:
      The updated ``(acc, total)``.
    """
    weight = jnp.asarray(weight).astype(jnp.float32)
    size = weight.shape[0]
    if mesh is None:
        data = {"ex": examples, "w": weight, "key": example_keys(batch_key, size)}
        sums, wsum = local_sums(params, data)
    else:
        padded = size + (-size % sh.data_parallel_size(mesh))
        data = _pad_data({"ex": examples, "w": weight, "key": example_keys(batch_key, size)}, padded)
        sums, wsum = _data_parallel_sums(local_sums, mesh, specs, params, data)
    return _constrain(jax.tree.map(jnp.add, acc, sums), mesh, specs), total + wsum


def reduce_batches(local_sums: LocalSums, params: PyTree, batches: Iterable[PyTree], *, name: str,
                   rng: jax.Array | None = None, mesh: Mesh | None = None) -> tuple[PyTree, jax.Array]:
    """``(sum over all batches of the local sums, total weight)``: validation, placement, one jitted step per batch.

    Args:
      local_sums: the estimator's :class:`LocalSums`.
      params: the parameters (placement from their shardings, see :func:`placement`).
      batches: iterable of batches (:func:`checked_batches`).
      name: the estimator's name, for error messages.
      rng: batch ``b`` gets the key ``fold_in(rng, b)`` (None: no keys).
      mesh: the mesh to run data-parallel on (None: found from the params / first batch).

    Returns:
      ``(acc, total)`` for :func:`finish`.
    """
    check = getattr(local_sums, "check_batch", None)
    acc = total = specs = None
    for i, examples, weight in checked_batches(batches, name):
        if check is not None:
            check(params, examples, i)
        if i == 0:
            mesh, specs = placement(mesh, params, examples, name)
            acc, total = zeros(params, mesh, specs)
        key = None if rng is None else jax.random.fold_in(rng, i)
        acc, total = accumulate(acc, total, params, examples, weight, key, local_sums=local_sums, mesh=mesh,
                                specs=specs)
    return acc, total


@functools.partial(jax.jit, static_argnames=("op",))
def _finalize(acc: PyTree, total: jax.Array, *, op: str):
    if op == "abs":
        out = jax.tree.map(jnp.abs, acc)
    else:
        out = jax.tree.map(lambda a: a / total, acc)
        if op == "mean_square":
            out = jax.tree.map(jnp.square, out)
        elif op == "mean_abs":
            out = jax.tree.map(jnp.abs, out)
    return out, (jax.tree.map(lambda x: jnp.any(jnp.isnan(x)), out), jax.tree.map(lambda x: jnp.any(jnp.isinf(x)), out))


def finish(acc: PyTree, total: jax.Array, name: str, check_finite: bool = True, op: str = "mean") -> PyTree:
    """The result of a reduction: ``op`` of the sums, checked on the host.

    ``"mean"``: ``acc / W``; ``"mean_square"``: ``(acc / W)**2``; ``"mean_abs"``: ``|acc / W|``;
    ``"abs"``: ``|acc|`` (``W = total``). One transfer of the total and of a NaN/Inf flag pair per leaf.

    Raises:
      ValueError: the total weight is not positive, or an unknown ``op``.
      FloatingPointError: with ``check_finite``, NaN or Inf in the result (names the first leaf).
    """
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {_OPS}")
    out, flags = _finalize(acc, total, op=op)
    total_h, flags_h = jax.device_get((total, flags))
    if not float(total_h) > 0:
        raise ValueError(f"{name}: the total example weight is {float(total_h)}; need at least one example")
    if check_finite:
        # two trees of flags (NaN, Inf): a tuple inside the params (a NamedTuple) is not mistaken for a flag pair
        flat, _ = jax.tree_util.tree_flatten_with_path(flags_h[0])
        for (path, has_nan), has_inf in zip(flat, jax.tree.leaves(flags_h[1])):
            if has_nan or has_inf:
                raise FloatingPointError(f"{name} has {'NaN' if has_nan else 'Inf'} values at '{jt.path_str(path)}'")
    return out
