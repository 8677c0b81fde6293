"""Fake quantisation of parameter pytrees (int8, int4, nf4) with a straight-through estimator.

"Fake" quantisation rounds every weight to the grid of a low-bit format and returns the
*dequantised* values in the input dtype, so a model can be evaluated (or trained, with
``ste=True``) exactly as it would run after quantisation. Schemes (absmax scales, symmetric,
no zero point):

- ``"int8"``: per output channel, ``s_c = max_i |x_{i,c}| / 127``, codes
  ``round(x / s_c)`` in [-127, 127]. The channel is ``channel_axis`` (default the last
  axis: for a dense kernel of shape (in, out) that is the output feature); the scale is the
  absmax over all other axes. 1-D leaves (when quantised at all, see ``min_ndim``) use one
  scale per tensor. This is the LLM.int8() vector-wise absmax weight scheme (Dettmers et
  al., 2022) without the outlier decomposition.
- ``"int4"``: blocks of ``block_size`` consecutive values of the flattened (row-major) leaf,
  ``s_b = max |x_b| / 7``, codes ``round(x / s_b)`` in [-7, 7] (symmetric: the code -8 is
  unused, so a block takes at most 15 distinct values).
- ``"nf4"``: the same blocks, ``s_b = max |x_b|``, each ``x / s_b`` in [-1, 1] is mapped to the
  nearest of the 16 NormalFloat4 levels of QLoRA (Dettmers et al., 2023, Appendix E; the
  values below are the published table, as shipped by bitsandbytes).

In the block schemes the tail of the flattened leaf is zero-padded to a whole block; the
padding never changes the absmax of the last block, and it is cut off on dequantisation.
A block (or channel) that is all zeros gets scale 0 and dequantises to zeros.

Non-finite inputs. One NaN (or Inf) weight makes its block's absmax NaN, so the whole block
(64 weights for int4/nf4, a whole channel for int8) dequantises to NaN. The public entry
points therefore check concrete inputs first and raise ``ValueError`` naming the first
leaf with NaN/Inf (:func:`jaxunlearn.tree.check_finite`); under ``jax.jit`` the
inputs are tracers and the check is skipped (check at the boundary).

References:
  Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", 2022.
  Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023.
  Bengio et al., "Estimating or Propagating Gradients Through Stochastic Neurons", 2013 (STE).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.tree import PyTree, path_str
from jaxunlearn.tree import check_finite

__all__ = [
    "SCHEMES",
    "NF4_LEVELS",
    "quantize_leaf",
    "dequantize_leaf",
    "fake_quantize_leaf",
    "fake_quantize",
]

SCHEMES = ("int8", "int4", "nf4")

#: The 16 NF4 levels, QLoRA (Dettmers et al., 2023), Appendix E / bitsandbytes ``NF4`` map.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
# Decision boundaries between consecutive levels (nearest-level rounding).
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2

_QMAX = {"int8": 127, "int4": 7}


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation scheme {scheme!r}; expected one of {SCHEMES}")


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


def _check_float(x: jax.Array, what: str) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"cannot quantise {what}: dtype {jnp.result_type(x)} is not floating point")


def _safe_div(x: jax.Array, s: jax.Array) -> jax.Array:
    # x / s with s == 0 (an all-zero block or channel) giving 0.
    return x / jnp.where(s > 0, s, jnp.ones_like(s))


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    flat = jnp.ravel(x).astype(jnp.float32)
    pad = (-flat.shape[0]) % block_size
    flat = jnp.pad(flat, (0, pad))
    return flat.reshape(-1, block_size)


def quantize_leaf(
    x: jax.Array, scheme: str = "int8", *, block_size: int = 64, channel_axis: int = -1
) -> tuple[jax.Array, jax.Array]:
    """Quantise one array to integer codes and float32 absmax scales.

    Args:
      x: a floating-point array.
      scheme: ``"int8"`` (per channel), ``"int4"`` or ``"nf4"`` (blockwise); see the module
        docstring for the exact formulas.
      block_size: values per block for ``"int4"``/``"nf4"`` (the flattened leaf is zero-padded
        to a multiple of it).
      channel_axis: the channel axis for ``"int8"`` on arrays with ``ndim >= 2``.

    Returns:
      ``(codes, scales)``. int8: ``codes`` int8 with the shape of ``x`` and ``scales`` float32
      broadcastable against it (size-1 on every axis but ``channel_axis``; shape ``()`` for a
      0-/1-D ``x``). int4: ``codes`` int8 in [-7, 7] of shape (n_blocks, block_size), ``scales``
      (n_blocks, 1). nf4: ``codes`` uint8 indices into ``NF4_LEVELS`` of shape
      (n_blocks, block_size), ``scales`` (n_blocks, 1). Dequantise with ``dequantize_leaf``.

    Raises:
      ValueError: unknown ``scheme``, bad ``block_size``, or NaN/Inf in a concrete ``x``
        (a :class:`jaxunlearn.tree.NonFiniteError`).
      TypeError: ``x`` is not floating point.
    """
    _check_scheme(scheme)
    _check_float(x, "array")
    check_finite(x, "x")
    return _quantize_leaf(x, scheme, block_size=block_size, channel_axis=channel_axis)


def _quantize_leaf(x: jax.Array, scheme: str, *, block_size: int, channel_axis: int) -> tuple[jax.Array, jax.Array]:
    """``quantize_leaf`` without the scheme, dtype and NaN checks (``block_size`` is checked)."""
    if scheme == "int8":
        xf = jnp.asarray(x).astype(jnp.float32)
        if xf.ndim >= 2:
            ax = channel_axis % xf.ndim
            red = tuple(i for i in range(xf.ndim) if i != ax)
            scales = jnp.max(jnp.abs(xf), axis=red, keepdims=True) / 127.0
        else:
            scales = jnp.max(jnp.abs(xf)) / 127.0
        codes = jnp.clip(jnp.round(_safe_div(xf, scales)), -127, 127).astype(jnp.int8)
        return codes, scales
    _check_block_size(block_size)
    b = _blocks(x, block_size)
    absmax = jnp.max(jnp.abs(b), axis=1, keepdims=True)
    if scheme == "int4":
        scales = absmax / 7.0
        codes = jnp.clip(jnp.round(_safe_div(b, scales)), -7, 7).astype(jnp.int8)
        return codes, scales
    # nf4: index of the nearest level = number of midpoints strictly below the value
    # (a value exactly on a midpoint goes to the lower level).
    u = _safe_div(b, absmax)
    mid = jnp.asarray(_NF4_MIDPOINTS)
    codes = jnp.sum(u[..., None] > mid, axis=-1).astype(jnp.uint8)
    return codes, absmax


def dequantize_leaf(
    codes: jax.Array,
    scales: jax.Array,
    scheme: str,
    *,
    shape: tuple[int, ...],
    dtype=jnp.float32,
) -> jax.Array:
    """Inverse of ``quantize_leaf``: ``codes * scales`` (int8/int4) or ``NF4_LEVELS[codes] * scales``.

    Args:
      codes, scales: as returned by ``quantize_leaf``.
      scheme: the scheme they were produced with.
      shape: the shape of the original array (the block padding is cut off).
      dtype: output dtype.

    Returns:
      The dequantised array of ``shape`` and ``dtype`` (computed in float32, then cast).
    """
    _check_scheme(scheme)
    if scheme == "nf4":
        vals = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)] * scales
    else:
        vals = codes.astype(jnp.float32) * scales
    n = math.prod(shape)
    return vals.reshape(-1)[:n].reshape(shape).astype(dtype)


def fake_quantize_leaf(
    x: jax.Array,
    scheme: str = "int8",
    *,
    block_size: int = 64,
    ste: bool = False,
    channel_axis: int = -1,
) -> jax.Array:
    """``Q(x)``: quantise then dequantise one array, in its own dtype.

    With ``ste=True`` the result is ``Q(x) + (x - stop_gradient(x))``: its value is exactly
    ``Q(x)`` and its derivative with respect to ``x`` is the identity (the straight-through
    estimator, the same as ``x + stop_gradient(Q(x) - x)`` but without rounding error in the
    value). With ``ste=False`` the derivative is that of the piecewise function itself: zero
    through the rounding, non-zero only through the absmax scales (at the entry of largest
    magnitude of each block or channel).

    Args:
      x: a floating-point array.
      scheme, block_size, channel_axis: see ``quantize_leaf``.
      ste: use the straight-through estimator.

    Returns:
      An array with the shape and dtype of ``x``.

    Raises:
      ValueError / TypeError: as :func:`quantize_leaf` (NaN/Inf in a concrete ``x``).
    """
    _check_scheme(scheme)
    _check_float(x, "array")
    check_finite(x, "x")
    return _fake_quantize_leaf(x, scheme, block_size=block_size, ste=ste, channel_axis=channel_axis)


def _fake_quantize_leaf(x: jax.Array, scheme: str, *, block_size: int, ste: bool, channel_axis: int) -> jax.Array:
    """``fake_quantize_leaf`` without the NaN check."""
    codes, scales = _quantize_leaf(x, scheme, block_size=block_size, channel_axis=channel_axis)
    q = dequantize_leaf(codes, scales, scheme, shape=jnp.shape(x), dtype=jnp.result_type(x))
    if ste:
        q = jax.lax.stop_gradient(q) + (x - jax.lax.stop_gradient(x))
    return q


def fake_quantize(
    params: PyTree,
    scheme: str = "int8",
    *,
    block_size: int = 64,
    ste: bool = False,
    min_ndim: int = 2,
    where: Callable[[str, jax.Array], bool] | None = None,
    channel_axis: int = -1,
) -> PyTree:
    """Fake-quantise every selected leaf of a pytree (see the module docstring for the schemes).

    By default only leaves with ``ndim >= min_ndim = 2`` are quantised (dense kernels,
    embeddings), and 0-/1-D leaves (norm scales, biases) pass through unchanged, as in the
    usual weight-only int8/int4/nf4 deployments (bitsandbytes, GPTQ) which keep those in
    high precision. ``where(path, leaf) -> bool`` (path like ``"layers/0/mlp/kernel"``)
    overrides ``min_ndim`` when given. Integer leaves are always passed through.

    Args:
      params: a pytree of arrays (dict, tuple, ``nnx.State``).
      scheme: ``"int8"`` (per-channel absmax), ``"int4"`` or ``"nf4"`` (blockwise absmax).
      block_size: block length for ``"int4"``/``"nf4"`` (default 64, as in QLoRA).
      ste: if True the gradient of the output with respect to ``params`` is the identity.
      min_ndim: quantise only leaves with at least this many dimensions.
      where: optional static predicate on ``(path, leaf)`` selecting the leaves to quantise.
      channel_axis: channel axis for ``"int8"``.

    Returns:
      A pytree like ``params``, each selected leaf replaced by its dequantised values in the
      leaf's dtype.

    Raises:
      ValueError: unknown ``scheme`` or bad ``block_size``; NaN/Inf in a concrete leaf of
        ``params``, naming its path (``"params has NaN values at 'layers/0/kernel'"``; a
        :class:`jaxunlearn.tree.NonFiniteError`, also a ``FloatingPointError``). Leaves
        that are traced (inside ``jax.jit``) are not checked.

    >>> import jax.numpy as jnp
    >>> q = fake_quantize({"w": jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)}, "int4", block_size=4)
    """
    _check_scheme(scheme)
    _check_block_size(block_size)
    check_finite(params, "params")

    def one(path, x):
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        selected = where(path_str(path), x) if where is not None else jnp.ndim(x) >= min_ndim
        if not selected:
            return x
        return _fake_quantize_leaf(
            x, scheme, block_size=block_size, ste=ste, channel_axis=channel_axis
        )

    return jax.tree_util.tree_map_with_path(one, params)
