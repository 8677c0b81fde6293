"""Device meshes, partition rules for parameters, sharded batches and multi-host set-up.

The distributed engine is JAX itself: arrays carry ``NamedSharding`` s over a
``jax.sharding.Mesh`` and every transform of the library runs under ``jax.jit``,
where XLA's SPMD partitioner splits the work and inserts the collectives. This
module only decides *where* things live:

- :func:`make_mesh` builds a mesh from a spec such as ``"fsdp=4,tp=2"`` over the axes
  ``data`` (pure data parallelism: parameters replicated), ``fsdp`` (data parallelism
  with parameters sharded, "fully sharded data parallel") and ``tp`` (tensor
  parallelism: attention heads and the MLP hidden width split). Axes are ``Auto``
  (XLA chooses the layout of intermediates), not ``jax.make_mesh``'s default
  ``Explicit``.
- :func:`partition_rules` maps parameter paths of :mod:`jaxunlearn.models` (regular
  expressions on ``jaxunlearn.tree.path_str`` paths) to ``PartitionSpec`` s in the
  Megatron layout (Shoeybi et al., 2019): column-parallel ``q/k/v/gate/up``
  kernels ``(in, out) -> P("fsdp", "tp")``, row-parallel ``o/down`` kernels
  ``P("tp", "fsdp")``, vocabulary-parallel embedding and head; FSDP (Rajbhandari et
  al., "ZeRO", 2020) shards the other large dimension.
- :func:`param_specs` / :func:`param_shardings` / :func:`shard_params` apply the
  rules; a dimension that its mesh axes do not divide falls back to replication,
  with one ``warnings.warn`` per tensor naming it.
- :func:`shardings_like_params` / :func:`shard_like_params` place any pytree that
  contains parameter-shaped leaves (Fisher, task vectors, optimizer state, run
  state) like the parameters, matching leaves by path suffix and shape;
  :func:`init_opt_state` creates an optax state directly in place.
- :func:`batch_sharding` / :func:`shard_batch`: the batch axis over the data-parallel
  axes ``("data", "fsdp")`` (multi-process runs: :mod:`jaxunlearn.multihost`);
  :mod:`jaxunlearn.placement` places a run's batches and state on the mesh it resolves.
- :func:`sharded_orthogonal_projection`: the projection core
  (:func:`jaxunlearn.projection.project_tree`) run per shard under ``jax.shard_map``, the
  ``k x k`` Gram matrix and the ``k`` dot products ``psum`` -ed across shards.

Example (8 devices, e.g. ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` on a CPU):
  >>> mesh = make_mesh("fsdp=4,tp=2")
  >>> params = shard_params({"layers": {"0": {"mlp": {"up_proj": {"kernel": jnp.ones((16, 32))}}}}}, mesh)
  >>> params["layers"]["0"]["mlp"]["up_proj"]["kernel"].sharding.spec     # by the default rules
  P('fsdp', 'tp')
  >>> batch = shard_batch({"x": jnp.ones((8, 3))}, mesh)                  # rows over ("fsdp",)
  >>> loss = lambda p, ex: jnp.sum(p["layers"]["0"]["mlp"]["up_proj"]["kernel"] * ex["x"].sum())
  >>> fisher = ju.fisher_diagonal(loss, params, [batch])                  # runs sharded
  >>> fisher["layers"]["0"]["mlp"]["up_proj"]["kernel"].sharding.spec, float(fisher["layers"]["0"]["mlp"]["up_proj"]["kernel"][0, 0])
  (P('fsdp', 'tp'), 9.0)
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxunlearn import tree as jt
from jaxunlearn.projection import DEFAULT_RCOND, project_tree_on_mesh, stack_retain_grads

PyTree = Any
Rules = Sequence[tuple[str, P]]

__all__ = [
    "AXIS_NAMES",
    "DATA_AXES",
    "parse_mesh_spec",
    "make_mesh",
    "partition_rules",
    "param_specs",
    "param_shardings",
    "shard_params",
    "shardings_like_params",
    "shard_like_params",
    "opt_state_shardings",
    "init_opt_state",
    "data_axes",
    "data_parallel_size",
    "batch_sharding",
    "check_batch_rows",
    "shard_batch",
    "sharded_orthogonal_projection",
]

AXIS_NAMES = ("data", "fsdp", "tp")
"""Mesh axis names understood by the rules, in the device order of :func:`make_mesh`
(``tp`` innermost: neighbouring devices, the fastest links, share a tensor-parallel group)."""

DATA_AXES = ("data", "fsdp")
"""The axes the batch is split over (both are data-parallel; ``fsdp`` also shards params)."""


# ---------------------------------------------------------------- meshes


def parse_mesh_spec(spec: str | Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Parse a mesh spec into ``{axis: size}`` in the canonical order of :data:`AXIS_NAMES`.

    ``"fsdp=4,tp=2"`` or ``{"fsdp": 4, "tp": 2}``; one size may be ``-1``, meaning
    ``num_devices // (product of the others)``. The product must equal ``num_devices``.

    Args:
      spec: the spec string (``axis=size`` pairs separated by commas) or a mapping.
      num_devices: the number of devices the mesh must cover.

    Returns:
      ``{axis: size}`` ordered ``data, fsdp, tp`` (absent axes omitted).

    Raises:
      ValueError: an empty spec, a malformed pair, an unknown or repeated axis, a size
        that is not a positive int (or ``-1``), more than one ``-1``, or a product that
        does not equal ``num_devices`` (the message names both).
    """
    if isinstance(spec, str):
        pairs = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, size = part.partition("=")
            if not sep:
                raise ValueError(f"mesh spec {spec!r}: {part!r} is not of the form axis=size (e.g. 'fsdp=4,tp=2')")
            try:
                value = int(size.strip())
            except ValueError:
                raise ValueError(f"mesh spec {spec!r}: size {size.strip()!r} of axis {name.strip()!r} "
                                 "is not an integer") from None
            pairs.append((name.strip(), value))
    elif isinstance(spec, Mapping):
        pairs = list(spec.items())
    else:
        raise TypeError(f"mesh spec must be a string like 'fsdp=4,tp=2' or a dict, got {type(spec).__name__}")
    if not pairs:
        raise ValueError(f"mesh spec {spec!r} names no axis; e.g. 'fsdp=-1' or 'fsdp=4,tp=2'")
    sizes: dict[str, int] = {}
    for name, value in pairs:
        if name not in AXIS_NAMES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {AXIS_NAMES}")
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} appears twice")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (value < 1 and value != -1):
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} has size {value!r}; need a positive int or -1")
        sizes[name] = int(value)
    rest = [n for n, v in sizes.items() if v == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {rest}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if rest:
        if num_devices % known:
            raise ValueError(f"mesh spec {spec!r}: the other axes multiply to {known}, which does not divide "
                             f"the {num_devices} devices, so axis {rest[0]!r}=-1 has no integer size")
        sizes[rest[0]] = num_devices // known
    total = math.prod(sizes.values())
    if total != num_devices:
        raise ValueError(f"mesh spec {spec!r} has {total} devices in all ({sizes}) but there are "
                         f"{num_devices} devices; the product of the axis sizes must equal the device count")
    return {n: sizes[n] for n in AXIS_NAMES if n in sizes}


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A ``jax.sharding.Mesh`` over ``devices`` (default: all, ``jax.devices()``) from a spec.

    Built by ``jax.make_mesh`` (topology-aware device order) with every axis of type
    ``AxisType.Auto``, so jitted code needs no ``out_sharding`` annotations.

    Args:
      spec: see :func:`parse_mesh_spec`, e.g. ``"fsdp=4,tp=2"``, ``"data=2,fsdp=-1"``.
      devices: the devices (default: every device of every process).

    Returns:
      The mesh, axes in the order ``data, fsdp, tp``.

    Raises:
      ValueError: as :func:`parse_mesh_spec` (a product that is not the device count); or the
        axis sizes cannot be laid onto the devices' physical torus (TPU: each axis must be a
        product of some of the slice's physical dimensions, e.g. ``fsdp=16,tp=4`` on a
        ``4x4x4`` v5p slice, not ``fsdp=32,tp=2``).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: no devices")
    sizes = parse_mesh_spec(spec, len(devices))
    names = tuple(sizes)
    try:
        return jax.make_mesh(tuple(sizes.values()), names, axis_types=(AxisType.Auto,) * len(names),
                             devices=devices)
    except NotImplementedError as e:  # jax's mesh_utils: no assignment of the axes to the physical torus
        raise ValueError(f"make_mesh: the mesh {sizes} cannot be laid onto the physical topology of these "
                         f"{len(devices)} {devices[0].platform} devices: each axis size must be a product of "
                         f"some of the physical dimensions (e.g. on a 4x4x4 slice fsdp=16,tp=4, not "
                         f"fsdp=32,tp=2). JAX said: {e}") from e


# ---------------------------------------------------------------- partition rules


def partition_rules(*, fsdp_axis: str = "fsdp", tp_axis: str = "tp") -> list[tuple[str, P]]:
    """Default partition rules for :class:`jaxunlearn.models.Decoder` parameters.

    An ordered list of ``(regex, PartitionSpec)``; the first regex that
    ``re.search`` es a leaf's path wins (see :func:`param_specs`). Dense kernels are
    ``(in, out)``:

    ==================================  ===================  =============================
    path                                spec                 why
    ==================================  ===================  =============================
    ``embed/embedding`` (V, D)          ``((tp, fsdp), -)``  vocabulary-parallel rows (1)
    ``attn/{q,k,v}_proj/kernel``        ``(fsdp, tp)``       column parallel: heads on tp
    ``attn/{q,k,v}_proj/bias``          ``(tp,)``            follows the output columns
    ``attn/o_proj/kernel``              ``(tp, fsdp)``       row parallel: heads on tp
    ``mlp/{gate,up}_proj/kernel``       ``(fsdp, tp)``       column parallel: hidden on tp
    ``mlp/{gate,up}_proj/bias``         ``(tp,)``
    ``mlp/down_proj/kernel``            ``(tp, fsdp)``       row parallel
    ``lm_head/kernel`` (D, V)           ``(fsdp, tp)``       vocabulary-parallel columns
    everything else (norm scales, o/down biases)  replicated
    ==================================  ===================  =============================

    Stacked blocks (``ModelConfig(scan_layers=True)``: ``layers/attn/q_proj/kernel`` is
    ``(L, in, out)``, no layer index in the path) get the same spec behind a leading ``None``,
    e.g. ``P(None, fsdp, tp)``: the layer axis is never sharded (the scan slices it).

    (1) The rows are split over tp and fsdp together and the hidden dimension is kept whole:
    with ``(tp, fsdp)`` the lookup's output came out hidden-sharded over fsdp while the
    batch is sharded over data and fsdp, and XLA re-sharded that activation by a full
    rematerialisation ("Involuntary full rematerialization") on meshes with a data axis.

    Axis names absent from the mesh are dropped when the rules are applied, so the
    same rules serve ``fsdp=8`` (FSDP only), ``tp=8`` and ``fsdp=4,tp=2``; the
    ``data`` axis never shards parameters (pure data parallelism).

    Args:
      fsdp_axis: the mesh axis for FSDP sharding.
      tp_axis: the mesh axis for tensor parallelism.

    Returns:
      The rules, ending with a catch-all ``(".*", P())``.

    References:
      Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language Models
      Using Model Parallelism", 2019. Rajbhandari et al., "ZeRO: Memory Optimizations
      Toward Training Trillion Parameter Models", 2020.
    """
    f, t = fsdp_axis, tp_axis
    block = [
        (r"attn/(q|k|v)_proj/kernel$", P(f, t)),
        (r"attn/(q|k|v)_proj/bias$", P(t)),
        (r"attn/o_proj/kernel$", P(t, f)),
        (r"mlp/(gate|up)_proj/kernel$", P(f, t)),
        (r"mlp/(gate|up)_proj/bias$", P(t)),
        (r"mlp/down_proj/kernel$", P(t, f)),
    ]
    return [
        (r"(^|/)embed/embedding$", P((t, f), None)),
        *[(r"(^|/)layers/" + pat, P(None, *spec)) for pat, spec in block],  # stacked: layer axis first
        *[(r"(^|/)" + pat, spec) for pat, spec in block],
        (r"(^|/)lm_head/kernel$", P(f, t)),
        (r".*", P()),
    ]


def _entry_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh, path: str) -> P:
    """``spec`` restricted to ``mesh``'s axes, with undivisible dimensions replicated (one warning)."""
    entries = tuple(spec)
    if len(entries) > len(shape):
        raise ValueError(f"partition rule {spec} for '{path}' has {len(entries)} entries but the array has "
                         f"shape {shape} ({len(shape)} dims)")
    used: set[str] = set()
    out, dropped = [], []
    for dim, entry in enumerate(entries):
        axes = tuple(a for a in _entry_axes(entry) if a in mesh.shape)
        for a in axes:
            if a in used:
                raise ValueError(f"partition rule {spec} for '{path}' uses mesh axis {a!r} twice")
            used.add(a)
        size = math.prod(mesh.shape[a] for a in axes)
        if axes and shape[dim] % size:
            dropped.append(f"dim {dim} (size {shape[dim]}) by {axes} ({size} shards)")
            axes = ()
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    if dropped:
        warnings.warn(f"sharding: '{path}' with shape {shape} cannot be split along " + "; ".join(dropped)
                      + ": those dimensions are replicated", stacklevel=3)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _match(rules: Rules, path: str) -> P:
    for pattern, spec in rules:
        if re.search(pattern, path):
            return spec
    raise ValueError(f"no partition rule matches parameter '{path}'; add a catch-all (r'.*', PartitionSpec()) "
                     "to replicate unmatched parameters")


def _check_rules(rules: Rules) -> list[tuple[str, P]]:
    out = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
                and isinstance(rule[1], P)):
            raise TypeError(f"partition rule {i} must be a (regex, PartitionSpec) pair, got {rule!r}")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"partition rule {i}: invalid regex {rule[0]!r}: {e}") from None
        out.append((rule[0], rule[1]))
    return out


def _is_spec(x) -> bool:
    return isinstance(x, P)


def param_specs(params: PyTree, mesh: Mesh, rules: Rules | None = None) -> PyTree:
    """The ``PartitionSpec`` of every parameter: the first matching rule, fitted to ``mesh``.

    For each leaf with path ``p`` (``jaxunlearn.tree.path_str``), the spec of the first
    ``(regex, spec)`` with ``re.search(regex, p)`` is taken; mesh axes the mesh does not
    have are dropped; a dimension not divisible by the product of its mesh axes is
    replicated instead, and a warning names the tensor (once per tensor); scalars are
    replicated.

    Args:
      params: pytree of arrays or ``jax.ShapeDtypeStruct`` (an ``nnx.State``, a dict).
      mesh: the device mesh.
      rules: ordered ``(regex, PartitionSpec)`` pairs; default :func:`partition_rules`.

    Returns:
      A pytree like ``params`` with ``PartitionSpec`` leaves.

    Raises:
      ValueError: a leaf no rule matches, a spec with more entries than the leaf has
        dimensions or using a mesh axis twice, an invalid regex.
    """
    rules = _check_rules(partition_rules() if rules is None else rules)
    jt.check_nonempty(params, "params")

    def one(path, x):
        name = jt.path_str(path)
        shape = tuple(np.shape(x))
        if not shape:
            return P()
        return _fit_spec(_match(rules, name), shape, mesh, name)

    return jax.tree_util.tree_map_with_path(one, params)


def _to_shardings(specs: PyTree, mesh: Mesh) -> PyTree:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def param_shardings(params: PyTree, mesh: Mesh, rules: Rules | None = None) -> PyTree:
    """``NamedSharding`` s of :func:`param_specs` (for ``jax.jit(in_shardings=..., out_shardings=...)``)."""
    return _to_shardings(param_specs(params, mesh, rules), mesh)


def shard_params(params: PyTree, mesh: Mesh, rules: Rules | None = None) -> PyTree:
    """Place ``params`` on ``mesh`` by the rules: ``jax.device_put`` with :func:`param_shardings`.

    In a multi-process run every process must pass the same values (e.g. the same
    initialisation seed, or the same checkpoint).
    """
    return jax.device_put(params, param_shardings(params, mesh, rules))


# ---------------------------------------------------------------- trees shaped like params


def _suffix_match(path: str, shape: tuple[int, ...], by_path: dict[str, tuple[tuple[int, ...], P]]) -> P:
    """The spec of the parameter whose path is the longest '/'-suffix of ``path`` with the same shape."""
    parts = path.split("/")
    for i in range(len(parts)):
        hit = by_path.get("/".join(parts[i:]))
        if hit is not None and hit[0] == shape:
            return hit[1]
    return P()


def shardings_like_params(tree: PyTree, params: PyTree, mesh: Mesh, rules: Rules | None = None) -> PyTree:
    """``NamedSharding`` s for a pytree whose leaves include copies of the parameters.

    A leaf of ``tree`` at path ``q`` gets the spec of parameter ``p`` when ``p`` is a
    ``/``-suffix of ``q`` (or equal) and the shapes agree: the Fisher or a task vector
    (same paths), an optax state (``0/mu/layers/0/attn/q_proj/kernel`` holds Adam's first
    moment of ``layers/0/attn/q_proj/kernel``), a run state (``params/...``). Every other
    leaf (step counters, scalars, anything not shaped like its parameter) is replicated.

    Args:
      tree: pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).
      params: the parameters (arrays or ``ShapeDtypeStruct``).
      mesh: the mesh.
      rules: as in :func:`param_specs`.

    Returns:
      A pytree like ``tree`` of ``NamedSharding``.
    """
    specs = param_specs(params, mesh, rules)
    by_path = {p: (tuple(np.shape(x)), s) for (p, x), (_, s) in
               zip(jt.leaves_with_paths(params), jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)[0])}
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, _suffix_match(jt.path_str(path), tuple(np.shape(x)), by_path)), tree)


def shard_like_params(tree: PyTree, params: PyTree, mesh: Mesh, rules: Rules | None = None) -> PyTree:
    """``jax.device_put(tree, shardings_like_params(tree, params, mesh, rules))``.

    Use it for the Fisher, task vectors, PerTA weights, an optimizer state or a run state.
    """
    return jax.device_put(tree, shardings_like_params(tree, params, mesh, rules))


def opt_state_shardings(tx: optax.GradientTransformation, params: PyTree, mesh: Mesh,
                        rules: Rules | None = None) -> PyTree:
    """Shardings of ``tx.init(params)``, from its abstract shape (``jax.eval_shape``, nothing allocated)."""
    return shardings_like_params(jax.eval_shape(tx.init, params), params, mesh, rules)


def init_opt_state(tx: optax.GradientTransformation, params: PyTree, mesh: Mesh,
                   rules: Rules | None = None) -> PyTree:
    """``tx.init(params)`` computed under ``jax.jit`` with :func:`opt_state_shardings` as output
    shardings, so moments are created sharded (never materialised on one device)."""
    return jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, mesh, rules))(params)


# ---------------------------------------------------------------- batches


def data_axes(mesh: Mesh) -> tuple[str, ...]:
    """The data-parallel axes of ``mesh`` (those of :data:`DATA_AXES` it has), in mesh order."""
    return tuple(a for a in mesh.axis_names if a in DATA_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards: the product of the sizes of :func:`data_axes`."""
    return math.prod(mesh.shape[a] for a in data_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """``NamedSharding(mesh, P(("data", "fsdp")))``: the leading (batch) axis split over the
    data-parallel axes the mesh has, other axes replicated (replicated if it has none)."""
    axes = data_axes(mesh)
    if not axes:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))


def check_batch_rows(batch: PyTree, per: int, name: str) -> None:
    """Raise ``ValueError`` (prefixed ``name``) for a batch without arrays, a scalar leaf, or a leaf
    whose row count ``per`` (the batch shards) does not divide, naming the leaf."""
    leaves = jt.leaves_with_paths(batch)
    if not leaves:
        raise ValueError(f"{name}: the batch has no arrays")
    for path, x in leaves:
        shape = np.shape(x)
        if not shape:
            raise ValueError(f"{name}: '{path}' is a scalar; every batch array needs a leading batch axis")
        if shape[0] % per:
            raise ValueError(f"{name}: '{path}' has {shape[0]} rows, not divisible by {per} (the batch "
                             "shards of the mesh's data-parallel axes)")


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Place a (global, host-side) batch with its rows split over the data-parallel axes.

    Args:
      batch: pytree of arrays with a leading batch axis (e.g. ``input_ids``,
        ``attention_mask``, ``loss_mask``).
      mesh: the mesh.

    Returns:
      The batch as ``jax.Array`` s with :func:`batch_sharding`.

    Raises:
      ValueError: a scalar leaf, or a batch size not divisible by :func:`data_parallel_size`.
    """
    check_batch_rows(batch, data_parallel_size(mesh), "shard_batch")
    return jax.device_put(batch, batch_sharding(mesh))


# ---------------------------------------------------------------- sharded projection


def sharded_orthogonal_projection(
    g: PyTree,
    retain_grads: PyTree,
    mesh: Mesh,
    specs: PyTree | None = None,
    *,
    rules: Rules | None = None,
    per_tensor: bool = False,
    rcond: float = DEFAULT_RCOND,
    impl: str = "auto",
) -> PyTree:
    """``g - R^T (R R^T)^+ R g`` with the projection core run per shard under ``jax.shard_map``.

    The same result as :func:`jaxunlearn.orthogonal_projection` (global or per-tensor
    subspace, the same rank rule and row scaling), computed where the shards live: the core
    :func:`jaxunlearn.projection.project_tree` runs on each device's shards with
    ``axis_name`` set, leaf by leaf, to exactly the mesh axes that leaf is split on, so its
    partial Gram ``R_s R_s^T`` and dots ``R_s g_s`` (and the row maxima of the scaling) are
    reduced over those axes only (a replicated leaf is not summed, so it is not counted
    twice); the ``k x k`` solve runs replicated, and ``g_s - R_s^T c`` is local. With ``g``
    and ``retain_grads`` already placed by ``specs`` (inputs placed otherwise are resharded
    first), no parameter-sized array crosses devices: only ``k x k + k`` floats per group of
    leaves (:func:`jaxunlearn.projection.project_tree_on_mesh`, with ``specs`` defaulting to the
    partition rules). Each call traces a new ``shard_map``: jit the caller for a loop.

    Args:
      g: the update pytree, float32/bfloat16 leaves (other float dtypes with ``impl="auto"``
        or ``"jnp"``).
      retain_grads: stacked retain gradients, leaves ``(k, *g_leaf.shape)``, or a list of k
        pytrees shaped like ``g``.
      mesh: the mesh.
      specs: ``PartitionSpec`` of each ``g`` leaf (default :func:`param_specs` of ``g``
        by ``rules``); the retain leaves get ``P(None, *spec)``.
      rules: partition rules when ``specs`` is None.
      per_tensor: a separate subspace per leaf.
      rcond: relative eigenvalue threshold of the Gram pseudo-inverse.
      impl: the core's path (``"auto"``, ``"xla"``, ``"pallas"``, ``"reference"``, ``"jnp"``).

    Returns:
      ``g_perp`` like ``g``, sharded by ``specs``.

    Raises:
      ValueError: mismatched trees or shapes (naming the path), as the core.
    """
    retain_grads, _ = stack_retain_grads(g, retain_grads)
    if specs is None:
        specs = param_specs(g, mesh, rules)
    return project_tree_on_mesh(g, retain_grads, mesh, specs, rcond=rcond, per_tensor=per_tensor, impl=impl)


def jit_keeping_state_sharding(step, *, donate_state: bool = True):
    """``jax.jit(step)`` whose output state keeps the input state's shardings.

    ``step(state, *args) -> (state, aux)``. Without ``out_shardings`` XLA may pick a new
    layout for some state leaves (e.g. replicated norm scales come back sharded), and the
    next call then recompiles for the new input shardings. This wrapper compiles once per
    distinct input-state sharding, with ``out_shardings=(those shardings, None)``, so the
    state's placement is a fixed point of the loop.

    Args:
      step: the pure step function.
      donate_state: donate the state buffers (argument 0).

    Returns:
      A callable with ``step``'s signature.
    """
    cache: dict = {}

    def shardings_of(state):
        # only mesh shardings are pinned; single-device leaves (a fresh optimizer count) and host
        # values stay unconstrained (None), so XLA places them next to the sharded ones.
        return jax.tree.map(lambda x: x.sharding if isinstance(getattr(x, "sharding", None), NamedSharding)
                            else None, state)

    def run(state, *args):
        sh = shardings_of(state)
        leaves, treedef = jax.tree.flatten(sh, is_leaf=lambda x: x is None)
        key = (treedef, tuple(leaves))
        if key not in cache:
            if all(s is None for s in leaves):
                cache[key] = jax.jit(step, donate_argnums=0 if donate_state else ())
            else:
                cache[key] = jax.jit(step, donate_argnums=0 if donate_state else (), out_shardings=(sh, None))
        return cache[key](state, *args)

    run.compiled_variants = cache  # for inspection: one entry per distinct input-state sharding
    return run
