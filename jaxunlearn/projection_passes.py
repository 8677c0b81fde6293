"""The passes of the orthogonal projection's core, leaf by leaf (used by
:func:`jaxunlearn.projection.project_tree`; see that module for the mathematics).

For ``k`` retain gradients stacked on a leading axis (leaf ``r_l`` of shape ``(k, *g_l.shape)``),
row scales ``s`` (powers of two, :func:`jaxunlearn.kernels.solve.pow2_row_scales`) and
``S = diag(s)``:

- ``gram_and_dots(g_l, r_l, s) = (S R_l (S R_l)^T, S R_l g_l)`` — the ``(k, k)`` Gram and the
  ``(k,)`` dots, float32;
- ``subtract(g_l, r_l, c, s) = g_l - (S R_l)^T c`` in ``g_l`` 's dtype;

on the array kernels of :mod:`jaxunlearn.kernels.projection` (:func:`kernel_passes`) or by
``tensordot`` at ``Precision.HIGHEST`` (:func:`jnp_gram_and_dots`, :func:`jnp_subtract`: no
reshapes, so sharded leaves stay sharded). :func:`project_leaves` sums them (``psum`` over
each leaf's mesh axes inside ``shard_map``), solves ``c = pinv(G) d`` and subtracts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxunlearn.kernels import projection as kp

__all__ = ["HIGHEST", "f32", "scaled_f32", "jnp_gram_and_dots", "jnp_subtract", "kernel_passes", "over_axes",
           "project_leaves", "project_leaves_jit"]

HIGHEST = jax.lax.Precision.HIGHEST


def f32(x: jax.Array) -> jax.Array:
    """``x`` as a float32 array."""
    return jnp.asarray(x).astype(jnp.float32)


def scaled_f32(r: jax.Array, s: jax.Array) -> jax.Array:
    """``diag(s) r`` in float32 for a stacked leaf ``r`` of shape ``(k, ...)``."""
    return f32(r) * s.reshape((-1,) + (1,) * (r.ndim - 1))


def jnp_gram_and_dots(x, r, s):
    """``(S R_l (S R_l)^T, S R_l g_l)`` of one leaf by ``tensordot`` over all but the k axis (no
    reshape, so sharded leaves stay sharded)."""
    rs = scaled_f32(r, s)
    axes = tuple(range(1, rs.ndim))
    return (jnp.tensordot(rs, rs, axes=(axes, axes), precision=HIGHEST),
            jnp.tensordot(rs, f32(x), axes=(axes, tuple(range(x.ndim))), precision=HIGHEST))


def jnp_subtract(x, r, c, s):
    """``g_l - (S R_l)^T c`` in float32, in ``g_l``'s dtype."""
    return (f32(x) - jnp.tensordot(c, scaled_f32(r, s), axes=1, precision=HIGHEST)).astype(jnp.result_type(x))


def kernel_passes(impl: str, k: int, block_p, interpret):
    """The two per-leaf passes on the array kernels, each leaf seen as ``(k, P_l)`` by a free
    reshape; a leaf shorter than ``k`` is too small for a kernel and takes the XLA path."""
    opts = dict(impl=impl, block_p=block_p, interpret=interpret)

    def gram_and_dots(x, r, s):
        R, gv = r.reshape(k, -1), x.reshape(-1)
        if R.shape[1] < k:
            return kp.gram_and_dots_xla(R, gv, s)
        return kp.gram_and_dots(R, gv, scale=s, **opts)

    def subtract(x, r, c, s):
        R, gv = r.reshape(k, -1), x.reshape(-1)
        out = kp.subtract_xla(gv, R, c, s) if R.shape[1] < k else kp.subtract(gv, R, c, scale=s, **opts)
        return out.reshape(x.shape)

    return gram_and_dots, subtract


def over_axes(collective, x, axes: tuple[str, ...]):
    """``collective(x, axes)`` (``lax.psum`` / ``lax.pmax``) or ``x`` for a leaf split over no axis."""
    return collective(x, axes) if axes else x


def project_leaves(g, retain, *, rcond, per_tensor, impl, leaf_axes, block_p, interpret):
    """``g - R^T (R R^T)^+ R g`` (per leaf with ``per_tensor``) from the passes: the contract of
    :func:`jaxunlearn.projection.project_tree`, which validates the inputs and calls this with
    ``impl`` resolved (``"jnp"`` or a kernel path) and ``leaf_axes`` a tuple of mesh-axis
    tuples, one per leaf (``()``: no collective)."""
    g_leaves, treedef = jax.tree.flatten(g)
    r_leaves = jax.tree.leaves(retain)
    k = r_leaves[0].shape[0]
    if impl == "jnp":
        gram_and_dots, subtract = jnp_gram_and_dots, jnp_subtract
    else:
        gram_and_dots, subtract = kernel_passes(impl, k, block_p, interpret)
    if per_tensor:  # a subspace per leaf: its own scales, Gram, dots and solve
        ss = [kp.pow2_row_scales(over_axes(jax.lax.pmax, kp.row_absmax(r), ax)) for r, ax in zip(r_leaves, leaf_axes)]
        parts = [over_axes(jax.lax.psum, gram_and_dots(x, r, s), ax) for x, r, s, ax in zip(g_leaves, r_leaves, ss, leaf_axes)]
        cs = jax.vmap(lambda G, d: kp.pinv_solve(G, d, rcond))(
            jnp.stack([G for G, _ in parts]), jnp.stack([d for _, d in parts]))
        out = [subtract(x, r, cs[i], ss[i]) for i, (x, r) in enumerate(zip(g_leaves, r_leaves))]
        return jax.tree.unflatten(treedef, out)
    groups: dict[tuple[str, ...], list[int]] = {}  # leaves reduced over the same mesh axes
    for i, ax in enumerate(leaf_axes):
        groups.setdefault(ax, []).append(i)
    m = functools.reduce(jnp.maximum, [
        over_axes(jax.lax.pmax, functools.reduce(jnp.maximum, [kp.row_absmax(r_leaves[i]) for i in idx]), ax)
        for ax, idx in groups.items()])
    s = kp.pow2_row_scales(m)
    G, d = jnp.zeros((k, k), jnp.float32), jnp.zeros((k,), jnp.float32)
    for ax, idx in groups.items():
        Gi, di = jnp.zeros((k, k), jnp.float32), jnp.zeros((k,), jnp.float32)
        for i in idx:
            Gl, dl = gram_and_dots(g_leaves[i], r_leaves[i], s)
            Gi, di = Gi + Gl, di + dl
        Gi, di = over_axes(jax.lax.psum, (Gi, di), ax)
        G, d = G + Gi, d + di
    c = kp.pinv_solve(G, d, rcond)
    return jax.tree.unflatten(treedef, [subtract(x, r, c, s) for x, r in zip(g_leaves, r_leaves)])


# the kernel paths run as one jitted computation; the jnp reference as the caller traces it
# (op by op when called eagerly).
project_leaves_jit = jax.jit(project_leaves, static_argnames=("rcond", "per_tensor", "impl", "leaf_axes", "block_p", "interpret"))
