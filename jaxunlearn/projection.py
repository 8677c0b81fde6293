"""Orthogonal projection of an update away from the span of retain gradients (GU, PCGrad).

Let ``g`` be the forget update (a pytree, raveled: a vector of P entries) and
``R`` the ``k x P`` matrix whose rows ``r_j`` are k retain gradients. The retain
loss is unchanged to first order by a step along ``u`` iff ``R u = 0``; the
closest such ``u`` to ``g`` is

    g_perp = g - R^T (R R^T)^+ R g,

the orthogonal projection onto the complement of ``span(r_1, ..., r_k)``. It is
computed from the ``k x k`` Gram matrix (never a ``P x P`` matrix) in three passes
over P: ``G = R R^T``, ``b = R g``, ``g - R^T c`` with ``c = G^+ b``.

Pseudo-inverse. ``c = G^+ b`` comes from
:func:`jaxunlearn.kernels.projection.pinv_solve`, the library's single
implementation of the rank rule: with ``s_j = 1/||r_j||`` (0 for a zero row) and
``S = diag(s)``, the normalised Gram ``S G S`` (the cosine matrix of the retain
gradients) is diagonalised by ``eigh``; eigenvalues ``<= rcond * max eigenvalue``
are dropped and ``c = S (S G S)^+ S b``. This is the exact projector onto the span
of the retain gradients that remain after dropping nearly dependent directions;
the row normalisation makes the rank decision depend on the angles between the
retain gradients only, not on their (often very different) norms: retain
gradients whose norms differ 1000x are all kept. Before the Gram matrix is formed,
every retain gradient is multiplied by a power of two bringing its largest entry to
``[0.5, 1)`` (:func:`jaxunlearn.kernels.projection.pow2_row_scales`; exact, and the
projection is invariant to it), so retain gradients of norm ``1e-19`` or ``1e19``,
whose float32 Gram would underflow to 0 or overflow to Inf, are projected as
accurately as unit ones (per leaf with ``per_tensor``). Duplicated, linearly dependent
or zero retain gradients give no NaN; all-zero retain gradients leave ``g``
unchanged. All sums are accumulated in float32; results have the dtype of ``g``.
In float32 the cosine Gram is resolved to about ``1e-7 k``, so directions kept
with an eigenvalue near ``rcond = 1e-6`` are only accurate to a few 1e-3
relative; raise ``rcond`` (e.g. ``1e-4``) when retain gradients are nearly
dependent and exactness matters.

Implementations (``impl``): ``"auto"`` (default) runs the kernel-backed core
:func:`jaxunlearn.kernels.projection.project_tree` with its own dispatch (Pallas
on TPU/GPU, fused XLA passes on CPU), falling back to ``"jnp"`` where the kernels
do not apply (leaves other than float32/bfloat16, or a global subspace with more
retain gradients than parameters); ``"pallas"`` / ``"xla"`` force a kernel path;
``"jnp"`` is the pure pytree reference (``tensordot`` per leaf at
``Precision.HIGHEST``, no reshapes, so sharded leaves stay sharded); a callable is
a user-supplied core.

Retain gradients are given either *stacked* (a pytree with ``g``'s structure
whose leaves have a leading axis k: leaf shape ``(k, *g_leaf.shape)``) or as a
*list/tuple of k pytrees* each shaped like ``g``.

References:
  Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task
  Learning" (PCGrad), NeurIPS 2020. Geometric-disentanglement unlearning (GU):
  project the forget gradient onto the orthogonal complement of the retain
  gradients so that the retain loss is unchanged to first order (see DESIGN.md).
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
from jaxunlearn.validate import check_finite_tree

PyTree = Any
ProjectionCore = Callable[..., PyTree]

__all__ = [
    "METRICS",
    "ProjectOrthogonalState",
    "gram_pinv_coefficients",
    "orthogonal_projection",
    "project_orthogonal",
    "stack_retain_grads",
]

_HI = jax.lax.Precision.HIGHEST
METRICS = ("euclidean", "adam")
_METRICS = METRICS
_IMPLS = ("auto", "pallas", "xla", "jnp")
_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
DEFAULT_RCOND = kp.DEFAULT_RCOND


# ---------------------------------------------------------------- inputs


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
    g_struct = jax.tree_util.tree_structure(g)
    if jax.tree_util.tree_structure(retain_grads) != g_struct:
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
    ks = {}
    for (p, x), (_, r) in zip(jt.leaves_with_paths(g), jt.leaves_with_paths(retain_grads)):
        gs, rs = jnp.shape(x), jnp.shape(r)
        if len(rs) != len(gs) + 1 or rs[1:] != gs:
            raise ValueError(
                f"retain_grads leaf '{p}' has shape {rs}; expected (k, *{gs}) (a leading k axis "
                "over the update's shape)"
            )
        ks[p] = rs[0]
    if len(set(ks.values())) != 1:
        raise ValueError(f"retain_grads leaves disagree on k (the leading axis): {ks}")
    k = next(iter(ks.values()))
    if k == 0:
        raise ValueError("retain_grads has k = 0 retain gradients")
    return retain_grads, int(k)


def _check_rcond(rcond: float) -> None:
    if not (isinstance(rcond, (int, float, np.floating)) and 0.0 <= float(rcond) < 1.0):
        raise ValueError(f"rcond must be a float in [0, 1), got {rcond!r}")


# ---------------------------------------------------------------- the jnp core


gram_pinv_coefficients = kp.pinv_solve
"""Coefficients ``c = G^+ b`` of the projection from the k x k Gram matrix: an alias of
:func:`jaxunlearn.kernels.projection.pinv_solve` (angle-based rank rule, see the module
docstring)."""


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _leaf_gram(r: jax.Array) -> jax.Array:
    """``R_l R_l^T`` (k x k) of one stacked leaf, contracting all but the k axis (no reshape,
    so sharded leaves stay sharded)."""
    axes = tuple(range(1, r.ndim))
    return jnp.tensordot(r, r, axes=(axes, axes), precision=_HI)


def _leaf_rg(r: jax.Array, x: jax.Array) -> jax.Array:
    """``R_l g_l`` (k,) of one leaf."""
    return jnp.tensordot(r, x, axes=(tuple(range(1, r.ndim)), tuple(range(x.ndim))), precision=_HI)


def _leaf_update(x: jax.Array, r: jax.Array, c: jax.Array, dtype) -> jax.Array:
    """``g_l - R_l^T c`` in float32, cast to ``dtype``."""
    return (x - jnp.tensordot(c, r, axes=1, precision=_HI)).astype(dtype)


def _scale_leaf(r: jax.Array, s: jax.Array) -> jax.Array:
    """``diag(s) r`` for a stacked leaf ``r`` of shape ``(k, ...)``."""
    return r * s.reshape((-1,) + (1,) * (r.ndim - 1))


def _project_jnp(g: PyTree, retain: PyTree, *, rcond: float) -> PyTree:
    """Global projection of ``g`` against stacked ``retain`` (pure jnp, float32), in the basis
    of the row-scaled retain gradients (powers of two, see the module docstring)."""
    g_leaves, treedef = jax.tree_util.tree_flatten(g)
    r_leaves = [_f32(r) for r in jax.tree_util.tree_leaves(retain)]
    s = kp.pow2_row_scales(functools.reduce(jnp.maximum, [kp.row_absmax(r) for r in r_leaves]))
    r_leaves = [_scale_leaf(r, s) for r in r_leaves]
    dtypes = [jnp.result_type(x) for x in g_leaves]
    g_leaves = [_f32(x) for x in g_leaves]
    gram = functools.reduce(jnp.add, [_leaf_gram(r) for r in r_leaves])
    rg = functools.reduce(jnp.add, [_leaf_rg(r, x) for x, r in zip(g_leaves, r_leaves)])
    c = kp.pinv_solve(gram, rg, rcond)
    out = [_leaf_update(x, r, c, dt) for x, r, dt in zip(g_leaves, r_leaves, dtypes)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _project_jnp_per_tensor(g: PyTree, retain: PyTree, *, rcond: float) -> PyTree:
    """Per-leaf projection (pure jnp): one k x k Gram per leaf (of the leaf's row-scaled retain
    gradients), one batched ``eigh``."""
    g_leaves, treedef = jax.tree_util.tree_flatten(g)
    r_leaves = [_f32(r) for r in jax.tree_util.tree_leaves(retain)]
    r_leaves = [_scale_leaf(r, kp.pow2_row_scales(kp.row_absmax(r))) for r in r_leaves]
    dtypes = [jnp.result_type(x) for x in g_leaves]
    g_leaves = [_f32(x) for x in g_leaves]
    grams = jnp.stack([_leaf_gram(r) for r in r_leaves])
    rgs = jnp.stack([_leaf_rg(r, x) for x, r in zip(g_leaves, r_leaves)])
    cs = jax.vmap(lambda gram, rg: kp.pinv_solve(gram, rg, rcond))(grams, rgs)
    out = [
        _leaf_update(x, r, cs[i], dt)
        for i, (x, r, dt) in enumerate(zip(g_leaves, r_leaves, dtypes))
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def _resolve_core(impl: str | ProjectionCore) -> str | ProjectionCore:
    if callable(impl) or impl in _IMPLS:
        return impl
    raise ValueError(
        f"unknown projection impl {impl!r}; expected one of {_IMPLS} or a callable "
        "core(g, retain_stacked, *, rcond) -> g_perp"
    )


def _kernel_applies(g: PyTree, retain: PyTree, per_tensor: bool) -> bool:
    """Whether ``impl="auto"`` can use the kernel core: float32/bfloat16 leaves and,
    for a global subspace, ``k <= P`` (static checks, done at trace time)."""
    leaves = jax.tree_util.tree_leaves(g) + jax.tree_util.tree_leaves(retain)
    if any(jnp.dtype(jnp.result_type(x)) not in _KERNEL_DTYPES for x in leaves):
        return False
    k = jnp.shape(jax.tree_util.tree_leaves(retain)[0])[0]
    return per_tensor or k <= jt.size(g)


def _apply(core: str | ProjectionCore, g: PyTree, retain: PyTree, rcond: float, per_tensor: bool) -> PyTree:
    if callable(core):
        if not per_tensor:
            return core(g, retain, rcond=rcond)
        # each leaf is a one-leaf pytree projected against its own k-dim subspace.
        return jax.tree.map(lambda x, r: core(x, r, rcond=rcond), g, retain)
    if core == "auto" and not _kernel_applies(g, retain, per_tensor):
        core = "jnp"
    if core == "jnp":
        fn = _project_jnp_per_tensor if per_tensor else _project_jnp
        return fn(g, retain, rcond=rcond)
    return kp.project_tree(g, retain, rcond=rcond, per_tensor=per_tensor, impl=core)


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

    ``g_perp = g - R^T (R R^T)^+ R g`` (see the module docstring for the rank
    threshold). With ``per_tensor=True`` every leaf ``g_l`` is projected against its
    own subspace ``span(r_{1,l}, ..., r_{k,l})`` (one k x k Gram per leaf), so
    ``<g_perp_l, r_{j,l}> = 0`` for every leaf l and every j.

    Args:
      g: update pytree (any float dtype).
      retain_grads: k retain gradients, stacked (leaves ``(k, *leaf.shape)``) or a
        list/tuple of k pytrees like ``g``.
      rcond: relative eigenvalue threshold of the (normalised) Gram pseudo-inverse.
      per_tensor: a separate subspace per leaf instead of one global subspace.
      impl: ``"auto"`` (kernel-backed :func:`jaxunlearn.kernels.projection.project_tree`,
        Pallas on TPU/GPU and fused XLA passes on CPU; ``"jnp"`` where the kernels do
        not apply, see the module docstring), ``"pallas"`` or ``"xla"`` (that kernel
        path, float32/bfloat16 leaves only), ``"jnp"`` (the pure pytree reference), or
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
        :class:`jaxunlearn.validate.NonFiniteError`, also a ``ValueError``).

    References:
      Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.

    Example:
      >>> import jax.numpy as jnp
      >>> orthogonal_projection({"w": jnp.array([1.0, 1.0])}, [{"w": jnp.array([1.0, 0.0])}])
      {'w': Array([0., 1.], dtype=float32)}
    """
    _check_rcond(rcond)
    core = _resolve_core(impl)
    retain, _ = stack_retain_grads(g, retain_grads)
    check_finite_tree(g, "updates")
    check_finite_tree(retain, "retain_grads")
    return _apply(core, g, retain, float(rcond), per_tensor)


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


def _conflict_select(
    proj: PyTree, g: PyTree, r_mean: PyTree, per_tensor: bool
) -> PyTree:
    """``proj`` where ``<g, r_mean> < 0`` (globally or per leaf), else ``g`` (float32 dots)."""
    if per_tensor:
        return jax.tree.map(
            lambda p, x, r: jnp.where(jnp.vdot(_f32(x), r, precision=_HI) < 0, p, x.astype(p.dtype)),
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
) -> optax.GradientTransformationExtraArgs:
    """Project updates onto the orthogonal complement of the current retain gradients.

    ``update(g, state, params=None, *, retain_grads=R)`` returns

        u = forget_scale * g_perp + retain_scale * r_mean,

    with ``g_perp`` the projection of ``g`` away from ``span(R)`` (global, or per leaf
    with ``per_tensor``; see :func:`orthogonal_projection`) and ``r_mean`` the mean of
    the k retain gradients (DESIGN.md's joint update ``gamma g_perp + alpha r``). The
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
    _check_rcond(rcond)
    if not 0.0 <= b2 < 1.0:
        raise ValueError(f"b2 must be in [0, 1), got {b2}")
    if metric == "adam" and not eps > 0:
        raise ValueError(f"eps must be > 0 for metric='adam', got {eps}")
    core = _resolve_core(impl)
    rcond = float(rcond)

    def init_fn(params: PyTree):
        if metric == "euclidean":
            return optax.EmptyState()
        return ProjectOrthogonalState(
            count=jnp.zeros((), jnp.int32), nu=jt.zeros_like(params, dtype=jnp.float32)
        )

    def update_fn(updates: PyTree, state, params: PyTree = None, *, retain_grads=None, **extra):
        del params, extra
        if retain_grads is None:
            raise ValueError(
                "project_orthogonal needs the current retain gradients: call "
                "tx.update(updates, state, params, retain_grads=R)"
            )
        retain, _ = stack_retain_grads(updates, retain_grads)
        need_r_mean = not _is_zero(retain_scale) or (only_conflicting and metric == "euclidean")
        r_mean = (
            jax.tree.map(lambda x: jnp.mean(_f32(x), axis=0), retain) if need_r_mean else None
        )

        if metric == "adam":
            g = jt.cast(updates, jnp.float32)
            count = optax.safe_increment(state.count)
            nu = jax.tree.map(lambda v, x: b2 * v + (1.0 - b2) * jnp.square(x), state.nu, g)
            bc = 1.0 - jnp.asarray(b2, jnp.float32) ** count.astype(jnp.float32)
            dinv = jax.tree.map(lambda v: jnp.sqrt(jnp.sqrt(v / bc) + eps), nu)
            gw = jax.tree.map(jnp.divide, g, dinv)
            rw = jax.tree.map(lambda x, s: _f32(x) / s[None], retain, dinv)
            pw = _apply(core, gw, rw, rcond, per_tensor)
            if only_conflicting:
                rmw = jax.tree.map(lambda x: jnp.mean(x, axis=0), rw)
                pw = _conflict_select(pw, gw, rmw, per_tensor)
            g_perp = jax.tree.map(jnp.multiply, pw, dinv)
            new_state = ProjectOrthogonalState(count=count, nu=nu)
        else:
            # the core accumulates in float32 and returns the updates' dtypes.
            g_perp = _apply(core, updates, retain, rcond, per_tensor)
            if only_conflicting:
                g_perp = _conflict_select(g_perp, updates, r_mean, per_tensor)
            new_state = state

        def combine(p, x, rm=None):
            out = p if _is_one(forget_scale) else forget_scale * _f32(p)
            if rm is not None and not _is_zero(retain_scale):
                out = _f32(out) + retain_scale * rm
            return jnp.asarray(out).astype(jnp.result_type(x))

        if r_mean is not None:
            out = jax.tree.map(combine, g_perp, updates, r_mean)
        else:
            out = jax.tree.map(combine, g_perp, updates)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
