"""Pytree arithmetic shared by every transform.

All functions work on any pytree of arrays (dicts, tuples, an ``nnx.State``) and
under ``jax.jit``. Reductions (``dot``, ``sq_norm``, ``global_norm``) accumulate
in float32 whatever the leaf dtype. The ``check_*`` functions run on the
*structure* and *shapes* (static under jit); ``check_finite`` needs concrete
values and is a no-op on tracers.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any

__all__ = [
    "PyTree",
    "path_str",
    "leaves_with_paths",
    "check_same_structure",
    "check_same_shapes",
    "check_finite",
    "NonFiniteError",
    "check_nonnegative",
    "check_nonempty",
    "add",
    "sub",
    "mul",
    "div",
    "scale",
    "axpy",
    "neg",
    "zeros_like",
    "ones_like",
    "full_like",
    "cast",
    "dot",
    "sq_norm",
    "global_norm",
    "sum",
    "size",
    "ravel",
    "unravel_like",
]


def path_str(path) -> str:
    """A readable name for a key path, e.g. ``layers/0/attn/q_proj/kernel``.

    The ``.value`` attribute through which an ``nnx.State`` exposes each variable's
    array is dropped, so nnx and pure-dict trees name a leaf alike.
    """
    parts = []
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:  # pragma: no cover - future key types
            parts.append(str(k))
    return "/".join(parts) if parts else "<root>"


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """``[(path_string, leaf), ...]`` in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), leaf) for p, leaf in flat]


def check_same_structure(a: PyTree, b: PyTree, names: tuple[str, str] = ("a", "b")) -> None:
    """Raise ``ValueError`` naming the first path present in one tree but not the other."""
    sa = jax.tree_util.tree_structure(a)
    sb = jax.tree_util.tree_structure(b)
    if sa == sb:
        return
    pa = [p for p, _ in leaves_with_paths(a)]
    pb = [p for p, _ in leaves_with_paths(b)]
    set_b, set_a = set(pb), set(pa)
    for p in pa:
        if p not in set_b:
            raise ValueError(f"pytree mismatch: {names[0]} has leaf '{p}' that {names[1]} lacks")
    for p in pb:
        if p not in set_a:
            raise ValueError(f"pytree mismatch: {names[1]} has leaf '{p}' that {names[0]} lacks")
    raise ValueError(
        f"pytree mismatch between {names[0]} and {names[1]}: same leaf paths but different "
        f"containers ({sa} vs {sb})"
    )


def check_same_shapes(
    a: PyTree, b: PyTree, names: tuple[str, str] = ("a", "b"), *, dtypes: bool = False
) -> None:
    """Check structure, then that every pair of leaves has the same shape (and dtype if asked).

    Raises ``ValueError`` naming the first mismatching path.
    """
    check_same_structure(a, b, names)
    for (p, x), (_, y) in zip(leaves_with_paths(a), leaves_with_paths(b)):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(
                f"shape mismatch at '{p}': {names[0]} {jnp.shape(x)} vs {names[1]} {jnp.shape(y)}"
            )
        if dtypes and jnp.result_type(x) != jnp.result_type(y):
            raise ValueError(
                f"dtype mismatch at '{p}': {names[0]} {jnp.result_type(x)} vs "
                f"{names[1]} {jnp.result_type(y)}"
            )


class NonFiniteError(FloatingPointError, ValueError):
    """NaN or Inf where finite values are required: both a ``ValueError`` (a bad argument
    value) and a ``FloatingPointError``, so either ``except`` catches it."""


def check_finite(tree: PyTree, name: str = "tree") -> None:
    """Raise :class:`NonFiniteError` naming the first leaf with NaN or Inf.

    Only concrete arrays are checked (one device->host transfer of a boolean per
    leaf); tracers are skipped silently, so call it at the boundary, before the
    compiled work. Inside a ``jax.jit`` trace, arrays closed over as constants are
    still checked (the test is evaluated eagerly, never staged out).

    >>> check_finite({"w": jnp.array([1.0, jnp.nan])}, "params")
    Traceback (most recent call last):
    ...
    jaxunlearn.tree.NonFiniteError: params has NaN values at 'w'
    """
    with jax.ensure_compile_time_eval():
        for p, x in leaves_with_paths(tree):
            if isinstance(x, jax.core.Tracer):
                continue
            arr = jnp.asarray(x)
            if not jnp.issubdtype(arr.dtype, jnp.inexact):
                continue
            if not bool(jnp.all(jnp.isfinite(arr))):
                bad = "NaN" if bool(jnp.any(jnp.isnan(arr))) else "Inf"
                raise NonFiniteError(f"{name} has {bad} values at '{p}'")


def check_nonnegative(tree: PyTree, name: str = "tree") -> None:
    """Raise ``ValueError`` naming the first leaf with a negative entry (an importance, a Fisher).

    Concrete leaves only, also when closed over inside a ``jit`` trace (the test is
    evaluated eagerly); tracers are skipped.
    """
    with jax.ensure_compile_time_eval():
        for p, x in leaves_with_paths(tree):
            if not isinstance(x, jax.core.Tracer) and bool(jnp.any(jnp.asarray(x) < 0)):
                raise ValueError(f"{name} must be >= 0, but has negative values at '{p}'")


def check_nonempty(tree: PyTree, name: str = "tree") -> None:
    """Raise ``ValueError`` if the tree has no leaves."""
    if not jax.tree_util.tree_leaves(tree):
        raise ValueError(f"{name} is an empty pytree (no array leaves)")


# ---------------------------------------------------------------- arithmetic


def _map(fn: Callable, *trees: PyTree) -> PyTree:
    return jax.tree.map(fn, *trees)


def add(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a + b``."""
    return _map(jnp.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a - b``."""
    return _map(jnp.subtract, a, b)


def mul(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise (Hadamard) ``a * b``."""
    return _map(jnp.multiply, a, b)


def div(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a / b``."""
    return _map(jnp.divide, a, b)


def neg(a: PyTree) -> PyTree:
    """Leafwise ``-a``."""
    return _map(jnp.negative, a)


def _scalar_like(s, x):
    # keep the leaf dtype: a Python float is weakly typed, a jax scalar is cast.
    if isinstance(s, (int, float)):
        return s
    return jnp.asarray(s).astype(x.dtype)


def scale(a: PyTree, s) -> PyTree:
    """``s * a`` for a scalar ``s`` (result keeps each leaf's dtype)."""
    return _map(lambda x: x * _scalar_like(s, x), a)


def axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y`` leafwise, ``alpha`` a scalar; result has ``y``'s dtypes."""
    return _map(lambda u, v: (_scalar_like(alpha, v) * u.astype(v.dtype) + v), x, y)


def zeros_like(a: PyTree, dtype=None) -> PyTree:
    """Zeros with the structure and shapes of ``a``."""
    return _map(lambda x: jnp.zeros_like(x, dtype=dtype), a)


def ones_like(a: PyTree, dtype=None) -> PyTree:
    """Ones with the structure and shapes of ``a``."""
    return _map(lambda x: jnp.ones_like(x, dtype=dtype), a)


def full_like(a: PyTree, value, dtype=None) -> PyTree:
    """``value`` everywhere, with the structure and shapes of ``a``."""
    return _map(lambda x: jnp.full_like(x, value, dtype=dtype), a)


def cast(a: PyTree, dtype) -> PyTree:
    """Cast every leaf to ``dtype``."""
    return _map(lambda x: jnp.asarray(x).astype(dtype), a)


# ---------------------------------------------------------------- reductions


def _f32(x):
    return jnp.asarray(x).astype(jnp.float32)


def dot(a: PyTree, b: PyTree) -> jax.Array:
    """``<a, b> = sum_leaves sum_i a_i b_i``, accumulated in float32."""
    parts = jax.tree.leaves(_map(lambda x, y: jnp.vdot(_f32(x), _f32(y)), a, b))
    return jnp.sum(jnp.stack(parts)) if parts else jnp.zeros((), jnp.float32)


def sq_norm(a: PyTree) -> jax.Array:
    """``||a||^2`` in float32."""
    return dot(a, a)


def global_norm(a: PyTree) -> jax.Array:
    """``||a||_2`` over all leaves, in float32."""
    return jnp.sqrt(sq_norm(a))


def sum(a: PyTree) -> jax.Array:  # noqa: A001 - mirrors jnp.sum
    """Sum of every element of every leaf, in float32."""
    parts = [jnp.sum(_f32(x)) for x in jax.tree.leaves(a)]
    return jnp.sum(jnp.stack(parts)) if parts else jnp.zeros((), jnp.float32)


def size(a: PyTree) -> int:
    """Total number of elements (a Python int, static under jit)."""
    return int(np.sum([np.prod(jnp.shape(x), dtype=np.int64) for x in jax.tree.leaves(a)]))


# ---------------------------------------------------------------- raveling


def ravel(a: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    """Concatenate all leaves into one vector; returns ``(vector, unravel)``.

    ``unravel(vector)`` rebuilds the tree with the original shapes and dtypes.
    Leaves of mixed dtypes are promoted to a common dtype in the vector.
    """
    return ravel_pytree(a)


def unravel_like(vector: jax.Array, like: PyTree) -> PyTree:
    """Split ``vector`` into a tree shaped like ``like`` (inverse of ``ravel``)."""
    n = size(like)
    if vector.ndim != 1 or vector.shape[0] != n:
        raise ValueError(f"vector of shape {vector.shape} cannot fill a pytree of {n} elements")
    return ravel_pytree(like)[1](vector)
