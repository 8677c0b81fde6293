"""SalUn weight-saliency masks, and an optax transform that masks updates.

SalUn (Fan et al., 2024) restricts unlearning to the most *salient* weights: with saliency
s = |grad of the forget loss| (summed over the forget set), ranked globally over all
parameters, m_i = 1 for the top ``fraction`` of |s_i| and 0 elsewhere; the unlearning
updates are multiplied by m.

The global top-k is found without sorting or concatenating the parameters: a bisection on
the float32 bit patterns of |s| (monotone for non-negative floats) finds the k-th largest
value in 31 counting passes over the leaves, then ties at that value are taken in pytree
flattening order (leaf order of ``jax.tree.leaves``, row-major within a leaf), so exactly k
entries are selected, deterministically. Counts are kept as two int32 digits, so more than
2^31 parameters in total are handled (each leaf must have fewer than about 2^31 entries).

References:
  Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in
  Both Image Classification and Generation", ICLR 2024.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax

from jaxunlearn import tree as jt
from jaxunlearn import validate as V
from jaxunlearn.tree import PyTree

__all__ = ["salun_mask", "masked_updates", "top_k_mask"]

_RADIX_BITS = 16  # counts are h * 2^16 + l with int32 digits
_F32_INF_BITS = 0x7F800000


def _norm(h, l, rb):
    return h + (l >> rb), l & ((1 << rb) - 1)


def _count_ge(bits: list[jax.Array], t: jax.Array, rb: int):
    h = jnp.zeros((), jnp.int32)
    l = jnp.zeros((), jnp.int32)
    for b in bits:
        c = jnp.sum(b >= t, dtype=jnp.int32)
        h, l = _norm(h + (c >> rb), l + (c & ((1 << rb) - 1)), rb)
    return h, l


def _ge(a, b):
    return (a[0] > b[0]) | ((a[0] == b[0]) & (a[1] >= b[1]))


def _sub_clamp(a, b, cap: int, rb: int) -> jax.Array:
    """``min(max(a - b, 0), cap)`` for two-digit counts ``a``, ``b``; int32 result."""
    dh = a[0] - b[0]
    dl = a[1] - b[1]
    borrow = dl < 0
    dh = jnp.where(borrow, dh - 1, dh)
    dl = jnp.where(borrow, dl + (1 << rb), dl)
    hcap = (cap >> rb) + 1
    val = jnp.clip(dh, 0, hcap) * (1 << rb) + dl
    return jnp.where(dh < 0, 0, jnp.minimum(val, cap)).astype(jnp.int32)


def top_k_mask(leaves: list[jax.Array], k: int, rb: int = _RADIX_BITS) -> list[jax.Array]:
    """Boolean masks selecting exactly the ``k`` largest entries over all of the non-negative float32 leaves.

    A radix select on the float32 bit patterns (31 bisection steps of counts, no sort, no
    concatenation of the leaves): entries above the k-th largest value are taken, and ties at
    it are taken in flattening order (leaf by leaf, row-major) until exactly ``k`` are selected.
    Counts are carried as two int32 digits ``h * 2**rb + l``, so totals beyond 2**31 entries
    count exactly; ``k`` is a runtime value (no recompilation per ``k``).

    Args:
      leaves: non-negative float32 arrays.
      k: how many entries to select, ``1 <= k <= total size``.
      rb: bits of the low count digit (tests use a tiny radix to exercise the carries).

    Returns:
      One boolean array per leaf, ``k`` True entries in all.

    >>> [m.tolist() for m in top_k_mask([jnp.array([3.0, 1.0]), jnp.array([2.0, 3.0])], 3)]
    [[True, False], [True, True]]
    """
    kk = (jnp.int32(k >> rb), jnp.int32(k & ((1 << rb) - 1)))  # k as runtime digits: no recompile
    return _top_k_mask_digits(leaves, kk, rb)


@functools.partial(jax.jit, static_argnames=("rb",))
def _top_k_mask_digits(leaves: list[jax.Array], kk: tuple[jax.Array, jax.Array], rb: int) -> list[jax.Array]:
    bits = [jax.lax.bitcast_convert_type(x, jnp.int32) for x in leaves]

    # Invariant: count(bits >= lo) >= k > count(bits >= hi).
    def body(_, carry):
        lo, hi = carry
        mid = lo + (hi - lo) // 2
        ok = _ge(_count_ge(bits, mid, rb), kk)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, hi = jax.lax.fori_loop(
        0, 31, body, (jnp.int32(0), jnp.int32(_F32_INF_BITS + 1))
    )
    thr = lo  # bit pattern of the k-th largest value
    gh, gl = _count_ge(bits, hi, rb)  # strictly above the threshold (< k)
    rh, rl = kk[0] - gh, kk[1] - gl  # ties still to take (>= 1)
    rh, rl = jnp.where(rl < 0, rh - 1, rh), jnp.where(rl < 0, rl + (1 << rb), rl)
    oh = jnp.zeros((), jnp.int32)
    ol = jnp.zeros((), jnp.int32)
    out = []
    for b in bits:
        n = b.size
        tie = b == thr
        budget = _sub_clamp((rh, rl), (oh, ol), n, rb)
        rank = jnp.cumsum(tie.reshape(-1), dtype=jnp.int32).reshape(b.shape)
        out.append((b > thr) | (tie & (rank <= budget)))
        c = jnp.sum(tie, dtype=jnp.int32)
        oh, ol = _norm(oh + (c >> rb), ol + (c & ((1 << rb) - 1)), rb)
    return out


def salun_mask(saliency: PyTree, *, fraction: float) -> PyTree:
    """SalUn mask: ``m_i = 1`` for the top ``fraction`` of ``|s_i|`` over *all* parameters.

    Exactly ``k = max(1, round(fraction * N))`` entries are selected (N the total number of
    entries); among equal ``|s_i|`` at the threshold, the earliest in pytree flattening order
    (leaf order, then row-major) win. Works under ``jax.jit`` (``fraction`` static); no sort,
    no concatenation of the leaves.

    Args:
      saliency: s, a pytree of floating arrays, typically the forget-loss gradient summed
        over the forget set (``grad_importance(kind="abs_mean")`` is already |s| / N).
      fraction: r in (0, 1], e.g. 0.5 as in the SalUn paper.

    Returns:
      A pytree of boolean masks with the structure and shapes of ``saliency``.

    Raises:
      ValueError: ``fraction`` outside (0, 1], an empty pytree, a leaf too large for int32
        counting, NaN/Inf saliency naming the leaf (concrete inputs only; a
        ``NonFiniteError``, also a ``FloatingPointError``).

    References:
      Fan et al., "SalUn", ICLR 2024.
    """
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    jt.check_nonempty(saliency, "saliency")
    jt.check_finite(saliency, "saliency")
    paths_leaves = jt.leaves_with_paths(saliency)
    for p, x in paths_leaves:
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(f"saliency at '{p}' has non-floating dtype {jnp.result_type(x)}")
        if math.prod(jnp.shape(x)) > 2**31 - 1 - 2 ** (_RADIX_BITS + 2):
            raise ValueError(f"saliency leaf '{p}' is too large ({jnp.shape(x)}) for int32 counts")
    n = jt.size(saliency)
    if n == 0:
        raise ValueError("saliency has no entries")
    k = max(1, min(n, round(fraction * n)))
    leaves, treedef = jax.tree.flatten(saliency)
    masks = top_k_mask([jnp.abs(jnp.asarray(x).astype(jnp.float32)) for x in leaves], k)
    return jax.tree.unflatten(treedef, masks)


def masked_updates(mask: PyTree) -> optax.GradientTransformation:
    """Multiply updates by a fixed mask: ``u_i <- m_i * u_i``.

    A boolean mask zeroes the masked-out entries exactly (``where(m, u, 0)``, so even a
    non-finite update there becomes 0); a floating mask (soft weights) multiplies, in the
    update's dtype. Put it last in an ``optax.chain`` to keep the masked weights frozen, or
    first to mask the gradients fed to a stateful optimizer.

    Args:
      mask: a pytree with the structure and shapes of the updates (e.g. from ``salun_mask``).

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.EmptyState``.

    References:
      Fan et al., "SalUn", ICLR 2024.

    >>> import jax.numpy as jnp, optax
    >>> tx = optax.chain(optax.sgd(0.1), masked_updates({"w": jnp.array([True, False])}))
    """
    jt.check_nonempty(mask, "mask")

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        jt.check_same_shapes(updates, mask, ("updates", "mask"))

        def one(u, m):
            if jnp.result_type(m) == jnp.bool_:
                return jnp.where(m, u, jnp.zeros_like(u))
            return u * jnp.asarray(m).astype(jnp.result_type(u))

        return jax.tree.map(one, updates, mask), state

    return optax.GradientTransformation(init_fn, update_fn)
