"""Orthogonal projection of an update away from the span of retain gradients (GU, PCGrad).

Let ``g`` be the forget update (a pytree, raveled: a vector of P entries) and ``R`` the
``k x P`` matrix whose rows ``r_j`` are k retain gradients. The retain loss is unchanged to
first order by a step along ``u`` iff ``R u = 0``; the closest such ``u`` to ``g`` is

    g_perp = g - R^T (R R^T)^+ R g,

the orthogonal projection onto the complement of ``span(r_1, ..., r_k)``: the update of
geometric-disentanglement unlearning (GU), which projects the forget gradient away from the
retain gradients so that the retain loss is unchanged to first order, and, applied only where
the two conflict, PCGrad's gradient surgery. It is computed from the ``k x k`` Gram matrix
(never a ``P x P`` matrix) in passes over P: ``G = R R^T`` and ``b = R g`` (one pass), then
``g - R^T c`` with ``c = G^+ b``. The subspace is global (one ``c``) or, with
``per_tensor``, one per leaf (``c_l = G_l^+ b_l``, one batched ``eigh``).

One core, :func:`project_tree`, serves every caller: :func:`orthogonal_projection`, the
optax transform :func:`project_orthogonal`, and :func:`project_tree_on_mesh` (used by
:func:`jaxunlearn.sharding.sharded_orthogonal_projection` and by ``project_orthogonal(mesh=...)``),
which runs it per shard inside ``jax.shard_map`` with ``axis_name`` naming, leaf by leaf, the
mesh axes to reduce over.

Pseudo-inverse: :func:`jaxunlearn.kernels.solve.pinv_solve`, the library's single rank rule.
The Gram is row-normalised to the cosine matrix ``S G S`` (``S = diag(1/||r_j||)``, 0 for a
zero row), eigenvalues ``<= rcond * max`` are dropped and ``c = S (S G S)^+ S b``: the exact
projector onto the span of the directions kept, decided by the angles between the retain
gradients only (norms differing 1000x are all kept). Duplicated, dependent or zero retain
gradients give no NaN; all-zero ones leave ``g`` unchanged. Sums are accumulated in
float32; results have ``g``'s dtypes. Directions kept with an eigenvalue near ``rcond =
1e-6`` are accurate to a few 1e-3 (float32 resolves the cosine Gram to ~``1e-7 k``): raise
``rcond`` (e.g. ``1e-4``) when nearly dependent retain gradients must be exact.

Row scaling: before the Gram, every retain gradient is multiplied by the power of two
bringing its largest entry to ``[0.5, 1)`` (:func:`jaxunlearn.kernels.solve.pow2_row_scales`;
per leaf with ``per_tensor``; row maxima ``pmax`` -ed over ``axis_name``). It is exact and
the projection is invariant to it (``span(S R) = span(R)``), so retain gradients of norm
``1e-19`` or ``1e19`` (a float32 Gram under/overflows) are projected like unit ones.

Paths (``impl``): ``"auto"`` runs the passes on the array kernels of
:mod:`jaxunlearn.kernels.projection` (Pallas on TPU/GPU, fused XLA on CPU; a leaf shorter
than ``k`` by XLA), falling back to ``"jnp"`` where they do not apply (leaves other than
float32/bfloat16, or an unsharded global subspace with ``k > P``); ``"pallas"``, ``"xla"``
(and, in :func:`project_tree`, ``"reference"``) force a kernel path; ``"jnp"`` is the pure
pytree reference (``tensordot`` per leaf at ``Precision.HIGHEST``, no reshapes, so sharded
leaves stay sharded); a callable is a user-supplied core. Retain gradients are *stacked*
(leaves ``(k, *g_leaf.shape)``) or, for :func:`orthogonal_projection` and
:func:`project_orthogonal`, a *list/tuple of k pytrees* shaped like ``g``.

References:
  Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning"
  (PCGrad), NeurIPS 2020. Farajtabar, Azizan, Mott, Li, "Orthogonal Gradient Descent for
  Continual Learning", AISTATS 2020.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunlearn import tree as jt
from jaxunlearn.kernels import projection as kp
from jaxunlearn.projection_passes import HIGHEST, f32, project_leaves, project_leaves_jit

PyTree = Any
ProjectionCore = Callable[..., PyTree]
AxisNames = str | tuple[str, ...] | None

__all__ = [
    "DEFAULT_RCOND",
    "METRICS",
    "ProjectOrthogonalState",
    "gram_pinv_coefficients",
    "orthogonal_projection",
    "project_orthogonal",
    "project_tree",
    "project_tree_on_mesh",
    "stack_retain_grads",
]

METRICS = ("euclidean", "adam")
_METRICS = METRICS
_IMPLS = ("auto", "pallas", "xla", "jnp")  # orthogonal_projection / project_orthogonal
_CORE_IMPLS = _IMPLS + ("reference",)  # project_tree: every kernel path too
_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
DEFAULT_RCOND = kp.DEFAULT_RCOND

gram_pinv_coefficients = kp.pinv_solve
"""Coefficients ``c = G^+ b`` of the projection from the k x k Gram matrix: an alias of
:func:`jaxunlearn.kernels.solve.pinv_solve` (angle-based rank rule, see the module
docstring)."""


# ---------------------------------------------------------------- inputs


def _check_stacked(g: PyTree, retain: PyTree) -> int:
    """``k`` of stacked retain gradients after checking them against ``g`` (``ValueError``
    naming the path of the first mismatch)."""
    jt.check_nonempty(g, "updates")
    jt.check_same_structure(g, retain, ("updates", "retain_grads"))
    ks = {}
    for (p, x), (_, r) in zip(jt.leaves_with_paths(g), jt.leaves_with_paths(retain)):
        gs, rs = tuple(jnp.shape(x)), tuple(jnp.shape(r))
        if len(rs) != len(gs) + 1 or rs[1:] != gs:
            raise ValueError(f"retain_grads leaf '{p}' must have shape (k, *{gs}) (a leading k axis over "
                             f"the update's shape); got {rs}")
        ks[p] = rs[0]
    if len(set(ks.values())) != 1:
        raise ValueError(f"retain_grads leaves disagree on k (need the same leading k on every leaf): {ks}")
    k = next(iter(ks.values()))
    if k == 0:
        raise ValueError("retain_grads holds k = 0 retain gradients")
    return int(k)


def stack_retain_grads(g: PyTree, retain_grads: PyTree | list | tuple) -> tuple[PyTree, int]:
    """Bring retain gradients to the stacked form and check them against ``g``.

    Args:
      g: the update pytree.
      retain_grads: a pytree with ``g``'s structure whose leaves have shape
        ``(k, *g_leaf.shape)``, or a list/tuple of k pytrees shaped like ``g``.

    Returns:
      ``(stacked, k)``: the stacked pytree and the number of retain gradients.

    Raises:
      ValueError: naming the path of a structure or shape mismatch, an empty list,
        k = 0, or leaves that disagree on k.
    """
    jt.check_nonempty(g, "updates")
    if jax.tree_util.tree_structure(retain_grads) != jax.tree_util.tree_structure(g):
        if not isinstance(retain_grads, (list, tuple)):
            jt.check_same_structure(g, retain_grads, ("updates", "retain_grads"))
        if len(retain_grads) == 0:
            raise ValueError("retain_grads is an empty list: need at least one retain gradient")
        for j, r in enumerate(retain_grads):
            jt.check_same_shapes(g, r, ("updates", f"retain_grads[{j}]"))
        retain_grads = jax.tree.map(
            lambda *xs: jnp.stack([jnp.asarray(x).astype(jnp.result_type(xs[0])) for x in xs]),
            *retain_grads,
        )
    return retain_grads, _check_stacked(g, retain_grads)


def _check_rcond(rcond: float) -> float:
    if not (isinstance(rcond, (int, float, np.floating)) and 0.0 <= float(rcond) < 1.0):
        raise ValueError(f"rcond must be a float in [0, 1), got {rcond!r}")
    return float(rcond)


def _check_impl(impl: str | ProjectionCore, allowed: tuple[str, ...] = _IMPLS) -> str | ProjectionCore:
    if callable(impl) or impl in allowed:
        return impl
    raise ValueError(f"unknown projection impl {impl!r}; expected one of {allowed} or a callable "
                     "core(g, retain_stacked, *, rcond) -> g_perp")


def _normalise_axes(axis_name: AxisNames | list[AxisNames], n_leaves: int) -> tuple[tuple[str, ...], ...]:
    """One tuple of mesh axis names per leaf (``()``: nothing to reduce over)."""

    def one(a) -> tuple[str, ...]:
        if a is None:
            return ()
        if isinstance(a, str):
            return (a,)
        if isinstance(a, tuple) and all(isinstance(x, str) for x in a):
            return a
        raise ValueError(f"axis_name entries must be None, a mesh axis name or a tuple of names; got {a!r}")

    if isinstance(axis_name, list):
        if len(axis_name) != n_leaves:
            raise ValueError(f"axis_name lists {len(axis_name)} entries for {n_leaves} leaves (one per leaf)")
        return tuple(one(a) for a in axis_name)
    return (one(axis_name),) * n_leaves


def _kernel_refusal(g: PyTree, retain: PyTree, k: int, any_k: bool) -> Exception | None:
    """Why the kernel paths cannot take these inputs (static, at trace time), or None: a leaf
    other than float32/bfloat16, or ``k > P`` unless ``any_k`` (per-tensor or sharded)."""
    for name, tree in (("updates", g), ("retain_grads", retain)):
        for p, x in jt.leaves_with_paths(tree):
            if (dt := jnp.dtype(jnp.result_type(x))) not in _KERNEL_DTYPES:
                return TypeError(f"{name} leaf '{p}' has dtype {dt}; only float32 and bfloat16 are supported "
                                 "by the kernels (use impl='jnp' or 'auto')")
    if not any_k and k > jt.size(g):
        return ValueError(f"k = {k} retain gradients exceed the number of parameters P = {jt.size(g)} (a "
                          "global subspace with k > P is the whole space; use impl='jnp' or 'auto')")
    return None


def project_tree(
    g: PyTree,
    retain_grads: PyTree,
    *,
    rcond: float = DEFAULT_RCOND,
    per_tensor: bool = False,
    impl: str | ProjectionCore = "auto",
    axis_name: AxisNames | list[AxisNames] = None,
    block_p: int | None = None,
    interpret: bool | None = None,
) -> PyTree:
    """Project ``g`` onto the orthogonal complement of ``k`` stacked retain gradients: the core.

    Contract (every step leaf by leaf; the ``k x P`` ravel ``R`` is never formed)::

        s = pow2_row_scales(max_l max |r_{i,l}|)   (k,), powers of two (pmax over axis_name)
        G = sum_l S R_l R_l^T S                    (k, k), float32 (psum over axis_name)
        d = sum_l S R_l g_l                        (k,),   float32, same pass
        c = pinv_solve(G, d, rcond)                cosine-Gram eigh, angle-based rank rule
        out_l = g_l - (S R_l)^T c                  in g_l's dtype

    so ``out = g - R^T (R R^T)^+ R g`` (row ``i`` of ``R``: retain gradient ``i`` raveled over
    all leaves). With ``per_tensor`` every leaf has its own scales, ``G_l``, ``d_l``, ``c_l``
    (one batched ``eigh``). ``<out, r_i> = 0`` for every kept direction (to float32 round-off
    relative to ``||g|| ||r_i||``; per leaf with ``per_tensor``); idempotent; ``k = 1`` gives
    ``g - (<g, r>/||r||^2) r``; all-zero ``R`` returns ``g``; no NaN (module docstring).

    Inside ``jax.shard_map`` with leaves split over mesh axes, ``axis_name`` names them: the
    row maxima are ``pmax`` -ed and the partial Gram and dots ``psum`` -ed over a leaf's axes
    (a replicated leaf, ``()``, is not summed, so it is not counted twice) before the
    replicated ``k x k`` solve; ``g_l - R_l^T c`` stays local.

    Args:
      g: the update pytree (float leaves; float32/bfloat16 for the kernel paths).
      retain_grads: same structure, each leaf ``(k, *g_leaf.shape)``: ``k`` retain gradients
        stacked on a leading axis (see :func:`stack_retain_grads` for a list of pytrees).
      rcond: relative eigenvalue cut-off of :func:`jaxunlearn.kernels.solve.pinv_solve`.
      per_tensor: a separate subspace per leaf instead of one global subspace.
      impl: ``"auto"``, ``"pallas"``, ``"xla"``, ``"reference"`` (the passes on the array
        kernels of :mod:`jaxunlearn.kernels.projection`; ``"auto"`` falls back to ``"jnp"``
        where they do not apply), ``"jnp"`` (``tensordot`` per leaf), or a callable
        ``core(g, retain_stacked, *, rcond) -> g_perp`` (see :func:`orthogonal_projection`;
        not with ``axis_name``).
      axis_name: ``None`` (no collectives), a mesh axis name or tuple of names that every leaf
        is split over, or a ``list`` with one such entry (``None``/``()`` for a replicated
        leaf) per leaf of ``g`` in ``jax.tree.leaves`` order.
      block_p, interpret: Pallas options of :func:`jaxunlearn.kernels.projection.gram_and_dots`.

    Returns:
      The projected pytree, same structure, shapes and dtypes as ``g``.

    Raises:
      ValueError: empty tree, mismatched structures or shapes (naming the path), leading
        ``k`` not the same on every leaf or 0, ``k > P`` on a kernel path (global subspace,
        no ``axis_name``), ``rcond`` outside ``[0, 1)``, unknown ``impl``, bad ``axis_name``.
      TypeError: leaves other than float32/bfloat16 on a kernel path other than ``"auto"``.

    References:
      Farajtabar et al., "Orthogonal Gradient Descent for Continual Learning", AISTATS 2020.

    Example:
      >>> g = {"w": jnp.array([1.0, 1.0])}; r = {"w": jnp.array([[1.0, 0.0]])}
      >>> project_tree(g, r)["w"]
      Array([0., 1.], dtype=float32)
    """
    rcond = _check_rcond(rcond)
    impl = _check_impl(impl, _CORE_IMPLS)
    k = _check_stacked(g, retain_grads)
    leaf_axes = _normalise_axes(axis_name, len(jax.tree.leaves(g)))
    sharded = any(leaf_axes)
    if callable(impl):
        if sharded:
            raise ValueError("a callable projection impl cannot run with axis_name (use a kernel impl or 'jnp')")
        if not per_tensor:
            return impl(g, retain_grads, rcond=rcond)
        # each leaf is a one-leaf pytree projected against its own k-dim subspace.
        return jax.tree.map(lambda x, r: impl(x, r, rcond=rcond), g, retain_grads)
    if impl != "jnp" and (refusal := _kernel_refusal(g, retain_grads, k, per_tensor or sharded)):
        if impl != "auto":
            raise refusal
        impl = "jnp"
    fn = project_leaves if impl == "jnp" else project_leaves_jit
    return fn(g, retain_grads, rcond=rcond, per_tensor=per_tensor, impl=impl, leaf_axes=leaf_axes,
              block_p=block_p, interpret=interpret)


def _spec_axes(spec) -> tuple[str, ...]:
    return tuple(a for entry in spec if entry is not None
                 for a in ((entry,) if isinstance(entry, str) else tuple(entry)))


def project_tree_on_mesh(
    g: PyTree,
    retain_grads: PyTree,
    mesh: jax.sharding.Mesh,
    specs: PyTree,
    *,
    rcond: float = DEFAULT_RCOND,
    per_tensor: bool = False,
    impl: str = "auto",
) -> PyTree:
    """:func:`project_tree` run per shard under ``jax.shard_map`` over every axis of ``mesh``.

    Each leaf ``g_l`` is split by ``specs_l`` and its retain leaf by ``P(None, *specs_l)``; the
    core runs on each device's shards with ``axis_name`` naming, leaf by leaf, the mesh axes
    that leaf is split on, so only the ``k x k`` Gram, the ``k`` dots and the row maxima cross
    devices. This is how the array kernels run on a mesh: in a ``jit`` that XLA partitions
    they are replaced by their XLA path (:func:`jaxunlearn.kernels.dispatch.kernel_unless_partitioned`),
    inside this ``shard_map`` they run whole on each shard. Inputs placed otherwise than
    ``specs`` are resharded first (correct, but the parameter-sized move is then paid).

    Args:
      g: the update pytree.
      retain_grads: stacked retain gradients, leaves ``(k, *g_leaf.shape)``.
      mesh: the mesh.
      specs: a ``PartitionSpec`` per leaf of ``g`` (a pytree like ``g``, or its leaves in order).
      rcond, per_tensor, impl: as :func:`project_tree` (``impl`` a string: the core runs
        with ``axis_name``).

    Returns:
      The projected pytree, sharded by ``specs``.

    Raises:
      ValueError: ``specs`` has not one ``PartitionSpec`` per leaf; as :func:`project_tree`.
    """
    g_leaves, treedef = jax.tree.flatten(g)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    if len(spec_leaves) != len(g_leaves):
        raise ValueError(f"specs has {len(spec_leaves)} PartitionSpecs but the updates have {len(g_leaves)} leaves")
    axes = [tuple(a for a in mesh.axis_names if a in _spec_axes(s)) for s in spec_leaves]
    P = jax.sharding.PartitionSpec

    def body(gl, rl):
        return project_tree(gl, rl, rcond=rcond, per_tensor=per_tensor, impl=impl, axis_name=axes)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(list(spec_leaves), [P(None, *s) for s in spec_leaves]),
                       out_specs=list(spec_leaves))
    return jax.tree.unflatten(treedef, jax.jit(fn)(g_leaves, jax.tree.leaves(retain_grads)))


# ---------------------------------------------------------------- public: plain function


def orthogonal_projection(
    g: PyTree,
    retain_grads: PyTree | list | tuple,
    *,
    rcond: float = DEFAULT_RCOND,
    per_tensor: bool = False,
    impl: str | ProjectionCore = "auto",
) -> PyTree:
    """Remove from ``g`` its component in the span of the retain gradients.

    ``g_perp = g - R^T (R R^T)^+ R g`` by the core :func:`project_tree` (module docstring).
    With ``per_tensor=True`` every leaf ``g_l`` is projected against its own subspace
    ``span(r_{1,l}, ..., r_{k,l})``, so ``<g_perp_l, r_{j,l}> = 0`` for every leaf and j.

    Args:
      g: update pytree (any float dtype).
      retain_grads: k retain gradients, stacked (leaves ``(k, *leaf.shape)``) or a
        list/tuple of k pytrees like ``g``.
      rcond: relative eigenvalue threshold of the (normalised) Gram pseudo-inverse.
      per_tensor: a separate subspace per leaf instead of one global subspace.
      impl: ``"auto"`` (the array kernels: Pallas on TPU/GPU, fused XLA passes on CPU;
        ``"jnp"`` where they do not apply), ``"pallas"`` or ``"xla"`` (that kernel path,
        float32/bfloat16 leaves only), ``"jnp"`` (the pure pytree reference), or
        a callable ``core(g, retain_stacked, *, rcond) -> g_perp`` computing the global
        projection with the same rank rule; it gets the inputs in their own dtypes
        (possibly bfloat16), must accumulate in float32 and return ``g``'s dtypes;
        with ``per_tensor`` it is called once per leaf (each leaf a one-leaf pytree).

    Returns:
      ``g_perp``, a pytree like ``g`` with ``g``'s dtypes.

    Raises:
      ValueError: mismatched structures or shapes (naming the path), k = 0, bad rcond.
      FloatingPointError: NaN/Inf in ``g`` or ``retain_grads``, naming the leaf (checked
        when the inputs are concrete, i.e. outside ``jit``; a
        :class:`jaxunlearn.tree.NonFiniteError`, also a ``ValueError``).

    References:
      Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.

    Example:
      >>> import jax.numpy as jnp
      >>> orthogonal_projection({"w": jnp.array([1.0, 1.0])}, [{"w": jnp.array([1.0, 0.0])}])
      {'w': Array([0., 1.], dtype=float32)}
    """
    rcond = _check_rcond(rcond)
    impl = _check_impl(impl)
    retain, _ = stack_retain_grads(g, retain_grads)
    jt.check_finite(g, "updates")
    jt.check_finite(retain, "retain_grads")
    return project_tree(g, retain, rcond=rcond, per_tensor=per_tensor, impl=impl)


# ---------------------------------------------------------------- public: optax transform


class ProjectOrthogonalState(NamedTuple):
    """State of :func:`project_orthogonal` with ``metric="adam"``.

    Attributes:
      count: int32 number of updates seen (for the bias correction of ``nu``).
      nu: float32 pytree like the params, EMA of the squared forget updates,
        ``nu <- b2 nu + (1 - b2) g**2``.
    """

    count: jax.Array
    nu: PyTree


def _is_zero(x) -> bool:
    return isinstance(x, (int, float)) and x == 0


def _is_one(x) -> bool:
    return isinstance(x, (int, float)) and x == 1


def _conflict_select(proj: PyTree, g: PyTree, r_mean: PyTree, per_tensor: bool) -> PyTree:
    """``proj`` where ``<g, r_mean> < 0`` (globally or per leaf), else ``g`` (float32 dots)."""
    if per_tensor:
        return jax.tree.map(
            lambda p, x, r: jnp.where(jnp.vdot(f32(x), r, precision=HIGHEST) < 0, p, x.astype(p.dtype)),
            proj,
            g,
            r_mean,
        )
    conflict = jt.dot(g, r_mean) < 0
    return jax.tree.map(lambda p, x: jnp.where(conflict, p, x.astype(p.dtype)), proj, g)


def project_orthogonal(
    *,
    per_tensor: bool = False,
    metric: Literal["euclidean", "adam"] = "euclidean",
    only_conflicting: bool = False,
    retain_scale: float = 0.0,
    forget_scale: float = 1.0,
    rcond: float = DEFAULT_RCOND,
    b2: float = 0.999,
    eps: float = 1e-8,
    impl: str | ProjectionCore = "auto",
    mesh: jax.sharding.Mesh | None = None,
    specs: PyTree | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Project updates onto the orthogonal complement of the current retain gradients.

    ``update(g, state, params=None, *, retain_grads=R)`` returns

        u = forget_scale * g_perp + retain_scale * r_mean,

    with ``g_perp`` the projection of ``g`` away from ``span(R)`` (global, or per leaf
    with ``per_tensor``; see :func:`orthogonal_projection`) and ``r_mean`` the mean of
    the k retain gradients (the joint update ``gamma g_perp + alpha r`` of GU). The
    incoming ``g`` is the gradient of the forget objective and ``R`` the gradients of
    the retain loss, so ``u`` is a gradient of ``gamma L_f + alpha L_r`` that a
    following optimiser (e.g. ``optax.adamw``) descends.

    Metrics:

    - ``"euclidean"``: ``<g_perp, r_j> = 0`` for every j.
    - ``"adam"``: with ``nu`` the EMA of ``g**2`` (updated with the current ``g`` first,
      as in Adam), ``nu_hat = nu / (1 - b2**t)`` and
      ``P = diag(1 / (sqrt(nu_hat) + eps))`` (Adam's preconditioner), let
      ``D = P**(1/2) = diag(1/sqrt(sqrt(nu_hat) + eps))``. Then
      ``g_perp = D^{-1} proj_{span(D R)}^perp(D g)``. The inner product zeroed is
      the P-inner product: ``<g_perp, r_j>_P = sum_i g_perp_i r_ji / (sqrt(nu_hat_i) + eps) = 0``,
      i.e. the *preconditioned* step ``P g_perp`` that an Adam-like optimiser with
      second moment ``nu_hat`` takes is Euclidean-orthogonal to every retain gradient.

    ``only_conflicting=True`` (PCGrad): project only where the update conflicts with
    the retain direction, ``<g, r_mean> < 0`` in the chosen metric (per leaf with
    ``per_tensor``); otherwise ``g_perp = g``. For k = 1 and the Euclidean metric this
    is exactly PCGrad's rule.

    Args:
      per_tensor: a separate k-dim subspace (and conflict test) per leaf.
      metric: ``"euclidean"`` or ``"adam"``.
      only_conflicting: PCGrad-style conditional projection.
      retain_scale: alpha, the weight of the added retain direction ``r_mean``.
      forget_scale: gamma, the weight of the projected forget update.
      rcond: relative eigenvalue threshold of the Gram pseudo-inverse.
      b2: EMA decay of ``nu`` (``metric="adam"``).
      eps: Adam epsilon (``metric="adam"``), must be > 0.
      impl: projection core, see :func:`orthogonal_projection`.
      mesh, specs: with a mesh of more than one device, the projection runs per shard
        (:func:`project_tree_on_mesh`) with ``specs`` (a ``PartitionSpec`` per parameter
        leaf, e.g. the parameters' own) saying how the updates are split: the array kernels
        then run on each shard. Without, inside a sharded ``jit`` the core takes the kernels'
        XLA path, which XLA partitions.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state is ``optax.EmptyState()``
      for the Euclidean metric and :class:`ProjectOrthogonalState` for ``"adam"``.
      Composes with ``optax.chain``, which forwards ``retain_grads=`` to it.

    References:
      Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.
      Kingma and Ba, "Adam: A method for stochastic optimization", 2015.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(project_orthogonal(), optax.sgd(1.0))
      >>> p = {"w": jnp.zeros(2)}
      >>> u, _ = tx.update({"w": jnp.array([1.0, 1.0])}, tx.init(p), p,
      ...                  retain_grads={"w": jnp.array([[1.0, 0.0]])})
      >>> u["w"]
      Array([-0., -1.], dtype=float32)
    """
    if metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {_METRICS}")
    rcond = _check_rcond(rcond)
    if not 0.0 <= b2 < 1.0:
        raise ValueError(f"b2 must be in [0, 1), got {b2}")
    if metric == "adam" and not eps > 0:
        raise ValueError(f"eps must be > 0 for metric='adam', got {eps}")
    impl = _check_impl(impl)
    if mesh is not None and mesh.size > 1:
        if specs is None:
            raise ValueError("project_orthogonal(mesh=...) needs specs: a PartitionSpec per parameter leaf")
        if callable(impl):
            raise ValueError("a callable projection impl cannot run per shard (mesh=...); use a kernel impl or 'jnp'")
        project = functools.partial(project_tree_on_mesh, mesh=mesh, specs=specs, rcond=rcond,
                                    per_tensor=per_tensor, impl=impl)
    else:
        project = functools.partial(project_tree, rcond=rcond, per_tensor=per_tensor, impl=impl)

    def init_fn(params: PyTree):
        if metric == "euclidean":
            return optax.EmptyState()
        return ProjectOrthogonalState(count=jnp.zeros((), jnp.int32), nu=jt.zeros_like(params, dtype=jnp.float32))

    def update_fn(updates: PyTree, state, params: PyTree = None, *, retain_grads=None, **extra):
        del params, extra
        if retain_grads is None:
            raise ValueError(
                "project_orthogonal needs the current retain gradients: call "
                "tx.update(updates, state, params, retain_grads=R)"
            )
        retain, _ = stack_retain_grads(updates, retain_grads)
        need_r_mean = not _is_zero(retain_scale) or (only_conflicting and metric == "euclidean")
        r_mean = jax.tree.map(lambda x: jnp.mean(f32(x), axis=0), retain) if need_r_mean else None

        if metric == "adam":
            g = jt.cast(updates, jnp.float32)
            count = optax.safe_increment(state.count)
            nu = jax.tree.map(lambda v, x: b2 * v + (1.0 - b2) * jnp.square(x), state.nu, g)
            bc = 1.0 - jnp.asarray(b2, jnp.float32) ** count.astype(jnp.float32)
            dinv = jax.tree.map(lambda v: jnp.sqrt(jnp.sqrt(v / bc) + eps), nu)
            gw = jax.tree.map(jnp.divide, g, dinv)
            rw = jax.tree.map(lambda x, s: f32(x) / s[None], retain, dinv)
            pw = project(gw, rw)
            if only_conflicting:
                rmw = jax.tree.map(lambda x: jnp.mean(x, axis=0), rw)
                pw = _conflict_select(pw, gw, rmw, per_tensor)
            g_perp = jax.tree.map(jnp.multiply, pw, dinv)
            new_state = ProjectOrthogonalState(count=count, nu=nu)
        else:
            # the core accumulates in float32 and returns the updates' dtypes.
            g_perp = project(updates, retain)
            if only_conflicting:
                g_perp = _conflict_select(g_perp, updates, r_mean, per_tensor)
            new_state = state

        def combine(p, x, rm=None):
            out = p if _is_one(forget_scale) else forget_scale * f32(p)
            if rm is not None and not _is_zero(retain_scale):
                out = f32(out) + retain_scale * rm
            return jnp.asarray(out).astype(jnp.result_type(x))

        if r_mean is not None:
            out = jax.tree.map(combine, g_perp, updates, r_mean)
        else:
            out = jax.tree.map(combine, g_perp, updates)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
