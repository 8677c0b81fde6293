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

Sharded runs. With ``mesh=`` (or, when ``mesh`` is None, if the params, else the first
batch, carry a ``NamedSharding``: that mesh), :func:`fisher_diagonal`,
:func:`grad_importance`, :func:`mean_grad` and
:func:`jaxunlearn.fisher_fused.fisher_diagonal_fused` are data-parallel: each batch runs
under ``jax.shard_map`` manual over the mesh's data axes
(:func:`jaxunlearn.sharding.data_axes`, ``"data"`` and ``"fsdp"``) only, the other axes
(``"tp"``) staying automatic inside. Each data shard all-gathers its parameters over the
data axes that split them (the FSDP gather: parameters, never per-example gradients),
computes the local sums ``sum_n w_n g_n**2`` (or ``|g_n|``, ``g_n``) of its rows by the
same chunked ``vmap`` (or the fused pass), and the sums are ``psum_scatter`` -ed over the
data axes that split the parameter and ``psum`` -ed over the others, so each device
receives only its block. Results carry the parameters' ``NamedSharding`` s (params not
placed on the mesh count as replicated). The batch rows are split over the data axes;
a batch whose size the data-parallel size does not divide is padded with weight-0 rows
(its last row repeated). Per-example keys (``labels="sampled"``) depend on the global
row index only, so sharded and unsharded runs draw the same labels.

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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxunlearn import sharding as sh
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


# ---------------------------------------------------------------- data parallelism over a mesh
#
# With a mesh, one batch's per-example work runs under ``jax.shard_map`` that is manual over
# the mesh's data axes (``sharding.data_axes``: "data", "fsdp") only; other axes ("tp") stay
# Auto inside, so XLA still partitions the model's forward over them. Each data shard:
#   1. all-gathers its params over the data axes that shard them (FSDP: one O(P) gather of
#      parameters, never of per-example gradients), tp sharding untouched;
#   2. computes its local sums sum_n w_n r(g_n) (chunked vmap, or the fused pass);
#   3. reduces them: psum over data axes that do not shard the leaf ("data"), psum_scatter over
#      those that do ("fsdp"), so every device ends with its own block of the sum.
# The result is constrained to the params' NamedShardings.


def _mesh_of(tree: PyTree) -> Mesh | None:
    """The mesh of the first leaf of ``tree`` that is a concrete array with a ``NamedSharding``."""
    for x in jax.tree.leaves(tree):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and not isinstance(x, jax.core.Tracer) and isinstance(s.mesh, Mesh):
            return s.mesh
    return None


def _placement(
    mesh: Mesh | None, params: PyTree, examples: PyTree, name: str
) -> tuple[Mesh | None, tuple[P, ...] | None]:
    """``(mesh, PartitionSpec per params leaf)`` of a call, or ``(None, None)`` (unsharded).

    ``mesh=None``: the mesh of the params' ``NamedSharding`` s, else of the first batch's;
    none found: unsharded. A params leaf with a ``NamedSharding`` on the mesh keeps its spec;
    any other leaf (host array, single-device array) is replicated (``P()``).

    Raises:
      TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
      ValueError: a params leaf sharded on a different mesh.
    """
    if mesh is None:
        mesh = _mesh_of(params) or _mesh_of(examples)
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
                    f"{name}: params leaf '{path}' is sharded on mesh {dict(s.mesh.shape)} "
                    f"({s.mesh.axis_names}), not on the mesh of this call {dict(mesh.shape)}; place the "
                    "params on one mesh (jaxunlearn.sharding.shard_params)"
                )
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
    """Inside the shard_map: the data-axis shards of a param leaf gathered (tiled); with ``vary``
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


def _pad_batch_for_mesh(
    examples: PyTree, weight: jax.Array, batch_key: jax.Array | None, mesh: Mesh
) -> dict[str, Any]:
    """``{"ex", "w", "key"}`` with rows padded to a multiple of the data-parallel size.

    Padding rows repeat the last row and have weight 0 (they contribute nothing); the
    per-example keys are those of the unpadded batch, ``fold_in(batch_key, n)``.
    """
    size = weight.shape[0]
    pad = -size % sh.data_parallel_size(mesh)
    return {
        "ex": jax.tree.map(lambda x: _pad_rows(jnp.asarray(x), pad), examples),
        "w": jnp.pad(weight, (0, pad)),
        "key": _example_keys(batch_key, size + pad),
    }


def _data_parallel_sums(
    local_fn: Callable[[PyTree, PyTree], tuple[PyTree, jax.Array]],
    mesh: Mesh,
    specs: tuple[P, ...],
    params: PyTree,
    data: PyTree,
    *,
    check_vma: bool = True,
) -> tuple[PyTree, jax.Array]:
    """Under ``jax.jit``: ``local_fn`` on each data shard of ``data``, sums reduced across shards.

    ``local_fn(params, data_shard) -> (sums like params, weight sum)``. ``data``'s leaves
    have a leading batch axis divisible by the data-parallel size (``None`` leaves allowed).
    ``jax.shard_map`` is manual over the mesh's data axes only; the result's leaves are
    constrained to ``NamedSharding(mesh, spec)``. Without data axes ``local_fn`` runs on the
    global arrays (XLA partitions it). ``check_vma=False`` for a ``local_fn`` whose code is not
    typed for manual axes (e.g. a ``lax.scan`` from an invariant zero carry, or a Pallas call);
    the params are then still gathered and the sums reduced explicitly, so nothing changes
    but the type checks.
    """
    axes = sh.data_axes(mesh)
    leaves, treedef = jax.tree.flatten(params)
    if not axes:
        return local_fn(params, data)
    manual = [_manual_spec(s, axes) for s in specs]

    def body(local_leaves, shard):
        full = [_gather_param(x, s, axes, check_vma) for x, s in zip(local_leaves, manual)]
        sums, wsum = local_fn(jax.tree.unflatten(treedef, full), shard)
        out = [_reduce_sum(x, s, axes) for x, s in zip(treedef.flatten_up_to(sums), manual)]
        return out, jax.lax.psum(wsum, axes)

    batch_spec = P(axes if len(axes) > 1 else axes[0])
    fn = jax.shard_map(body, mesh=mesh, in_specs=(manual, batch_spec), out_specs=(manual, P()),
                       axis_names=frozenset(axes), check_vma=check_vma)
    out, total = fn(leaves, data)
    return jax.tree.unflatten(treedef, out), total


def _add_sums(acc: PyTree, sums: PyTree | None, mesh: Mesh | None, specs: tuple[P, ...] | None) -> PyTree:
    """``acc + sums`` (``acc`` if ``sums`` is None), constrained to the params' shardings with a mesh."""
    out = acc if sums is None else jax.tree.map(jnp.add, acc, sums)
    if mesh is None:
        return out
    leaves, treedef = jax.tree.flatten(out)
    leaves = [jax.lax.with_sharding_constraint(x, NamedSharding(mesh, s)) for x, s in zip(leaves, specs)]
    return jax.tree.unflatten(treedef, leaves)


# ---------------------------------------------------------------- per-example accumulation


def _pad_rows(x: jax.Array, pad: int) -> jax.Array:
    if pad == 0:
        return x
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode="edge")


def _example_keys(batch_key: jax.Array | None, size: int) -> jax.Array | None:
    """``fold_in(batch_key, n)`` for ``n < size``: one key per example index (chunk/shard invariant)."""
    if batch_key is None:
        return None
    return jax.vmap(lambda i: jax.random.fold_in(batch_key, i))(jnp.arange(size, dtype=jnp.uint32))


def _chunked_sums(
    params: PyTree,
    data: Mapping[str, Any],
    *,
    loss_fn: LossFn,
    sample_fn: SampleFn | None,
    chunk_size: int,
    reduce: str,
) -> tuple[PyTree, jax.Array]:
    """``(sum_n w_n reduce(g_n), sum_n w_n)`` over the rows of ``data`` (``"ex"``, ``"w"``,
    optional ``"key"``), by a ``lax.scan`` over chunks of ``vmap(grad)``; float32 sums.

    Used on a whole batch (unsharded) and on one data shard inside ``jax.shard_map``.
    """
    examples, weight, keys = data["ex"], data["w"], data.get("key")
    size = weight.shape[0]
    n_chunks = -(-size // chunk_size)
    pad = n_chunks * chunk_size - size
    examples = jax.tree.map(lambda x: _pad_rows(jnp.asarray(x), pad), examples)
    weight = jnp.pad(weight, (0, pad))

    def chunked(x):
        return x.reshape((n_chunks, chunk_size) + x.shape[1:])

    xs: dict[str, Any] = {"ex": jax.tree.map(chunked, examples), "w": chunked(weight)}
    if sample_fn is not None:
        xs["key"] = chunked(_take_rows(keys, size + pad))

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

    acc, _ = jax.lax.scan(body, jt.zeros_like(params, dtype=jnp.float32), xs)
    return acc, jnp.sum(weight)


def _take_rows(x: jax.Array, n: int) -> jax.Array:
    """The first ``n`` rows of ``x``, repeating its last row past its end (works for key arrays)."""
    return jnp.take(x, jnp.minimum(jnp.arange(n), x.shape[0] - 1), axis=0)


@functools.partial(jax.jit, static_argnames=("loss_fn", "sample_fn", "chunk_size", "reduce", "mesh", "specs"))
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
    mesh: Mesh | None = None,
    specs: tuple[P, ...] | None = None,
) -> PyTree:
    """``(acc + sum_n w_n reduce(g_n), total + sum_n w_n)`` over one batch, by chunks;
    with ``mesh``, data-parallel over its data axes (:func:`_data_parallel_sums`)."""
    weight = jnp.asarray(weight).astype(jnp.float32)
    local = functools.partial(_chunked_sums, loss_fn=loss_fn, sample_fn=sample_fn, chunk_size=chunk_size,
                              reduce=reduce)
    if mesh is None:
        data = {"ex": examples, "w": weight, "key": _example_keys(batch_key, weight.shape[0])}
        sums, wsum = local(params, data)
    else:
        data = _pad_batch_for_mesh(examples, weight, batch_key, mesh)
        sums, wsum = _data_parallel_sums(local, mesh, specs, params, data)
    return _add_sums(acc, sums, mesh, specs), total + wsum


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
    mesh: Mesh | None = None,
) -> tuple[PyTree, jax.Array]:
    acc = total = specs = None
    for i, examples, weight in _iter_checked(batches, name):
        if i == 0:
            mesh, specs = _placement(mesh, params, examples, name)
            acc, total = _zeros_f32(params, mesh, specs)
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
            mesh=mesh,
            specs=specs,
        )
    return acc, total


def _zeros_f32(params: PyTree, mesh: Mesh | None = None, specs: tuple[P, ...] | None = None
               ) -> tuple[PyTree, jax.Array]:
    """Float32 zeros like ``params`` (placed by ``specs`` on ``mesh`` when given) and a zero total."""
    return _zeros_jit(params, mesh=mesh, specs=specs)


@functools.partial(jax.jit, static_argnames=("mesh", "specs"))
def _zeros_jit(params, *, mesh, specs):
    zeros = jt.zeros_like(params, dtype=jnp.float32)
    return _add_sums(zeros, None, mesh, specs), jnp.zeros((), jnp.float32)


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
      mesh: run data-parallel on this ``jax.sharding.Mesh`` (see "Sharded runs" in the
        module docstring); ``None``: the mesh the params (else the first batch) are
        sharded on, unsharded if they are not.

    Returns:
      A pytree like ``params`` with float32 leaves; with a mesh, each leaf has its
      parameter's ``NamedSharding`` (replicated for params not placed on the mesh).

    Raises:
      ValueError: empty ``batches``, batches with different keys or inconsistent batch
        sizes, zero total weight, unknown ``labels``/``method``, missing ``rng``/``sample_fn``,
        params sharded on a mesh other than ``mesh``.
      TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
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
                check_finite=check_finite, mesh=mesh,
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
        mesh=mesh,
    )
    return _finish(acc, total, "fisher_diagonal", check_finite)


def _grad_sums(params: PyTree, data: Mapping[str, Any], *, loss_fn: LossFn) -> tuple[PyTree, jax.Array]:
    """``(grad sum_n w_n l_n, sum_n w_n)`` over the rows of ``data`` (float32), one batch gradient.

    Rows of weight 0 are replaced by a row of positive weight (finite loss); if no row has a
    positive weight (a data shard of padding only), the gradient is zero.
    """
    weight = data["w"]
    examples = _valid_rows(data["ex"], weight)
    wsum = jnp.sum(weight)

    def total_loss(p):
        losses = jax.vmap(loss_fn, in_axes=(None, 0))(p, examples).astype(jnp.float32)
        return jnp.sum(weight * losses)

    g = jax.grad(total_loss)(params)
    return jax.tree.map(lambda x: jnp.where(wsum > 0, x.astype(jnp.float32), 0.0), g), wsum


@functools.partial(jax.jit, static_argnames=("loss_fn", "mesh", "specs"))
def _batch_grad_sum(acc, total, params, examples, weight, *, loss_fn, mesh=None, specs=None):
    """``(acc + grad sum_n w_n l_n, total + sum_n w_n)`` for one batch (data-parallel with ``mesh``)."""
    weight = jnp.asarray(weight).astype(jnp.float32)
    local = functools.partial(_grad_sums, loss_fn=loss_fn)
    if mesh is None:
        sums, wsum = local(params, {"ex": examples, "w": weight})
    else:
        data = _pad_batch_for_mesh(examples, weight, None, mesh)
        sums, wsum = _data_parallel_sums(local, mesh, specs, params, data)
    return _add_sums(acc, sums, mesh, specs), total + wsum


def _batch_grad_reduce(name, loss_fn, params, batches, mesh=None):
    acc = total = specs = None
    for i, examples, weight in _iter_checked(batches, name):
        if i == 0:
            mesh, specs = _placement(mesh, params, examples, name)
            acc, total = _zeros_f32(params, mesh, specs)
        acc, total = _batch_grad_sum(acc, total, params, examples, weight, loss_fn=loss_fn, mesh=mesh,
                                     specs=specs)
    return acc, total


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
    ``sum_n w_n l_n`` per batch (no per-example gradients). Rows of weight 0 are
    replaced by a row of positive weight before the forward pass, so padding never
    produces NaN.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``.
      params: pytree of floating-point arrays.
      batches: iterable of batches (see the module docstring).
      check_finite: raise ``FloatingPointError`` naming the first leaf with NaN/Inf.
      mesh: data-parallel mesh, as in :func:`fisher_diagonal` (each data shard takes the
        gradient of its rows; the sums are reduced across shards).

    Returns:
      A pytree like ``params`` with float32 leaves (with the params' shardings on a mesh).
    """
    _check_params(params, "mean_grad")
    acc, total = _batch_grad_reduce("mean_grad", loss_fn, params, batches, mesh)
    return _finish(acc, total, "mean_grad", check_finite)


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
            mesh=mesh,
        )
        return _finish(acc, total, "grad_importance", check_finite)
    acc, total = _batch_grad_reduce("grad_importance", loss_fn, params, batches, mesh)
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
