"""One-pass kernels for orthogonal projection against k retain vectors.

With ``R`` the ``k x P`` matrix of retain gradients (rows ``r_i``) and ``g`` a
length-``P`` update, the projection onto the orthogonal complement of
``span(r_1..r_k)`` is::

    g_perp = g - R^T c,    c = (R R^T)^+ R g

(DESIGN.md, "Orthogonal projection"). The hot loops are memory-bound passes over
``P``: the Gram matrix ``R R^T`` (``k x k``), the dots ``R g`` (``k``), fused in
one read of ``R`` and ``g`` by :func:`gram_and_dots`, and ``g - R^T c`` in one
read-modify-write pass by :func:`subtract`. The ``k x k`` pseudo-inverse
(:func:`pinv_solve`, the single implementation of the rank rule used by the whole
library) takes ``eigh`` of the row-normalised (cosine) Gram matrix with a relative
threshold, so the rank decision depends on the angles between the retain vectors,
not on their norms; never a ``P x P`` matrix.

Paths (``impl``): ``"reference"`` (float32 ``jnp`` at ``Precision.HIGHEST``),
``"xla"`` (``dot_general`` on the native dtype with float32 accumulation),
``"pallas"``, ``"auto"`` (Pallas on TPU; on GPU Pallas when ``k`` is a power of
two >= 16, as ``tl.dot`` needs, else XLA; XLA on CPU). The platform-dependent choices
are made when the computation is lowered (``lax.platform_dependent``, see
:mod:`jaxunlearn.kernels._common`), so ``jax.export`` for TPU/GPU from a CPU host
carries the compiled kernels.

Pallas kernels: ``P`` is cut in blocks of ``block_p``. The ``floor(P / block_p)``
full blocks go through the kernel; the remaining ``P mod block_p`` columns (the
tail) are done by XLA on a small slice, so neither ``R`` nor ``g`` is ever
padded or copied. The reductions run on a grid ``(S, n)``: ``S`` independent
partial sums (axis "parallel"; 2 on TPU for the two TensorCores of a megacore
chip when possible, one per block on GPU where grid programs run concurrently)
times ``n`` blocks reduced sequentially ("arbitrary") into a resident float32
output zeroed under ``pl.when(program_id == 0)``; the ``S`` partials and the
tail are summed by XLA. The Gram update is a matrix-unit ``dot_general`` (bf16
operands, float32 accumulation); the dots and ``R^T c`` are elementwise in
float32.

Scaling. A float32 Gram matrix of retain vectors with entries around ``1e-19`` underflows
(``||r||^2 < 1.2e-38``: the vector looks like zero) and one of entries around ``1e19``
overflows to Inf, and the projection would silently do nothing. Every pass takes an
optional per-row ``scale`` (``s``, shape ``(k,)``) and then works on the scaled rows
``s_i r_i`` (``scale`` multiplies ``R`` inside the kernel, nothing is materialised);
:func:`project_tree` uses ``s = pow2_row_scales(tree_row_absmax(R))``, the powers of two
that bring every row's largest magnitude to ``[0.5, 1)``. The projection is invariant
to this scaling (``span(S R) = span(R)``: ``g - (SR)^T ((SR)(SR)^T)^+ (SR) g`` is the same
vector), powers of two scale exactly (also in bfloat16), and the scaled Gram has entries
in ``[0, P]``, so retain gradients of any magnitude representable in float32 are projected
correctly. It costs one extra read of ``R`` (the row maxima), before the Gram pass.

Hardware status: tested on CPU in Pallas interpret mode against numpy and the
``jnp`` reference, and lowered from CPU for TPU (Mosaic) and GPU (Triton) by
``jax.export`` (``tests/kernels/test_lowering.py``); the compiled paths have not
been compiled or run on hardware yet.

Sharding: the kernels see whole arrays. Inside ``jax.shard_map`` with ``P``
sharded, pass ``axis_name`` to the tree functions so the Gram and dots are
``psum``-ed across shards before the solve.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxunlearn import tree as jt

from . import _common as C

PyTree = Any

__all__ = [
    "gram",
    "dots",
    "gram_and_dots",
    "subtract",
    "gram_and_dots_reference",
    "subtract_reference",
    "pinv_solve",
    "row_absmax",
    "tree_row_absmax",
    "pow2_row_scales",
    "tree_gram_and_dots",
    "tree_subtract",
    "project_tree",
    "DEFAULT_RCOND",
]

_CONTRACT_P = (((1,), (1,)), ((), ()))  # (k, P) x (k, P) -> (k, k)


# ---------------------------------------------------------------- validation


def _check_r(R) -> tuple[int, int]:
    if jnp.ndim(R) != 2:
        raise ValueError(f"R must have shape (k, P); got rank {jnp.ndim(R)} shape {jnp.shape(R)}")
    k, P = R.shape
    if k == 0 or P == 0:
        raise ValueError(f"R is empty: shape {R.shape}")
    if k > P:
        raise ValueError(f"k = {k} retain vectors exceed their length P = {P}")
    C.check_float_dtype(R, "R")
    return k, P


def _check_g(g, P: int) -> None:
    if jnp.ndim(g) != 1 or g.shape[0] != P:
        raise ValueError(f"g must have shape (P,) = ({P},) to match R; got {jnp.shape(g)}")
    C.check_float_dtype(g, "g")


def _check_c(c, k: int) -> None:
    if jnp.shape(c) != (k,):
        raise ValueError(f"c must have shape (k,) = ({k},); got {jnp.shape(c)}")
    if not jnp.issubdtype(jnp.result_type(c), jnp.floating):
        raise TypeError(f"c must be a float array; got {jnp.result_type(c)}")


def _check_scale(scale, k: int) -> None:
    if scale is None:
        return
    if jnp.shape(scale) != (k,):
        raise ValueError(f"scale must have shape (k,) = ({k},); got {jnp.shape(scale)}")
    if not jnp.issubdtype(jnp.result_type(scale), jnp.floating):
        raise TypeError(f"scale must be a float array; got {jnp.result_type(scale)}")


def _check_rcond(rcond) -> float:
    if isinstance(rcond, bool) or not isinstance(rcond, numbers.Real) or not 0.0 <= rcond < 1.0:
        raise ValueError(f"rcond must be a Python float in [0, 1); got {rcond!r}")
    return float(rcond)


# ---------------------------------------------------------------- XLA / reference


def _scale_rows(R: jax.Array, scale: jax.Array | None, dtype=None) -> jax.Array:
    """``diag(scale) R`` in ``dtype`` (default ``R``'s): exact for power-of-two scales."""
    dtype = R.dtype if dtype is None else dtype
    if scale is None:
        return R.astype(dtype)
    return R.astype(dtype) * scale.astype(dtype)[:, None]


def gram_and_dots_reference(R: jax.Array, g: jax.Array | None = None, scale: jax.Array | None = None):
    """``(S R (S R)^T, S R g)`` with ``S = diag(scale)`` (identity if None), float32 at
    ``Precision.HIGHEST`` (the dots are None if ``g`` is)."""
    R32 = _scale_rows(R, scale, jnp.float32)
    G = jnp.matmul(R32, R32.T, precision=lax.Precision.HIGHEST)
    d = None if g is None else jnp.matmul(R32, g.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return G, d


def subtract_reference(g: jax.Array, R: jax.Array, c: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """``g - (S R)^T c`` (``S = diag(scale)``, identity if None) in float32, in ``g``'s dtype."""
    out = g.astype(jnp.float32) - jnp.matmul(
        c.astype(jnp.float32), _scale_rows(R, scale, jnp.float32), precision=lax.Precision.HIGHEST
    )
    return out.astype(g.dtype)


def _xla_gram_and_dots(R, g, scale, want_gram: bool):
    cdt = C.compute_dtype(R.dtype, *(() if g is None else (g.dtype,)))
    prec = C.dot_precision(cdt)
    Rc = _scale_rows(R, scale).astype(cdt)
    G = None
    if want_gram:
        G = lax.dot_general(Rc, Rc, _CONTRACT_P, precision=prec, preferred_element_type=jnp.float32)
    d = None
    if g is not None:
        d = lax.dot_general(
            Rc, g.astype(cdt), (((1,), (0,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
        )
    return G, d


def _xla_subtract(g, R, c, scale=None):
    Rg = _scale_rows(R, scale, jnp.float32)
    corr = lax.dot_general(
        c.astype(jnp.float32), Rg, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST
    )
    return (g.astype(jnp.float32) - corr).astype(g.dtype)


# ---------------------------------------------------------------- Pallas kernels


def _reduce_kernel(*refs, want_gram: bool, want_dots: bool, scaled: bool, cdt, precision):
    """One ``(k, block_p)`` block of ``R`` (and ``(1, block_p)`` of ``g``) per step; with
    ``scaled``, the rows are first multiplied by the ``(k, 1)`` scales."""
    refs = list(refs)
    r_ref = refs.pop(0)
    s_ref = refs.pop(0) if scaled else None
    g_ref = refs.pop(0) if want_dots else None
    gram_ref = refs.pop(0) if want_gram else None
    dots_ref = refs.pop(0) if want_dots else None

    @pl.when(pl.program_id(1) == 0)
    def _zero():
        if gram_ref is not None:
            gram_ref[...] = jnp.zeros(gram_ref.shape, jnp.float32)
        if dots_ref is not None:
            dots_ref[...] = jnp.zeros(dots_ref.shape, jnp.float32)

    r = r_ref[...]
    if s_ref is not None:  # power-of-two scales: exact, also when cast back to bfloat16
        r = r.astype(jnp.float32) * s_ref[...]
    if gram_ref is not None:
        rc = r.astype(cdt)
        gram_ref[...] += lax.dot_general(
            rc, rc, _CONTRACT_P, precision=precision, preferred_element_type=jnp.float32
        )
    if dots_ref is not None:
        prod = r.astype(jnp.float32) * g_ref[...].astype(jnp.float32)  # (k, bp) * (1, bp)
        dots_ref[...] += jnp.sum(prod, axis=1, keepdims=True)


def _subtract_kernel(g_ref, r_ref, c_ref, *refs):
    s_ref, o_ref = refs if len(refs) == 2 else (None, refs[0])
    r = r_ref[...].astype(jnp.float32)
    if s_ref is not None:
        r = r * s_ref[...]  # (k, bp) * (k, 1)
    corr = jnp.sum(c_ref[...] * r, axis=0, keepdims=True)  # (1, bp)
    o_ref[...] = (g_ref[...].astype(jnp.float32) - corr).astype(o_ref.dtype)


def _default_block_p(plat: str) -> int:
    return 2048 if plat == "gpu" else 8192


def _block_p(block_p: int | None, plat: str, interpret: bool) -> int:
    C.check_block(block_p, "block_p")
    bp = block_p or _default_block_p(plat)
    if not interpret and plat == "tpu" and bp % 128:
        raise ValueError(f"block_p must be a multiple of 128 on TPU; got {bp}")
    if not interpret and plat == "gpu" and bp != C.next_power_of_2(bp):
        raise ValueError(f"block_p must be a power of two on GPU (Triton); got {bp}")
    return bp


def _triton_k_ok(k: int) -> bool:
    return k >= 16 and k == C.next_power_of_2(k)  # Triton tl.dot needs power-of-two dims >= 16


def _check_triton_k(k: int, plat: str, interpret: bool) -> None:
    if plat == "gpu" and not interpret and not _triton_k_ok(k):
        raise ValueError(
            f"the Triton (GPU) kernels need k to be a power of two >= 16; got k = {k} "
            "(use impl='xla' or 'auto')"
        )


def _splits(n_full: int, splits: int | None, plat: str) -> int:
    if splits is None:
        if plat == "gpu":
            return n_full
        return 2 if plat == "tpu" and n_full % 2 == 0 else 1
    if not isinstance(splits, int) or splits <= 0 or n_full % splits:
        raise ValueError(f"splits must be a positive divisor of the {n_full} full blocks; got {splits!r}")
    return splits


def _compiler_params(plat: str, interpret: bool, semantics: tuple[str, ...]):
    if interpret:
        return None
    if plat == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=semantics)
    if plat == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=8, num_stages=2)
    return None


class _Plan(NamedTuple):
    """A validated Pallas configuration for one platform (``splits`` only for reductions)."""

    plat: str
    bp: int
    interpret: bool
    splits: int


def _plan(plat: str, k: int, P: int, *, block_p, interpret, splits=None) -> _Plan:
    """Block length, mode and partial sums on ``plat``; ``ValueError`` if invalid there."""
    interpret = C.resolve_interpret(interpret, plat)
    C.check_pallas_platform(plat, interpret)
    bp = _block_p(block_p, plat, interpret)
    _check_triton_k(k, plat, interpret)
    n_full = P // bp
    return _Plan(plat, bp, interpret, _splits(n_full, splits, plat) if n_full else 1)


def _branches(impl: str, k: int, P: int, xla_fn, pallas_fn, **opts):
    """``build(plat)`` for :func:`jaxunlearn.kernels._common.per_platform`: ``xla_fn`` where
    ``impl="auto"`` picks XLA (CPU; GPU when ``k`` does not suit ``tl.dot``), else
    ``pallas_fn`` bound to the platform's plan."""

    def build(plat):
        if impl == "auto" and (plat == "cpu" or (plat == "gpu" and not _triton_k_ok(k))):
            return xla_fn
        return functools.partial(pallas_fn, _plan(plat, k, P, **opts))

    return build


def _pallas_reduce(plan: _Plan, R, g, scale, *, want_gram: bool):
    k, P = R.shape
    plat, bp, interpret, S = plan
    n_full = P // bp
    want_dots = g is not None
    G = jnp.zeros((k, k), jnp.float32) if want_gram else None
    d = jnp.zeros((k,), jnp.float32) if want_dots else None

    if n_full:
        n = n_full // S
        cdt = C.compute_dtype(R.dtype, *((g.dtype,) if want_dots else ()))
        operands = [R]
        in_specs = [pl.BlockSpec((k, bp), lambda s, p: (0, s * n + p))]
        if scale is not None:
            operands.append(scale.astype(jnp.float32).reshape(k, 1))
            in_specs.append(pl.BlockSpec((k, 1), lambda s, p: (0, 0)))
        if want_dots:
            operands.append(g.reshape(1, P))
            in_specs.append(pl.BlockSpec((1, bp), lambda s, p: (0, s * n + p)))
        out_shape, out_specs = [], []
        if want_gram:
            out_shape.append(C.out_struct((S, k, k), jnp.float32, *operands))
            out_specs.append(pl.BlockSpec((pl.squeezed, k, k), lambda s, p: (s, 0, 0)))
        if want_dots:
            out_shape.append(C.out_struct((S, k, 1), jnp.float32, *operands))
            out_specs.append(pl.BlockSpec((pl.squeezed, k, 1), lambda s, p: (s, 0, 0)))
        cols = n_full * bp
        nbytes = cols * (k * R.dtype.itemsize + (g.dtype.itemsize if want_dots else 0))
        outs = pl.pallas_call(
            functools.partial(
                _reduce_kernel,
                want_gram=want_gram,
                want_dots=want_dots,
                scaled=scale is not None,
                cdt=cdt,
                precision=C.dot_precision(cdt),
            ),
            out_shape=out_shape,
            grid=(S, n),
            in_specs=in_specs,
            out_specs=out_specs,
            compiler_params=_compiler_params(plat, interpret, ("parallel", "arbitrary")),
            cost_estimate=pl.CostEstimate(
                flops=2 * cols * (k * k * want_gram + k * want_dots), transcendentals=0, bytes_accessed=nbytes
            ),
            interpret=interpret,
            name="gram_and_dots" if want_gram and want_dots else ("gram" if want_gram else "dots"),
        )(*operands)
        outs = list(outs)
        if want_gram:
            G = jnp.sum(outs.pop(0), axis=0)
        if want_dots:
            d = jnp.sum(outs.pop(0), axis=0)[:, 0]

    if n_full * bp < P:  # tail: fewer than block_p columns, by XLA on a small slice
        lo = n_full * bp
        Gt, dt = _xla_gram_and_dots(R[:, lo:], None if g is None else g[lo:], scale, want_gram)
        G = G + Gt if want_gram else None
        d = d + dt if want_dots else None
    return G, d


def _pallas_subtract(plan: _Plan, g, R, c, scale=None):
    k, P = R.shape
    plat, bp, interpret, _ = plan
    n_full = P // bp
    c32 = c.astype(jnp.float32)
    if n_full == 0:
        return _xla_subtract(g, R, c32, scale)
    operands = [g.reshape(1, P), R, c32.reshape(k, 1)]
    in_specs = [
        pl.BlockSpec((1, bp), lambda p: (0, p)),
        pl.BlockSpec((k, bp), lambda p: (0, p)),
        pl.BlockSpec((k, 1), lambda p: (0, 0)),
    ]
    if scale is not None:
        operands.append(scale.astype(jnp.float32).reshape(k, 1))
        in_specs.append(pl.BlockSpec((k, 1), lambda p: (0, 0)))
    out = pl.pallas_call(
        _subtract_kernel,
        out_shape=C.out_struct((1, P), g.dtype, *operands),
        grid=(n_full,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((1, bp), lambda p: (0, p)),
        compiler_params=_compiler_params(plat, interpret, ("parallel",)),
        cost_estimate=pl.CostEstimate(
            flops=2 * k * n_full * bp,
            transcendentals=0,
            bytes_accessed=n_full * bp * (k * R.dtype.itemsize + 2 * g.dtype.itemsize),
        ),
        interpret=interpret,
        name="subtract",
    )(*operands)[0]
    lo = n_full * bp
    if lo < P:
        out = lax.dynamic_update_slice(out, _xla_subtract(g[lo:], R[:, lo:], c32, scale), (lo,))
    return out


# ---------------------------------------------------------------- array front ends


_STATIC = ("impl", "block_p", "interpret", "splits")


@functools.partial(jax.jit, static_argnames=_STATIC + ("want_gram",))
def _gram_and_dots(R, g, scale=None, *, want_gram=True, impl="auto", block_p=None, interpret=None, splits=None):
    k, P = _check_r(R)
    if g is not None:
        _check_g(g, P)
    _check_scale(scale, k)
    C.check_impl(impl)
    C.check_block(block_p, "block_p")
    if impl == "reference":
        G, d = gram_and_dots_reference(R, g, scale)
        return (G if want_gram else None), d
    xla_fn = functools.partial(_xla_gram_and_dots, want_gram=want_gram)
    if impl == "xla":
        return xla_fn(R, g, scale)
    pallas_fn = functools.partial(_pallas_reduce, want_gram=want_gram)
    build = _branches(impl, k, P, xla_fn, pallas_fn, block_p=block_p, interpret=interpret, splits=splits)
    return C.per_platform(build, R, g, scale)


def gram_and_dots(
    R: jax.Array,
    g: jax.Array,
    *,
    impl: C.Impl = "auto",
    block_p: int | None = None,
    interpret: bool | None = None,
    splits: int | None = None,
    scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Gram matrix and dot products in one pass: ``(R R^T, R g)``, or of the scaled rows.

    With ``scale`` (``s``, shape ``(k,)``) the rows are ``s_i r_i``: the result is
    ``(S R R^T S, S R g)`` with ``S = diag(s)``, the scaling applied to each block of ``R``
    inside the pass (before the products, so a Gram that would under/overflow in float32
    does not; see the module docstring and :func:`pow2_row_scales`).

    Args:
      R: ``(k, P)`` retain vectors (rows), float32 or bfloat16, ``1 <= k <= P``.
      g: ``(P,)`` vector, float32 or bfloat16 (may differ from ``R``'s dtype; then
        both are read as float32).
      impl: ``"auto"``, ``"pallas"``, ``"xla"`` or ``"reference"`` (module docstring).
      block_p: Pallas block length along ``P`` (default 8192; 2048 on GPU; a multiple
        of 128 on TPU, a power of two on GPU).
      interpret: Pallas interpreter; default True on CPU.
      splits: number of independent partial sums of the Pallas reduction (must
        divide the number of full blocks); default 2 on TPU when possible, one per
        block on GPU, 1 otherwise.
      scale: optional ``(k,)`` float row scales (may be traced; powers of two are exact).

    Returns:
      ``(gram, dots)``: ``(k, k)`` and ``(k,)`` float32 arrays.

    Raises:
      ValueError: ``R`` not 2-D or empty, ``k > P``, ``g`` not ``(P,)``, ``scale`` not
        ``(k,)``, bad blocks.
      TypeError: dtypes other than float32/bfloat16.
    """
    return _gram_and_dots(R, g, scale, impl=impl, block_p=block_p, interpret=interpret, splits=splits)


def gram(
    R: jax.Array,
    *,
    impl: C.Impl = "auto",
    block_p: int | None = None,
    interpret: bool | None = None,
    splits: int | None = None,
    scale: jax.Array | None = None,
) -> jax.Array:
    """Gram matrix ``R R^T`` (``(k, k)`` float32) in one pass over ``R`` (``(k, P)``);
    ``S R R^T S`` with ``scale``.

    Args and Raises as in :func:`gram_and_dots` (without ``g``).
    """
    return _gram_and_dots(R, None, scale, impl=impl, block_p=block_p, interpret=interpret, splits=splits)[0]


def dots(
    R: jax.Array,
    g: jax.Array,
    *,
    impl: C.Impl = "auto",
    block_p: int | None = None,
    interpret: bool | None = None,
    splits: int | None = None,
    scale: jax.Array | None = None,
) -> jax.Array:
    """Dot products ``R g`` (``(k,)`` float32), one pass over ``R`` and ``g``; ``S R g``
    with ``scale``.

    Args and Raises as in :func:`gram_and_dots`.
    """
    return _gram_and_dots(
        R, g, scale, want_gram=False, impl=impl, block_p=block_p, interpret=interpret, splits=splits
    )[1]


@functools.partial(jax.jit, static_argnames=("impl", "block_p", "interpret"))
def subtract(
    g: jax.Array,
    R: jax.Array,
    c: jax.Array,
    *,
    impl: C.Impl = "auto",
    block_p: int | None = None,
    interpret: bool | None = None,
    scale: jax.Array | None = None,
) -> jax.Array:
    """``g - R^T c`` in one pass over ``g`` and ``R``, computed in float32; with ``scale``
    ``g - (S R)^T c``, ``S = diag(scale)`` (``c`` the coefficients in the scaled basis).

    Args:
      g: ``(P,)`` float32 or bfloat16.
      R: ``(k, P)`` float32 or bfloat16.
      c: ``(k,)`` float coefficients (used in float32).
      impl, block_p, interpret: as in :func:`gram_and_dots`.
      scale: optional ``(k,)`` float row scales, as in :func:`gram_and_dots`.

    Returns:
      ``(P,)`` array in ``g``'s dtype.

    Raises:
      ValueError: shapes inconsistent (``R`` not ``(k, P)``, ``c`` or ``scale`` not ``(k,)``,
        ``k > P``).
      TypeError: unsupported dtypes.
    """
    k, P = _check_r(R)
    _check_g(g, P)
    _check_c(c, k)
    _check_scale(scale, k)
    C.check_impl(impl)
    C.check_block(block_p, "block_p")
    if impl == "reference":
        return subtract_reference(g, R, c, scale)
    if impl == "xla":
        return _xla_subtract(g, R, c, scale)
    return C.per_platform(_branches(impl, k, P, _xla_subtract, _pallas_subtract, block_p=block_p,
                                    interpret=interpret), g, R, c, scale)


# ---------------------------------------------------------------- k x k solve


DEFAULT_RCOND = 1e-6


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


def tree_row_absmax(r_trees: PyTree, *, axis_name: str | tuple[str, ...] | None = None) -> jax.Array:
    """``m_i = max |r_i|`` over every entry of retain vector ``i`` in every leaf, float32 ``(k,)``.

    Args:
      r_trees: a pytree whose leaves have a leading axis of ``k`` retain vectors
        (shape ``(k, *leaf_shape)``).
      axis_name: mesh axis (or tuple of axes) to ``pmax`` over, inside ``jax.shard_map``
        with the leaves sharded, so every shard gets the global maxima (and the same
        scales); ``None`` or ``()`` for leaves that are not split.

    Returns:
      ``(k,)`` float32 row maxima.

    Raises:
      ValueError: an empty tree, a 0-d leaf, or leaves that disagree on ``k``.
    """
    leaves = jax.tree.leaves(r_trees)
    if not leaves:
        raise ValueError("r_trees is an empty pytree (no array leaves)")
    ks = {jnp.shape(r)[0] if jnp.ndim(r) else None for r in leaves}
    if None in ks or len(ks) != 1:
        raise ValueError(f"every r_trees leaf needs the same leading k; got leading axes {sorted(map(str, ks))}")
    m = functools.reduce(jnp.maximum, [row_absmax(r) for r in leaves])
    if axis_name:  # None or () (a replicated group of leaves): nothing to reduce over
        m = lax.pmax(m, axis_name)
    return m


def pow2_row_scales(absmax: jax.Array) -> jax.Array:
    """Powers of two ``s_i`` with ``s_i m_i`` in ``[0.5, 1)`` for row maxima ``m_i``, float32.

    ``s_i = 2**(-e_i)`` with ``m_i = f_i 2**e_i``, ``f_i`` in ``[0.5, 1)``, clamped to
    ``[2**-126, 2**126]`` (normal float32 and bfloat16 numbers); 1 for a zero row (and a
    non-finite one). Multiplying by a power of two is exact, so ``diag(s) R`` has the
    bits of ``R`` with shifted exponents: its Gram matrix has entries at most ``P`` and
    diagonal at least ``1/4`` for every non-zero row, whatever the magnitude of ``R``.

    Args:
      absmax: ``(k,)`` row maxima, e.g. from :func:`tree_row_absmax`.

    Returns:
      ``(k,)`` float32 scales.
    """
    m = jnp.asarray(absmax).astype(jnp.float32)
    biased = (lax.bitcast_convert_type(m, jnp.int32) >> 23) & 0xFF  # m in [2**(b-127), 2**(b-126))
    exp = jnp.clip(_F32_EXP_MAX - biased, 1, _F32_EXP_MAX)  # s m in [0.5, 1) where not clamped
    s = lax.bitcast_convert_type(exp.astype(jnp.int32) << 23, jnp.float32)
    return jnp.where((m > 0) & jnp.isfinite(m), s, jnp.ones_like(s))


# ---------------------------------------------------------------- pytree front end


def _check_trees(g_tree: PyTree, r_trees: PyTree, *, check_k_le_p: bool) -> int:
    jt.check_nonempty(g_tree, "g_tree")
    jt.check_same_structure(g_tree, r_trees, ("g_tree", "r_trees"))
    ks = set()
    total = 0
    for (path, g), (_, r) in zip(jt.leaves_with_paths(g_tree), jt.leaves_with_paths(r_trees)):
        if jnp.ndim(r) != jnp.ndim(g) + 1 or tuple(r.shape[1:]) != tuple(jnp.shape(g)):
            raise ValueError(
                f"r_trees leaf '{path}' must have shape (k, *{jnp.shape(g)}) (a leading k axis over the "
                f"g_tree leaf); got {jnp.shape(r)}"
            )
        C.check_float_dtype(g, f"g_tree leaf '{path}'")
        C.check_float_dtype(r, f"r_trees leaf '{path}'")
        ks.add(r.shape[0])
        total += int(jnp.size(g))
    if len(ks) != 1:
        raise ValueError(f"every r_trees leaf needs the same leading k; got {sorted(ks)}")
    (k,) = ks
    if k == 0:
        raise ValueError("r_trees holds k = 0 retain vectors")
    if check_k_le_p and k > total:
        raise ValueError(f"k = {k} retain vectors exceed the number of parameters P = {total}")
    return k


def _leaf_gram_and_dots(g, r, k: int, scale=None, **opts) -> tuple[jax.Array, jax.Array]:
    """``(R_l R_l^T, R_l g_l)`` of one leaf (of ``S R_l`` with ``scale``), flattened by a free
    reshape to ``(k, P_l)``."""
    R, gv = r.reshape(k, -1), g.reshape(-1)
    if R.shape[1] < k:  # a leaf shorter than k (a bias, a norm scale): too small for a kernel
        return _xla_gram_and_dots(R, gv, scale, True)
    return gram_and_dots(R, gv, scale=scale, **opts)


def _leaf_subtract(g, r, c, k: int, scale=None, **opts) -> jax.Array:
    """``g_l - R_l^T c`` (``g_l - (S R_l)^T c`` with ``scale``) of one leaf, in ``g_l``'s dtype
    and shape."""
    R = r.reshape(k, -1)
    if R.shape[1] < k:  # a leaf shorter than k: too small for a kernel
        out = _xla_subtract(g.reshape(-1), R, c, scale)
    else:
        out = subtract(g.reshape(-1), R, c, scale=scale, **opts)
    return out.reshape(g.shape)


@functools.partial(jax.jit, static_argnames=("impl", "block_p", "interpret", "axis_name"))
def tree_gram_and_dots(
    g_tree: PyTree,
    r_trees: PyTree,
    *,
    impl: C.Impl = "auto",
    block_p: int | None = None,
    interpret: bool | None = None,
    axis_name: str | None = None,
    scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(R R^T, R g)`` over pytrees, leaf by leaf, summed; no global ravel.

    Each leaf pair is flattened by a free reshape to ``(k, P_leaf)`` / ``(P_leaf,)``
    and reduced by :func:`gram_and_dots`; the ``k x k`` and ``k`` results are summed
    over leaves (and ``psum``-ed over ``axis_name`` if given, for use inside
    ``jax.shard_map`` with leaves sharded).

    Args:
      g_tree: pytree of float32/bfloat16 arrays.
      r_trees: the same structure, each leaf with a leading axis of ``k`` retain
        vectors: shape ``(k, *g_leaf.shape)``.
      impl, block_p, interpret: as in :func:`gram_and_dots`.
      axis_name: mesh axis to sum over (inside ``shard_map``), or None.
      scale: optional ``(k,)`` row scales ``s`` (the same for every leaf): then the result
        is ``(S R R^T S, S R g)``, ``S = diag(s)`` (see :func:`gram_and_dots`).

    Returns:
      ``(gram, dots)``, ``(k, k)`` and ``(k,)`` float32.
    """
    k = _check_trees(g_tree, r_trees, check_k_le_p=axis_name is None)
    _check_scale(scale, k)
    G = jnp.zeros((k, k), jnp.float32)
    d = jnp.zeros((k,), jnp.float32)
    for g, r in zip(jax.tree.leaves(g_tree), jax.tree.leaves(r_trees)):
        Gl, dl = _leaf_gram_and_dots(g, r, k, scale, impl=impl, block_p=block_p, interpret=interpret)
        G, d = G + Gl, d + dl
    if axis_name is not None:
        G, d = lax.psum((G, d), axis_name)
    return G, d


@functools.partial(jax.jit, static_argnames=("impl", "block_p", "interpret"))
def tree_subtract(
    g_tree: PyTree,
    r_trees: PyTree,
    c: jax.Array,
    *,
    impl: C.Impl = "auto",
    block_p: int | None = None,
    interpret: bool | None = None,
    scale: jax.Array | None = None,
) -> PyTree:
    """``g - R^T c`` leaf by leaf: ``g_leaf - sum_i c_i r_i,leaf``, in each g leaf's dtype;
    with ``scale``, ``g_leaf - sum_i c_i s_i r_i,leaf``.

    Args:
      g_tree, r_trees: as in :func:`tree_gram_and_dots`.
      c: ``(k,)`` float coefficients (in the scaled basis when ``scale`` is given).
      impl, block_p, interpret: as in :func:`subtract`.
      scale: optional ``(k,)`` row scales, as in :func:`tree_gram_and_dots`.

    Returns:
      A pytree shaped like ``g_tree``.
    """
    k = _check_trees(g_tree, r_trees, check_k_le_p=False)
    _check_c(c, k)
    _check_scale(scale, k)
    return jax.tree.map(
        lambda g, r: _leaf_subtract(g, r, c, k, scale, impl=impl, block_p=block_p, interpret=interpret),
        g_tree,
        r_trees,
    )


@functools.partial(
    jax.jit, static_argnames=("rcond", "per_tensor", "impl", "block_p", "interpret", "axis_name")
)
def project_tree(
    g_tree: PyTree,
    r_trees: PyTree,
    *,
    rcond: float = DEFAULT_RCOND,
    per_tensor: bool = False,
    impl: C.Impl = "auto",
    block_p: int | None = None,
    interpret: bool | None = None,
    axis_name: str | None = None,
) -> PyTree:
    """Project ``g`` onto the orthogonal complement of ``k`` retain vectors.

    Contract (the core of ``jaxunlearn.projection``)::

        s = pow2_row_scales(max |r_i|)      (k,), powers of two, one read of R
        G = sum_leaves S R_l R_l^T S        (k, k), float32, one pass per leaf
        d = sum_leaves S R_l g_l            (k,),   float32, same pass
        c = pinv_solve(G, d, rcond)         cosine-Gram eigh, angle-based rank rule
        out_l = g_l - (S R_l)^T c           per leaf, in g_l's dtype

    so ``out = g - R^T (R R^T)^+ R g`` with ``R`` the ``k x P`` matrix whose row ``i``
    is retain vector ``i`` raveled over all leaves (the ravel is never formed).
    With ``per_tensor=False`` the subspace is global (one ``c`` for all leaves).
    With ``per_tensor=True`` every leaf has its own subspace: ``G_l``, ``d_l`` and
    ``c_l = pinv_solve(G_l, d_l)`` per leaf (one batched ``eigh``), so
    ``<out_l, r_{i,l}> = 0`` for every leaf; a leaf shorter than ``k`` is allowed
    there (its Gram is rank-deficient). ``<out, r_i> = 0`` for every kept direction
    (up to float32 round-off relative to ``||g|| ||r_i||``); the result is
    idempotent; ``k = 1`` gives ``g - (<g, r>/||r||^2) r``; all-zero ``R`` returns
    ``g``; duplicated or linearly dependent retain vectors give no NaN; retain
    vectors of very different norms are all kept (see :func:`pinv_solve`); the
    row scaling ``S = diag(s)`` (module docstring) keeps retain vectors of any
    magnitude (``1e-19`` or ``1e19``) from under/overflowing the float32 Gram.

    Args:
      g_tree: pytree of float32/bfloat16 arrays (the update to project).
      r_trees: same structure, each leaf ``(k, *g_leaf.shape)``: ``k`` retain
        vectors stacked on a leading axis (float32/bfloat16).
      rcond: relative eigenvalue cut-off of :func:`pinv_solve` (a static Python float).
      per_tensor: a separate subspace per leaf instead of one global subspace.
      impl: ``"auto"``, ``"pallas"``, ``"xla"`` or ``"reference"`` for the passes.
      block_p, interpret: Pallas options (see :func:`gram_and_dots`).
      axis_name: inside ``jax.shard_map`` with leaves sharded, the mesh axis over
        which Gram and dots are ``psum``-ed (then the ``k <= P`` check is skipped).

    Returns:
      The projected pytree, same structure, shapes and dtypes as ``g_tree``.

    Raises:
      ValueError: empty tree, mismatched structures or shapes, leading ``k`` not
        the same on every leaf, ``k > P`` (global subspace only), ``rcond``
        outside ``[0, 1)``.
      TypeError: dtypes other than float32/bfloat16.

    References:
      Farajtabar et al., "Orthogonal Gradient Descent for Continual Learning", 2020;
      geometric-disentanglement unlearning (DESIGN.md).

    Example:
      >>> g = {"w": jnp.array([1.0, 1.0])}; r = {"w": jnp.array([[1.0, 0.0]])}
      >>> project_tree(g, r)["w"]
      Array([0., 1.], dtype=float32)
    """
    rcond = _check_rcond(rcond)
    opts = dict(impl=impl, block_p=block_p, interpret=interpret)
    if not per_tensor:
        _check_trees(g_tree, r_trees, check_k_le_p=axis_name is None)
        s = pow2_row_scales(tree_row_absmax(r_trees, axis_name=axis_name))
        G, d = tree_gram_and_dots(g_tree, r_trees, axis_name=axis_name, scale=s, **opts)
        return tree_subtract(g_tree, r_trees, pinv_solve(G, d, rcond), scale=s, **opts)
    k = _check_trees(g_tree, r_trees, check_k_le_p=False)
    g_leaves, treedef = jax.tree.flatten(g_tree)
    r_leaves = jax.tree.leaves(r_trees)
    ms = jnp.stack([row_absmax(r) for r in r_leaves])  # (n_leaves, k)
    if axis_name:
        ms = lax.pmax(ms, axis_name)
    ss = pow2_row_scales(ms.reshape(-1)).reshape(ms.shape)
    parts = [_leaf_gram_and_dots(g, r, k, ss[i], **opts) for i, (g, r) in enumerate(zip(g_leaves, r_leaves))]
    Gs, ds = jnp.stack([p[0] for p in parts]), jnp.stack([p[1] for p in parts])
    if axis_name is not None:
        Gs, ds = lax.psum((Gs, ds), axis_name)
    cs = jax.vmap(lambda G, d: pinv_solve(G, d, rcond))(Gs, ds)
    out = [_leaf_subtract(g, r, cs[i], k, ss[i], **opts) for i, (g, r) in enumerate(zip(g_leaves, r_leaves))]
    return jax.tree.unflatten(treedef, out)
