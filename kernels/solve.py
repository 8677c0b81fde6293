"""The ``k x k`` side of the orthogonal projection: pseudo-inverse solve and row scaling.

The projection ``g_perp = g - R^T c``, ``c = (R R^T)^+ R g``, of an update ``g`` against
``k`` retain vectors (the rows of ``R``, see :mod:`jaxunlearn.kernels.projection`) needs,
besides the passes over ``P``, two small array operations:

- :func:`pinv_solve`: ``c = G^+ b`` from the ``k x k`` Gram matrix ``G = R R^T`` and
  ``b = R g``, the single implementation of the rank rule used by the whole library.
  ``eigh`` of the row-normalised (cosine) Gram ``S G S`` (``S = diag(1/||r_i||)``) with a
  relative threshold ``rcond``, so the rank decision depends on the angles between the
  retain vectors, not on their norms.
- :func:`row_absmax` and :func:`pow2_row_scales`: per-row powers of two ``s_i`` that bring
  the largest entry of every retain vector to ``[0.5, 1)``. The Gram of ``diag(s) R`` has
  entries in ``[0, P]`` whatever the magnitude of ``R`` (a float32 Gram of ``1e-19``
  vectors underflows to 0, of ``1e19`` vectors overflows to Inf); the scaling is exact and
  the projection invariant to it (``span(S R) = span(R)``).
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["DEFAULT_RCOND", "pinv_solve", "row_absmax", "pow2_row_scales"]

DEFAULT_RCOND = 1e-6


def _check_rcond(rcond) -> float:
    if isinstance(rcond, bool) or not isinstance(rcond, numbers.Real) or not 0.0 <= rcond < 1.0:
        raise ValueError(f"rcond must be a Python float in [0, 1); got {rcond!r}")
    return float(rcond)


# ---------------------------------------------------------------- k x k solve


@functools.partial(jax.jit, static_argnames=("rcond",))
def pinv_solve(gram_matrix: jax.Array, rhs: jax.Array, rcond: float = DEFAULT_RCOND) -> jax.Array:
    """``c = G^+ rhs`` for a Gram matrix ``G = R R^T``, with an angle-based rank rule.

    The rank decision is taken on the row-normalised (cosine) Gram matrix, so it
    depends on the angles between the retain vectors only, never on their norms::

        s_i = 1 / sqrt(G_ii)   (0 where G_ii <= tiny: a zero retain vector)
        S = diag(s),  C = S G S = V diag(lam) V^T          (eigh, C symmetrised)
        c = S V diag(1/lam_kept) V^T S rhs,  kept: lam_i > rcond * max(lam) and lam_i > 0

    Retain vectors of very different norms (``||r_1|| = 1000 ||r_2||``) are all
    kept as long as they are not nearly parallel; a direction whose cosine-Gram
    eigenvalue is ``<= rcond * max`` (nearly dependent vectors) is dropped, so a
    rank-deficient ``G`` (duplicated, dependent or zero rows) gives the exact
    projector onto the span of the kept directions and never NaN; ``G = 0`` gives
    ``c = 0``. In float32 the cosine Gram is resolved to about ``1e-7 k``: kept
    directions with an eigenvalue near ``rcond`` are accurate to a few ``1e-3``
    relative; raise ``rcond`` (e.g. ``1e-4``) when exactness matters there.

    Args:
      gram_matrix: ``(k, k)`` symmetric PSD matrix ``R R^T`` (used in float32).
      rhs: ``(k,)`` right-hand side (``R g``).
      rcond: relative eigenvalue cut-off of the cosine Gram, a Python float in ``[0, 1)``.

    Returns:
      ``(k,)`` float32 coefficients ``c``; ``g - R^T c`` is the projection of ``g``.

    Raises:
      ValueError: ``G`` not ``(k, k)`` or ``rhs`` not ``(k,)``, ``rcond`` outside ``[0, 1)``.

    Example:
      >>> G = jnp.diag(jnp.array([1e6, 1.0]))   # orthogonal rows, norms 1000 and 1
      >>> pinv_solve(G, jnp.array([1e6, 1.0]))
      Array([1., 1.], dtype=float32)
    """
    rcond = _check_rcond(rcond)
    Gm = jnp.asarray(gram_matrix).astype(jnp.float32)
    if Gm.ndim != 2 or Gm.shape[0] != Gm.shape[1] or jnp.shape(rhs) != (Gm.shape[0],):
        raise ValueError(f"pinv_solve needs G (k, k) and rhs (k,); got {Gm.shape} and {jnp.shape(rhs)}")
    hi = lax.Precision.HIGHEST
    diag = jnp.diagonal(Gm)
    tiny = jnp.finfo(jnp.float32).tiny
    s = jnp.where(diag > tiny, lax.rsqrt(jnp.maximum(diag, tiny)), 0.0)
    Cn = Gm * s[:, None] * s[None, :]
    lam, V = jnp.linalg.eigh(0.5 * (Cn + Cn.T))
    keep = (lam > rcond * jnp.max(lam)) & (lam > 0)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
    sb = s * jnp.asarray(rhs).astype(jnp.float32)
    return s * jnp.matmul(V, inv * jnp.matmul(V.T, sb, precision=hi), precision=hi)


# ---------------------------------------------------------------- row scaling

_F32_EXP_MAX = 253  # biased exponent of 2**126: the largest scale (and 2**-126, biased 1, the smallest)


def row_absmax(R: jax.Array) -> jax.Array:
    """``m_i = max_j |R_ij|`` of a ``(k, ...)`` array (all axes but the first), float32 ``(k,)``.

    Overflow-free (no squares), exact; 0 for a zero row (and for ``P = 0``).
    """
    k = jnp.shape(R)[0]
    return jnp.max(jnp.abs(R.reshape(k, -1)), axis=1, initial=0).astype(jnp.float32)


def pow2_row_scales(absmax: jax.Array) -> jax.Array:
    """Powers of two ``s_i`` with ``s_i m_i`` in ``[0.5, 1)`` for row maxima ``m_i``, float32.

    ``s_i = 2**(-e_i)`` with ``m_i = f_i 2**e_i``, ``f_i`` in ``[0.5, 1)``, clamped to
    ``[2**-126, 2**126]`` (normal float32 and bfloat16 numbers); 1 for a zero row (and a
    non-finite one). Multiplying by a power of two is exact, so ``diag(s) R`` has the
    bits of ``R`` with shifted exponents: its Gram matrix has entries at most ``P`` and
    diagonal at least ``1/4`` for every non-zero row, whatever the magnitude of ``R``.

    Args:
      absmax: ``(k,)`` row maxima, e.g. from :func:`row_absmax`.

    Returns:
      ``(k,)`` float32 scales.
    """
    m = jnp.asarray(absmax).astype(jnp.float32)
    biased = (lax.bitcast_convert_type(m, jnp.int32) >> 23) & 0xFF  # m in [2**(b-127), 2**(b-126))
    exp = jnp.clip(_F32_EXP_MAX - biased, 1, _F32_EXP_MAX)  # s m in [0.5, 1) where not clamped
    s = lax.bitcast_convert_type(exp.astype(jnp.int32) << 23, jnp.float32)
    return jnp.where((m > 0) & jnp.isfinite(m), s, jnp.ones_like(s))
