"""One-pass array kernels for orthogonal projection against k retain vectors.

With ``R`` the ``k x P`` matrix of retain vectors (rows ``r_i``) and ``g`` a length-``P``
update, the projection onto the orthogonal complement of ``span(r_1..r_k)`` is::

    g_perp = g - R^T c,    c = (R R^T)^+ R g

(the pytree projection built on these array ops is :func:`jaxunlearn.projection.project_tree`).
The hot loops are memory-bound passes over ``P``: the Gram matrix ``R R^T`` (``k x k``) and
the dots ``R g`` (``k``), fused in one read of ``R`` and ``g`` by :func:`gram_and_dots`, and
``g - R^T c`` in one read-modify-write pass by :func:`subtract`. The ``k x k``
pseudo-inverse (:func:`pinv_solve`, the single implementation of the rank rule used by the
whole library) takes ``eigh`` of the row-normalised (cosine) Gram matrix with a relative
threshold, so the rank decision depends on the angles between the retain vectors, not on
their norms; never a ``P x P`` matrix. It and the row scaling below live in
:mod:`jaxunlearn.kernels.solve` and are re-exported here. This module works on arrays only.

Paths (``impl``): ``"reference"`` (float32 ``jnp`` at ``Precision.HIGHEST``; also
:func:`gram_and_dots_reference`, :func:`subtract_reference`), ``"xla"`` (``dot_general`` on
the native dtype with float32 accumulation; also :func:`gram_and_dots_xla`,
:func:`subtract_xla`, which take any ``k``, also ``k > P``), ``"pallas"``, ``"auto"`` (Pallas
on TPU; on GPU Pallas when ``k`` is a power of two >= 16, as ``tl.dot`` needs, else XLA; XLA
on CPU). The platform-dependent choices are made when the computation is lowered
(``lax.platform_dependent``, see :mod:`jaxunlearn.kernels.dispatch`), so ``jax.export`` for
TPU/GPU from a CPU host carries the compiled kernels.

Pallas kernels: ``P`` is cut in blocks of ``block_p``. The ``floor(P / block_p)`` full blocks
go through the kernel; the remaining ``P mod block_p`` columns (the tail) are done by XLA on
a small slice, so neither ``R`` nor ``g`` is ever padded or copied. The reductions run on a
grid ``(S, n)``: ``S`` independent partial sums (axis "parallel"; 2 on TPU for the two
TensorCores of a megacore chip when possible, one per block on GPU where grid programs run
concurrently) times ``n`` blocks reduced sequentially ("arbitrary") into a resident float32
output zeroed under ``pl.when(program_id == 0)``; the ``S`` partials and the tail are summed
by XLA. The Gram update is a matrix-unit ``dot_general`` (bf16 operands, float32
accumulation); the dots and ``R^T c`` are elementwise in float32.

Scaling. A float32 Gram matrix of retain vectors with entries around ``1e-19`` underflows
(``||r||^2 < 1.2e-38``: the vector looks like zero) and one of entries around ``1e19``
overflows to Inf, and the projection would silently do nothing. Every pass takes an optional
per-row ``scale`` (``s``, shape ``(k,)``) and then works on the scaled rows ``s_i r_i``
(``scale`` multiplies ``R`` inside the kernel, nothing is materialised); the projection uses
``s = pow2_row_scales(row_absmax(R))``, the powers of two that bring every row's largest
magnitude to ``[0.5, 1)``. The projection is invariant to this scaling (``span(S R) =
span(R)``: ``g - (SR)^T ((SR)(SR)^T)^+ (SR) g`` is the same vector), powers of two scale
exactly (also in bfloat16), and the scaled Gram has entries in ``[0, P]``, so retain vectors
of any magnitude representable in float32 are projected correctly. It costs one extra read
of ``R`` (the row maxima), before the Gram pass.

Hardware status: tested on CPU in Pallas interpret mode against numpy and the ``jnp``
reference, and lowered from CPU for TPU (Mosaic) and GPU (Triton) by ``jax.export``
(``tests/kernels/test_lowering.py``). The Triton (GPU) kernels have been compiled and run
on one NVIDIA H200 (jax 0.11.2; their hardware test passes in float32 and bfloat16 once the
GPU ``block_p`` is sized to shared memory, :func:`default_block_p`); the Mosaic (TPU) ones
have not been compiled yet. The kernels see whole arrays: inside ``jax.shard_map`` with ``P`` sharded, the
caller ``psum`` s the Gram and dots across shards before the solve.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import dispatch as C
from .solve import DEFAULT_RCOND, pinv_solve, pow2_row_scales, row_absmax

__all__ = [
    "gram",
    "dots",
    "gram_and_dots",
    "subtract",
    "gram_and_dots_xla",
    "subtract_xla",
    "gram_and_dots_reference",
    "subtract_reference",
    "pinv_solve",
    "default_block_p",
    "GPU_DOT_SMEM_BYTES",
    "row_absmax",
    "pow2_row_scales",
    "DEFAULT_RCOND",
]

_CONTRACT_P = (((1,), (1,)), ((), ()))  # (k, P) x (k, P) -> (k, k)


# ---------------------------------------------------------------- validation


def _check_r(R, *, k_le_p: bool = True) -> tuple[int, int]:
    if jnp.ndim(R) != 2:
        raise ValueError(f"R must have shape (k, P); got rank {jnp.ndim(R)} shape {jnp.shape(R)}")
    k, P = R.shape
    if k == 0 or P == 0:
        raise ValueError(f"R is empty: shape {R.shape}")
    if k_le_p and k > P:
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


def gram_and_dots_xla(R: jax.Array, g: jax.Array, scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The ``"xla"`` path of :func:`gram_and_dots`, ``(S R (S R)^T, S R g)``, for any ``k``.

    ``dot_general`` on the native dtype (float32 operands at ``Precision.HIGHEST``) with
    float32 accumulation; unlike :func:`gram_and_dots` it also takes ``k > P`` (a pytree leaf
    shorter than the number of retain vectors, too small for a kernel).

    Args:
      R: ``(k, P)`` float32 or bfloat16.
      g: ``(P,)`` float32 or bfloat16.
      scale: optional ``(k,)`` float row scales ``s`` (``S = diag(s)``; identity if None).

    Returns:
      ``(gram, dots)``: ``(k, k)`` and ``(k,)`` float32.

    Raises:
      ValueError: ``R`` not 2-D or empty, ``g`` not ``(P,)``, ``scale`` not ``(k,)``.
      TypeError: dtypes other than float32/bfloat16.
    """
    k, P = _check_r(R, k_le_p=False)
    _check_g(g, P)
    _check_scale(scale, k)
    return _xla_gram_and_dots(R, g, scale, True)


def subtract_xla(g: jax.Array, R: jax.Array, c: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """The ``"xla"`` path of :func:`subtract`, ``g - (S R)^T c`` in float32, for any ``k``.

    Args, Raises: as in :func:`gram_and_dots_xla`, with ``c`` the ``(k,)`` float coefficients.

    Returns:
      ``(P,)`` array in ``g``'s dtype.
    """
    k, P = _check_r(R, k_le_p=False)
    _check_g(g, P)
    _check_c(c, k)
    _check_scale(scale, k)
    return _xla_subtract(g, R, c, scale)


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


# Hopper: 227 KiB shared memory per block; k=16, block_p=2048 asked 256 KiB on an H200.
GPU_DOT_SMEM_BYTES = 64 * 1024


def default_block_p(plat: str, k: int) -> int:
    """The Pallas ``block_p`` used when none is given, for ``k`` retain vectors on ``plat``.

    8192 on TPU and CPU; on GPU the largest power of two in [16, 2048] with ``2 * k * block_p
    * 4 <= GPU_DOT_SMEM_BYTES`` (the Gram's two float32 ``tl.dot`` tiles): 512 at k = 16.

    >>> default_block_p("gpu", 16), default_block_p("tpu", 16)
    (512, 8192)
    """
    if plat != "gpu":
        return 8192
    fit = GPU_DOT_SMEM_BYTES // (2 * 4 * max(k, 1))
    return max(16, min(2048, 1 << (fit.bit_length() - 1)))


def _block_p(block_p: int | None, plat: str, interpret: bool, k: int) -> int:
    C.check_block(block_p, "block_p")
    bp = block_p or default_block_p(plat, k)
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
    bp = _block_p(block_p, plat, interpret, k)
    _check_triton_k(k, plat, interpret)
    n_full = P // bp
    return _Plan(plat, bp, interpret, _splits(n_full, splits, plat) if n_full else 1)


def _branches(name: str, impl: str, k: int, P: int, xla_fn, pallas_fn, **opts):
    """``build(plat)`` for ``per_platform``: ``xla_fn`` where ``impl="auto"`` picks XLA (CPU; GPU
    when ``k`` does not suit ``tl.dot``), else ``pallas_fn`` on the plan (``auto``: with_fallback)."""
    def build(plat):
        if impl == "auto" and (plat == "cpu" or (plat == "gpu" and not _triton_k_ok(k))):
            return xla_fn
        kernel = functools.partial(pallas_fn, _plan(plat, k, P, **opts))
        return C.with_fallback(name, plat, kernel, xla_fn) if impl == "auto" else kernel

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
    impl = C.resolve_impl(C.check_impl(impl))
    C.check_block(block_p, "block_p")
    if impl == "reference":
        G, d = gram_and_dots_reference(R, g, scale)
        return (G if want_gram else None), d
    xla_fn = functools.partial(_xla_gram_and_dots, want_gram=want_gram)
    if impl == "xla":
        return xla_fn(R, g, scale)
    pallas_fn = functools.partial(_pallas_reduce, want_gram=want_gram)
    build = _branches("projection.gram_and_dots" if want_gram else "projection.dots", impl, k, P, xla_fn,
                      pallas_fn, block_p=block_p, interpret=interpret, splits=splits)
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
      block_p: Pallas block length along ``P`` (default 8192; on GPU from ``k``, 512 at k = 16; a multiple
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
    impl = C.resolve_impl(C.check_impl(impl))
    C.check_block(block_p, "block_p")
    if impl == "reference":
        return subtract_reference(g, R, c, scale)
    if impl == "xla":
        return _xla_subtract(g, R, c, scale)
    return C.per_platform(_branches("projection.subtract", impl, k, P, _xla_subtract, _pallas_subtract, block_p=block_p,
                                    interpret=interpret), g, R, c, scale)
