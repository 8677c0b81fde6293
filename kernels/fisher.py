"""Fused diagonal Fisher of a dense layer, without per-example gradients.

For a dense layer ``y = x W`` (``W`` of shape ``(d_in, d_out)``) with inputs
``a_b`` (``T x d_in``) and output cotangents ``g_b = dl_b/dy`` (``T x d_out``)
for example ``b``, the per-example weight gradient is ``a_b^T g_b`` and the
(summed, unnormalised) diagonal empirical Fisher is::

    F = sum_b (a_b^T g_b) ** 2          # elementwise square, shape (d_in, d_out)

With a token mask ``m`` (``B x T``) the per-example gradient is
``a_b^T diag(m_b) g_b``. Divide by the number of examples yourself for the mean.
``(G**2)^T (A**2)`` equals ``F`` only when ``T = 1`` and is never used here.

Paths (``impl``):

* ``"reference"``: ``einsum`` to the ``(B, d_in, d_out)`` per-example gradients,
  squared and summed, float32 at ``Precision.HIGHEST``. Memory ``O(B d_in d_out)``.
* ``"xla"``: ``lax.scan`` over examples accumulating ``(a_b^T g_b)**2`` in float32.
  On XLA:CPU (2 cores, jax 0.10.2) it measured 4-50x faster than the batched
  einsum and ``jax.vmap`` of the outer product (see ``experiments/bench_kernels.py``).
* ``"pallas"``: a tiled kernel. The output is split in ``(block_in, block_out)``
  tiles; for each tile the kernel walks the examples (and, for long sequences,
  ``block_t`` token chunks), computes the per-example tile ``s = a_b^T g_b`` on the
  matrix unit (bf16 operands accumulate in float32) and adds ``s*s`` to a float32
  accumulator. No ``(B, d_in, d_out)`` array exists. Two schedules:

  - ``"grid"`` (TPU, and the interpreter): grid ``(d_in/bi, d_out/bo, B, T/bt)``,
    the last two axes "arbitrary" (sequential) reductions; the output tile is
    zeroed under ``pl.when`` at the first step and stays resident while it is
    revisited; a VMEM scratch holds the per-example sum over ``T`` chunks.
  - ``"loop"`` (GPU, Triton lowering): grid ``(d_in/bi, d_out/bo)`` only, each
    program loops over examples and token chunks with ``lax.fori_loop`` (Triton
    programs run concurrently, so a grid reduction axis would race).

  Shapes that are not block multiples are zero-padded (padding adds 0 to ``F``).
  Blocks that divide ``d_in``, ``d_out`` and ``T`` avoid the padding copy.

* ``"auto"``: Pallas on TPU/GPU, ``"xla"`` on CPU, chosen when the computation is
  lowered (``lax.platform_dependent``), so ``jax.export`` for TPU or GPU from a CPU host
  carries the compiled kernels.

Hardware status: both schedules are tested on CPU in Pallas interpret mode
against the reference and an independent per-example loop, and lowered from CPU for
TPU (Mosaic) and GPU (Triton) by ``jax.export`` (``tests/kernels/test_lowering.py``).
The GPU (``loop``, Triton) path has been compiled and run on one NVIDIA H200 (jax 0.11.2):
its hardware test passes in float32 and bfloat16, and on a ``B 16 x T 512``, 2048 x 2048
bfloat16 layer it runs at 0.45 of an XLA matmul of the same FLOPs, slower than XLA's
``vmap`` of per-example outer products there (README, "Throughput on a GPU"). The TPU
path has not been compiled by Mosaic yet. The GPU path uses
``pallas.triton.CompilerParams`` explicitly because jax 0.10 otherwise lowers
``pallas_call`` to Mosaic GPU.

References:
  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature", 2015 (per-example dense-layer gradients ``a^T g``);
  kfac-jax ``curvature_blocks.DenseDiagonal``.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import dispatch as C

__all__ = [
    "dense_fisher",
    "dense_fisher_reference",
    "dense_fisher_xla",
    "dense_fisher_pallas",
]

Schedule = Literal["grid", "loop"]
_CONTRACT_T = (((0,), (0,)), ((), ()))  # (T, d_in) x (T, d_out) -> (d_in, d_out)


# ---------------------------------------------------------------- validation


def _check_inputs(a, g, mask) -> tuple[int, int, int, int]:
    if jnp.ndim(a) != 3:
        raise ValueError(f"a must have shape (B, T, d_in); got rank {jnp.ndim(a)} shape {jnp.shape(a)}")
    if jnp.ndim(g) != 3:
        raise ValueError(f"g must have shape (B, T, d_out); got rank {jnp.ndim(g)} shape {jnp.shape(g)}")
    B, T, d_in = a.shape
    Bg, Tg, d_out = g.shape
    if B != Bg:
        raise ValueError(f"batch size mismatch: a has B={B}, g has B={Bg}")
    if T != Tg:
        raise ValueError(f"sequence length mismatch: a has T={T}, g has T={Tg}")
    if min(B, T, d_in, d_out) == 0:
        raise ValueError(f"empty input: a {a.shape}, g {g.shape} (every dimension must be >= 1)")
    da = C.check_float_dtype(a, "a")
    dg = C.check_float_dtype(g, "g")
    if da != dg:
        raise TypeError(f"a and g must have the same dtype; got {da} and {dg}")
    if mask is not None:
        if jnp.shape(mask) != (B, T):
            raise ValueError(f"mask must have shape (B, T) = {(B, T)}; got {jnp.shape(mask)}")
        md = jnp.dtype(jnp.result_type(mask))
        if not (md == jnp.bool_ or jnp.issubdtype(md, jnp.integer) or jnp.issubdtype(md, jnp.floating)):
            raise TypeError(f"mask must be bool, integer or float; got {md}")
    return B, T, d_in, d_out


def _masked(a, mask):
    """``a * mask[..., None]`` in ``a``'s dtype (explicit cast: strict promotion)."""
    if mask is None:
        return a
    return a * jnp.asarray(mask).astype(a.dtype)[..., None]


# ---------------------------------------------------------------- reference / XLA


@jax.jit
def dense_fisher_reference(a: jax.Array, g: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Plain ``jnp`` specification: ``F = sum_b (a_b^T diag(m_b) g_b)**2``.

    Materialises the ``(B, d_in, d_out)`` per-example gradients (an ``einsum``),
    in float32 at ``Precision.HIGHEST``; use for tests and small shapes only.

    Args:
      a: layer inputs, ``(B, T, d_in)``, float32 or bfloat16.
      g: output cotangents, ``(B, T, d_out)``, same dtype as ``a``.
      mask: optional ``(B, T)`` token weights (bool/int/float), multiplied into ``a``.

    Returns:
      ``(d_in, d_out)`` float32 array.
    """
    _check_inputs(a, g, mask)
    a32 = a.astype(jnp.float32)
    if mask is not None:
        a32 = a32 * jnp.asarray(mask).astype(jnp.float32)[..., None]
    per_example = jnp.einsum("bti,bto->bio", a32, g.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return jnp.sum(per_example * per_example, axis=0)


@jax.jit
def dense_fisher_xla(a: jax.Array, g: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """XLA path: ``lax.scan`` over examples, ``acc += (a_b^T g_b)**2`` in float32.

    Memory ``O(d_in d_out)``; operands stay in their dtype, products accumulate
    in float32 (``preferred_element_type``). Same Args/Returns as
    :func:`dense_fisher_reference`.
    """
    _check_inputs(a, g, mask)
    a = _masked(a, mask)
    prec = C.dot_precision(a.dtype)

    def step(acc, ab):
        x, y = ab
        s = lax.dot_general(x, y, _CONTRACT_T, precision=prec, preferred_element_type=jnp.float32)
        return acc + s * s, None

    init = jnp.zeros((a.shape[2], g.shape[2]), jnp.float32)
    acc, _ = lax.scan(step, init, (a, g))
    return acc


# ---------------------------------------------------------------- Pallas kernels


def _fisher_grid_kernel(*refs, has_mask: bool, n_t: int, precision):
    """Grid ``(i, j, b, t)``: one example's token chunk per step, output tile resident."""
    if has_mask:
        a_ref, g_ref, m_ref, o_ref, *scratch = refs
    else:
        a_ref, g_ref, o_ref, *scratch = refs
        m_ref = None
    b, t = pl.program_id(2), pl.program_id(3)

    @pl.when((b == 0) & (t == 0))
    def _zero_output():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    x = a_ref[...]  # (bt, bi)
    if m_ref is not None:
        x = x * m_ref[...]  # (bt, 1), already in x's dtype
    s = lax.dot_general(x, g_ref[...], _CONTRACT_T, precision=precision, preferred_element_type=jnp.float32)

    if n_t == 1:
        o_ref[...] += s * s
        return

    (s_ref,) = scratch

    @pl.when(t == 0)
    def _zero_example():
        s_ref[...] = jnp.zeros(s_ref.shape, s_ref.dtype)

    s_ref[...] += s

    @pl.when(t == n_t - 1)
    def _square_and_add():
        tot = s_ref[...]
        o_ref[...] += tot * tot


def _fisher_loop_kernel(*refs, has_mask: bool, n_b: int, n_t: int, bt: int, precision):
    """Grid ``(i, j)``: the program loops over examples and token chunks itself."""
    if has_mask:
        a_ref, g_ref, m_ref, o_ref = refs
    else:
        a_ref, g_ref, o_ref = refs
        m_ref = None
    bi, bo = o_ref.shape

    def example(b, acc):
        def chunk(t, s):
            rows = pl.ds(pl.multiple_of(t * bt, bt), bt)
            x = a_ref[b, rows, :]
            if m_ref is not None:
                x = x * m_ref[b, rows, :]
            y = g_ref[b, rows, :]
            return s + lax.dot_general(
                x, y, _CONTRACT_T, precision=precision, preferred_element_type=jnp.float32
            )

        s = lax.fori_loop(0, n_t, chunk, jnp.zeros((bi, bo), jnp.float32))
        return acc + s * s

    o_ref[...] = lax.fori_loop(0, n_b, example, jnp.zeros((bi, bo), jnp.float32))


def _default_blocks(schedule: str, T: int, d_in: int, d_out: int) -> tuple[int, int, int]:
    if schedule == "loop":  # Triton: power-of-two tiles, >= 16 for tl.dot
        def clamp(n, hi):
            return min(max(C.next_power_of_2(n), 16), hi)
        return clamp(d_in, 64), clamp(d_out, 64), clamp(T, 32)

    # TPU: a full dimension is always a legal block; otherwise (8k, 128k) tiles.
    def full_or(n, big, tile):
        return n if n <= big else tile
    return full_or(d_in, 512, 256), full_or(d_out, 512, 256), full_or(T, 512, 256)


def _pad(x, axis: int, to: int):
    n = x.shape[axis]
    if n == to:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, to - n)
    return jnp.pad(x, widths)


class _Plan(NamedTuple):
    """A validated Pallas configuration for one platform."""

    plat: str
    schedule: str
    bi: int
    bo: int
    bt: int
    interpret: bool


def _plan(plat: str, T: int, d_in: int, d_out: int, *, block_in, block_out, block_t, schedule,
          interpret: bool | None) -> _Plan:
    """Blocks, schedule and mode of the kernel on ``plat``; ``ValueError`` if invalid there."""
    interpret = C.resolve_interpret(interpret, plat)
    if plat == "cpu" and not interpret:
        raise ValueError("dense_fisher_pallas on CPU needs interpret=True (or None)")
    if schedule is None:
        schedule = "loop" if plat == "gpu" else "grid"
    if schedule not in ("grid", "loop"):
        raise ValueError(f"unknown schedule {schedule!r}; expected 'grid' or 'loop'")
    if schedule == "grid" and plat == "gpu" and not interpret:
        raise ValueError("schedule='grid' relies on sequential grid axes (TPU); use 'loop' on GPU")
    dbi, dbo, dbt = _default_blocks(schedule, T, d_in, d_out)
    bi, bo, bt = block_in or dbi, block_out or dbo, block_t or dbt
    if schedule == "loop" and plat == "gpu" and not interpret:
        for v, n in ((bi, "block_in"), (bo, "block_out"), (bt, "block_t")):
            if v < 16 or v != C.next_power_of_2(v):
                raise ValueError(f"{n} must be a power of two >= 16 for the Triton (GPU) kernel; got {v}")
    if plat == "tpu" and not interpret:  # (8, 128) tiles: bi and bo are lane dims, bt a sublane dim
        for v, n, full, tile in ((bi, "block_in", d_in, 128), (bo, "block_out", d_out, 128), (bt, "block_t", T, 8)):
            if v % tile and v < full:
                raise ValueError(f"{n} = {v} must be a multiple of {tile} (or cover the whole dimension, "
                                 f"{full}) for the Mosaic (TPU) kernel")
    return _Plan(plat, schedule, bi, bo, bt, interpret)


def _run(plan: _Plan, a: jax.Array, g: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The ``pallas_call`` of ``plan`` (inputs zero-padded to block multiples)."""
    B, T, d_in = a.shape
    d_out = g.shape[2]
    plat, schedule, bi, bo, bt, interpret = plan
    Pi, Po, Pt = C.round_up(d_in, bi), C.round_up(d_out, bo), C.round_up(T, bt)
    n_i, n_j, n_t = Pi // bi, Po // bo, Pt // bt

    a_p = _pad(_pad(a, 2, Pi), 1, Pt)
    g_p = _pad(_pad(g, 2, Po), 1, Pt)
    operands = [a_p, g_p]
    has_mask = mask is not None
    if has_mask:
        operands.append(_pad(jnp.asarray(mask).astype(a.dtype)[..., None], 1, Pt))  # (B, Pt, 1)
    precision = C.dot_precision(a.dtype)
    itemsize = jnp.dtype(a.dtype).itemsize
    cost = pl.CostEstimate(
        flops=2 * B * Pt * Pi * Po + 2 * B * Pi * Po,
        transcendentals=0,
        bytes_accessed=itemsize * B * Pt * (Pi * n_j + Po * n_i) + 4 * Pi * Po,
    )
    out_shape = C.out_struct((Pi, Po), jnp.float32, *operands)

    if schedule == "grid":
        in_specs = [
            pl.BlockSpec((pl.squeezed, bt, bi), lambda i, j, b, t: (b, t, i)),
            pl.BlockSpec((pl.squeezed, bt, bo), lambda i, j, b, t: (b, t, j)),
        ]
        if has_mask:
            in_specs.append(pl.BlockSpec((pl.squeezed, bt, 1), lambda i, j, b, t: (b, t, 0)))
        scratch = []
        params = None
        if plat == "tpu" or interpret:
            from jax.experimental.pallas import tpu as pltpu

            if n_t > 1:
                scratch = [pltpu.VMEM((bi, bo), jnp.float32)]
            if plat == "tpu" and not interpret:
                params = pltpu.CompilerParams(
                    dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")
                )
        kernel = functools.partial(_fisher_grid_kernel, has_mask=has_mask, n_t=n_t, precision=precision)
        out = pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=(n_i, n_j, B, n_t),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((bi, bo), lambda i, j, b, t: (i, j)),
            scratch_shapes=scratch,
            compiler_params=params,
            cost_estimate=cost,
            interpret=interpret,
            name="dense_fisher_grid",
        )(*operands)
    else:
        in_specs = [
            pl.BlockSpec((B, Pt, bi), lambda i, j: (0, 0, i)),
            pl.BlockSpec((B, Pt, bo), lambda i, j: (0, 0, j)),
        ]
        if has_mask:
            in_specs.append(pl.BlockSpec((B, Pt, 1), lambda i, j: (0, 0, 0)))
        params = None
        if plat == "gpu" and not interpret:
            from jax.experimental.pallas import triton as pltriton

            params = pltriton.CompilerParams(num_warps=4, num_stages=2)
        kernel = functools.partial(
            _fisher_loop_kernel, has_mask=has_mask, n_b=B, n_t=n_t, bt=bt, precision=precision
        )
        out = pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=(n_i, n_j),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((bi, bo), lambda i, j: (i, j)),
            compiler_params=params,
            cost_estimate=cost,
            interpret=interpret,
            name="dense_fisher_loop",
        )(*operands)
    return out[:d_in, :d_out]


def _pallas_branches(T, d_in, d_out, *, blocks, schedule, interpret, cpu=None):
    """``build(plat)`` for :func:`jaxunlearn.kernels.dispatch.per_platform`: the kernel of each
    platform, or ``cpu`` (the XLA path of ``impl="auto"``) on CPU and where the kernel does not
    compile (:func:`jaxunlearn.kernels.dispatch.with_fallback`)."""

    def build(plat):
        if plat == "cpu" and cpu is not None:
            return cpu
        kernel = functools.partial(_run, _plan(plat, T, d_in, d_out, **blocks, schedule=schedule,
                                               interpret=interpret))
        return kernel if cpu is None else C.with_fallback("fisher.dense_fisher", plat, kernel, cpu)

    return build


@functools.partial(jax.jit, static_argnames=("block_in", "block_out", "block_t", "schedule", "interpret"))
def dense_fisher_pallas(
    a: jax.Array,
    g: jax.Array,
    mask: jax.Array | None = None,
    *,
    block_in: int | None = None,
    block_out: int | None = None,
    block_t: int | None = None,
    schedule: Schedule | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Pallas path of :func:`dense_fisher` (see the module docstring for the schedules).

    The configuration is chosen per platform at lowering
    (:func:`jaxunlearn.kernels.dispatch.per_platform`): compiled Mosaic on TPU,
    compiled Triton on GPU, the interpreter on CPU.

    Args:
      a, g, mask: as in :func:`dense_fisher_reference`.
      block_in, block_out: output tile. Defaults: the full dimension up to 512,
        else 256 (grid schedule); 16-64, powers of two (loop schedule).
      block_t: token chunk per step. Default: ``T`` up to 512, else 256 (grid);
        16-32 (loop).
      schedule: ``"grid"`` or ``"loop"``; default ``"loop"`` on GPU, else ``"grid"``.
        ``"grid"`` is refused on GPU (its reduction axes would race).
      interpret: run the Pallas interpreter; default True on CPU only.

    Returns:
      ``(d_in, d_out)`` float32 array.

    Raises:
      ValueError: bad shapes or blocks; when lowered for a platform, a configuration
        that platform's kernel cannot take (e.g. non-power-of-two blocks on GPU).
    """
    B, T, d_in, d_out = _check_inputs(a, g, mask)
    for v, n in ((block_in, "block_in"), (block_out, "block_out"), (block_t, "block_t")):
        C.check_block(v, n)
    blocks = dict(block_in=block_in, block_out=block_out, block_t=block_t)
    build = _pallas_branches(T, d_in, d_out, blocks=blocks, schedule=schedule, interpret=interpret)
    return C.per_platform(build, a, g, mask)


# ---------------------------------------------------------------- front end


@functools.partial(jax.jit, static_argnames=("impl", "block_in", "block_out", "block_t", "interpret"))
def dense_fisher(
    a: jax.Array,
    g: jax.Array,
    mask: jax.Array | None = None,
    *,
    impl: C.Impl = "auto",
    block_in: int | None = None,
    block_out: int | None = None,
    block_t: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Summed diagonal Fisher of a dense layer: ``F = sum_b (a_b^T diag(m_b) g_b)**2``.

    ``a_b^T g_b`` is example ``b``'s gradient of the layer's weight (``y = x W``);
    the square is elementwise. Divide by the number of examples for the mean
    (empirical) Fisher ``F = (1/N) sum_n (A_n^T G_n)**2``. Never builds the ``(B, d_in, d_out)``
    per-example gradients except with ``impl="reference"``.

    Args:
      a: layer inputs, ``(B, T, d_in)``, float32 or bfloat16.
      g: cotangents of the layer outputs (``dl_b/dy``), ``(B, T, d_out)``, same dtype.
      mask: optional ``(B, T)`` token weights (bool/int/float, e.g. the answer-token
        mask), multiplied into ``a`` (in ``a``'s dtype).
      impl: ``"auto"`` (Pallas on TPU/GPU, XLA scan on CPU), ``"pallas"``,
        ``"xla"`` or ``"reference"``.
      block_in, block_out, block_t: Pallas tile sizes (see :func:`dense_fisher_pallas`).
      interpret: Pallas interpreter; default True on CPU.

    Returns:
      ``(d_in, d_out)`` float32 array (accumulation is float32 for bf16 inputs).

    Raises:
      ValueError: wrong ranks, mismatched ``B`` or ``T``, empty dimensions, mask
        shape, unknown ``impl``, non-positive blocks.
      TypeError: dtypes other than float32/bfloat16, or ``a``/``g`` dtypes differ.

    Example:
      >>> a = jnp.ones((2, 3, 4)); g = jnp.ones((2, 3, 5))
      >>> dense_fisher(a, g)[0, 0]   # two examples, each gradient entry 3
      Array(18., dtype=float32)
    """
    B, T, d_in, d_out = _check_inputs(a, g, mask)
    impl = C.resolve_impl(C.check_impl(impl))
    if impl == "reference":
        return dense_fisher_reference(a, g, mask)
    if impl == "xla":
        return dense_fisher_xla(a, g, mask)
    if impl == "pallas":
        return dense_fisher_pallas(
            a, g, mask, block_in=block_in, block_out=block_out, block_t=block_t, interpret=interpret
        )
    for v, n in ((block_in, "block_in"), (block_out, "block_out"), (block_t, "block_t")):
        C.check_block(v, n)
    blocks = dict(block_in=block_in, block_out=block_out, block_t=block_t)
    build = _pallas_branches(T, d_in, d_out, blocks=blocks, schedule=None, interpret=interpret,
                             cpu=dense_fisher_xla)
    return C.per_platform(build, a, g, mask)
