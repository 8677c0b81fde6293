"""Fake quantisation of parameter pytrees (int8, int4, nf4, fp4) with a straight-through estimator.

"Fake" quantisation rounds every selected weight to the grid of a low-bit format and returns
the *dequantised* values in the input dtype, so a model can be evaluated (or trained, with
``ste=True``) exactly as it would run after quantisation.

By default :func:`fake_quantize` does what a Hugging Face deployment does: ``transformers``
with ``BitsAndBytesConfig(load_in_8bit=True)`` or ``load_in_4bit=True`` (bitsandbytes 0.50.2,
CPU backend; transformers 5). Two choices make up that default:

**Which leaves** (``targets``). ``transformers`` replaces every ``nn.Linear`` by a bitsandbytes
layer except the output head (``get_keys_to_not_convert``), so only the decoder blocks' linear
weights are quantised; embeddings, ``lm_head``, norms and biases stay 16-bit. Here that is every
leaf whose path matches ``layers/<i>/.../kernel``, i.e. ``layers/{i}/attn/{q,k,v,o}_proj/kernel``
and ``layers/{i}/mlp/{gate,up,down}_proj/kernel`` (``targets="blocks"``). ``targets="all"``
takes every floating leaf with ``ndim >= min_ndim`` (embeddings and the head too: the
behaviour before the deployment default); ``targets="auto"`` (default) is ``"blocks"`` when
the tree has such kernels and ``"all"`` otherwise (toy pytrees); ``where`` overrides all three.

**Which values share a scale** (``layout``). ``layout="bnb"`` (default) views each selected
leaf as the Hugging Face weight, ``x.T`` (a 2-D kernel ``(in, out)`` is the ``(out, in)``
``nn.Linear.weight``; :mod:`jaxunlearn.models.hf` maps every projection this way, no fused
or reshaped kernels), and follows bitsandbytes' arithmetic:

- ``"nf4"`` / ``"fp4"``: ``bitsandbytes.functional.quantize_4bit(W, blocksize=64)``. ``W`` is
  flattened row-major and cut into blocks of ``block_size`` consecutive values, i.e. 64
  consecutive *input* features of one output unit (axis 0 of our kernel). When ``in`` is not
  a multiple of the block size the blocks run on across rows and the last block holds the
  ``out * in mod 64`` remaining values, exactly as bitsandbytes does (no per-row padding).
  Per block ``a = max |W_b|``, ``u = clip(W_b * (1 / a), -1, 1)``, the code is the number of
  level midpoints strictly below ``u`` (``torch.bucketize``: a value on a midpoint takes the
  lower level) and the weight dequantises to ``level * a`` (float32). NF4 levels: QLoRA's
  (``NF4_LEVELS``); FP4 levels: ``0, ±1/192, ±1/6, ±1/4, ±1/3, ±1/2, ±2/3, ±1`` in float32,
  bitsandbytes' ``get_4bit_type("fp4")`` (E2M1 values ``{0, 0.0625, 2, 3, 4, 6, 8, 12} / 12``;
  ``FP4_LEVELS``). ``load_in_4bit`` uses FP4 unless ``bnb_4bit_quant_type="nf4"``.
- ``"int8"``: LLM.int8() weights, ``bnb.nn.Int8Params`` as ``load_in_8bit`` stores them: the
  weight is cast to float16, then ``int8_vectorwise_quant``: per row of ``W`` (per output
  unit, the last axis of our kernel; ``channel_axis``) ``a = max |W_row|``,
  ``code = round(W * (127 / a))`` (half to even), and ``int8_vectorwise_dequant`` gives
  ``code * a * 0.007874016`` (float32 ``1/127``). The outlier decomposition (threshold 6.0) of
  ``Linear8bitLt`` acts on *activations* at matmul time, not on the stored weights, so a
  weight-only fake quantiser has nothing to do for it.
- ``"int4"``: bitsandbytes has no plain int4 quantiser (``get_4bit_type("int4")`` lists the
  levels ``k / 7`` but ``quantize_4bit`` refuses it); ours is symmetric absmax int4 in the same
  blocks as NF4/FP4: ``s = a / 7``, ``code = clip(round(W_b / s), -7, 7)`` (half to even; the
  code -8 is unused), dequantised ``code * s``.

``layout="flat"`` is the earlier behaviour: the blocks are consecutive values of the leaf
flattened as stored (for an ``(in, out)`` kernel they span output units), int8 scales are
``s = a / 127`` with ``round(x / s) * s`` in the leaf's own precision (no float16 cast), and
NF4/FP4 use ``u = x / a``. A block (or channel) that is all zeros dequantises to zeros.

Non-finite inputs. One NaN (or Inf) weight makes its block's absmax NaN, so the whole block
dequantises to NaN. The public entry points therefore check concrete inputs first and raise
``ValueError`` naming the first leaf with NaN/Inf (:func:`jaxunlearn.tree.check_finite`);
under ``jax.jit`` the inputs are tracers and the check is skipped (check at the boundary).

References:
  Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", 2022.
  Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023.
  bitsandbytes 0.50.2: ``functional.quantize_4bit`` / ``dequantize_4bit``,
  ``int8_vectorwise_quant`` / ``int8_vectorwise_dequant``, ``nn.Int8Params``, ``nn.Params4bit``.
  Bengio et al., "Estimating or Propagating Gradients Through Stochastic Neurons", 2013 (STE).
"""

from __future__ import annotations

import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.models.scan import check_unrolled
from jaxunlearn.tree import PyTree, check_finite, path_str

__all__ = [
    "SCHEMES",
    "LAYOUTS",
    "TARGETS",
    "NF4_LEVELS",
    "FP4_LEVELS",
    "quantize_leaf",
    "dequantize_leaf",
    "fake_quantize_leaf",
    "fake_quantize",
    "quant_targets",
]

SCHEMES = ("int8", "int4", "nf4", "fp4")
LAYOUTS = ("bnb", "flat")
TARGETS = ("auto", "blocks", "all")

#: The 16 NF4 levels, QLoRA (Dettmers et al., 2023), Appendix E / bitsandbytes ``get_4bit_type("nf4")``.
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

_FP4_POS = np.array([0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0], np.float32) / np.float32(12.0)
#: The 15 distinct FP4 levels, sorted: bitsandbytes' ``get_4bit_type("fp4")`` (E2M1 values
#: ``{0, 0.0625, 2, 3, 4, 6, 8, 12} / 12`` with a sign bit; its codes +0 and -0 coincide).
FP4_LEVELS = np.concatenate([-_FP4_POS[::-1], np.zeros(1, np.float32), _FP4_POS])

_LEVELS = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS}
# Decision boundaries between consecutive levels (nearest-level rounding), float32 as in bitsandbytes.
_MIDPOINTS = {k: (v[1:] + v[:-1]) / np.float32(2.0) for k, v in _LEVELS.items()}
_INV127 = np.float32(7.874015718698502e-3)  # bitsandbytes' int8_vectorwise_dequant constant
_BLOCK_KERNEL = re.compile(r"(?:^|/)layers/\d+/(?:[^/]+/)*kernel$")


def _check_choice(name: str, value, choices: tuple[str, ...], what: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {what} {name}={value!r}; expected one of {choices}")


def _check_scheme(scheme: str) -> None:
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation scheme {scheme!r}; expected one of {SCHEMES}")


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


def _check_float(x: jax.Array, what: str) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"cannot quantise {what}: dtype {jnp.result_type(x)} is not floating point")


def _check_args(scheme: str, block_size: int, layout: str) -> None:
    _check_scheme(scheme)
    _check_block_size(block_size)
    _check_choice("layout", layout, LAYOUTS, "quantisation layout")


def _nonzero(s: jax.Array) -> jax.Array:
    # s with zeros (an all-zero block or channel) replaced by 1, so x / s and 1 / s stay finite.
    return jnp.where(s > 0, s, jnp.ones_like(s))


def _hf_view(x: jax.Array, layout: str) -> jax.Array:
    """The array whose row-major order the blocks follow: ``x.T`` (bnb) or ``x`` (flat)."""
    return jnp.transpose(x) if layout == "bnb" else jnp.asarray(x)


def _blocks(x: jax.Array, block_size: int, layout: str) -> jax.Array:
    flat = jnp.ravel(_hf_view(x, layout)).astype(jnp.float32)
    pad = (-flat.shape[0]) % block_size
    return jnp.pad(flat, (0, pad)).reshape(-1, block_size)


def _channel_absmax(xf: jax.Array, channel_axis: int) -> jax.Array:
    if xf.ndim >= 2:
        ax = channel_axis % xf.ndim
        red = tuple(i for i in range(xf.ndim) if i != ax)
        return jnp.max(jnp.abs(xf), axis=red, keepdims=True)
    return jnp.max(jnp.abs(xf))


def quantize_leaf(
    x: jax.Array, scheme: str = "int8", *, block_size: int = 64, channel_axis: int = -1, layout: str = "bnb"
) -> tuple[jax.Array, jax.Array]:
    """Quantise one array to integer codes and float32 scales (see the module docstring).

    Args:
      x: a floating-point array; in the ``"bnb"`` layout a dense kernel ``(in, out)``, viewed
        as the Hugging Face weight ``x.T``.
      scheme: ``"int8"`` (per channel), ``"int4"``, ``"nf4"`` or ``"fp4"`` (blockwise).
      block_size: values per block for the 4-bit schemes (the last block may be partial).
      channel_axis: the channel axis for ``"int8"`` on arrays with ``ndim >= 2`` (default the
        last: the output unit, a row of the Hugging Face weight).
      layout: ``"bnb"`` (bitsandbytes blocks and arithmetic) or ``"flat"`` (the earlier layout).

    Returns:
      ``(codes, scales)``. int8: ``codes`` int8 with the shape of ``x``, ``scales`` float32
      broadcastable against it (shape ``()`` for a 0-/1-D ``x``): the channel absmax
      (``"bnb"``, bitsandbytes' ``SCB``) or ``absmax / 127`` (``"flat"``). int4: ``codes`` int8 in
      [-7, 7] of shape (n_blocks, block_size) and ``scales = absmax / 7`` (n_blocks, 1). nf4 / fp4:
      ``codes`` uint8 indices into ``NF4_LEVELS`` / ``FP4_LEVELS`` (not bitsandbytes' packed
      nibbles), ``scales`` the block absmax (n_blocks, 1). Blocks follow the row-major order of
      ``x.T`` (``"bnb"``) or ``x`` (``"flat"``). Dequantise with :func:`dequantize_leaf`.

    Raises:
      ValueError: unknown ``scheme`` or ``layout``, bad ``block_size``, or NaN/Inf in a
        concrete ``x`` (a :class:`jaxunlearn.tree.NonFiniteError`).
      TypeError: ``x`` is not floating point.
    """
    _check_args(scheme, block_size, layout)
    _check_float(x, "array")
    check_finite(x, "x")
    return _quantize_leaf(x, scheme, block_size=block_size, channel_axis=channel_axis, layout=layout)


def _quantize_leaf(x, scheme, *, block_size, channel_axis, layout):
    """``quantize_leaf`` without the checks."""
    if scheme == "int8":
        x = jnp.asarray(x)
        if layout == "bnb":  # Int8Params._quantize casts to float16, then int8_vectorwise_quant
            xf = x.astype(jnp.float16).astype(jnp.float32)
            absmax = _channel_absmax(xf, channel_axis)
            # torch evaluates 127.0 / a as reciprocal(a) * 127: two roundings, reproduced here
            codes = jnp.round(xf * ((jnp.float32(1.0) / _nonzero(absmax)) * jnp.float32(127.0)))
            return jnp.clip(codes, -127, 127).astype(jnp.int8), absmax
        xf = x.astype(jnp.float32)
        scales = _channel_absmax(xf, channel_axis) / 127.0
        codes = jnp.clip(jnp.round(xf / _nonzero(scales)), -127, 127).astype(jnp.int8)
        return codes, scales
    b = _blocks(x, block_size, layout)
    absmax = jnp.max(jnp.abs(b), axis=1, keepdims=True)
    if scheme == "int4":
        scales = absmax / 7.0
        codes = jnp.clip(jnp.round(b / _nonzero(scales)), -7, 7).astype(jnp.int8)
        return codes, scales
    if layout == "bnb":  # quantize_4bit: clamp(A * (1 / absmax), -1, 1); a partial last block: A / absmax
        u = b * (jnp.float32(1.0) / _nonzero(absmax))
        n = math.prod(jnp.shape(x))
        if n % block_size:
            u = u.at[-1].set(b[-1] / _nonzero(absmax[-1]))
        u = jnp.clip(u, -1.0, 1.0)
    else:
        u = b / _nonzero(absmax)
    # index of the nearest level = number of midpoints strictly below the value (torch.bucketize,
    # right=False: a value exactly on a midpoint goes to the lower level).
    mid = jnp.asarray(_MIDPOINTS[scheme])
    codes = jnp.sum(u[..., None] > mid, axis=-1).astype(jnp.uint8)
    return codes, absmax


def dequantize_leaf(
    codes: jax.Array,
    scales: jax.Array,
    scheme: str,
    *,
    shape: tuple[int, ...],
    dtype=jnp.float32,
    layout: str = "bnb",
) -> jax.Array:
    """Inverse of :func:`quantize_leaf`.

    ``"bnb"`` int8: ``codes * scales * 0.007874016`` (bitsandbytes' ``int8_vectorwise_dequant``);
    ``"flat"`` int8 and int4: ``codes * scales``; nf4 / fp4: ``LEVELS[codes] * scales``
    (bitsandbytes' ``dequantize_4bit``). Values are computed in float32, then cast.

    Args:
      codes, scales: as returned by :func:`quantize_leaf`.
      scheme: the scheme they were produced with.
      shape: the shape of the original array (the tail of the last block is cut off).
      dtype: output dtype.
      layout: the layout they were produced with.

    Returns:
      The dequantised array of ``shape`` and ``dtype``.
    """
    _check_scheme(scheme)
    _check_choice("layout", layout, LAYOUTS, "quantisation layout")
    shape = tuple(shape)
    if scheme in _LEVELS:
        vals = jnp.asarray(_LEVELS[scheme])[codes.astype(jnp.int32)] * scales
    elif scheme == "int8" and layout == "bnb":
        return ((codes.astype(jnp.float32) * scales) * jnp.float32(_INV127)).astype(dtype)
    else:
        vals = codes.astype(jnp.float32) * scales
    if scheme == "int8":
        return vals.astype(dtype)
    n = math.prod(shape)
    view = shape[::-1] if layout == "bnb" else shape
    return _unview(vals.reshape(-1)[:n].reshape(view), layout).astype(dtype)


def _unview(v: jax.Array, layout: str) -> jax.Array:
    return jnp.transpose(v) if layout == "bnb" else v


def fake_quantize_leaf(
    x: jax.Array,
    scheme: str = "int8",
    *,
    block_size: int = 64,
    ste: bool = False,
    channel_axis: int = -1,
    layout: str = "bnb",
) -> jax.Array:
    """``Q(x)``: quantise then dequantise one array, in its own dtype.

    With ``ste=True`` the result is ``Q(x) + (x - stop_gradient(x))``: its value is exactly
    ``Q(x)`` and its derivative with respect to ``x`` is the identity (the straight-through
    estimator, the same as ``x + stop_gradient(Q(x) - x)`` but without rounding error in the
    value). With ``ste=False`` the derivative is that of the piecewise function itself: zero
    through the rounding, non-zero only through the absmax scales (at the entry of largest
    magnitude of each block or channel).

    Args:
      x: a floating-point array (a dense kernel ``(in, out)`` in the ``"bnb"`` layout).
      scheme, block_size, channel_axis, layout: see :func:`quantize_leaf`.
      ste: use the straight-through estimator.

    Returns:
      An array with the shape and dtype of ``x``.

    Raises:
      ValueError / TypeError: as :func:`quantize_leaf` (NaN/Inf in a concrete ``x``).

    >>> w = jnp.array([[0.3], [-1.0], [0.5]])   # (in=3, out=1): one block of 3 input features
    >>> fake_quantize_leaf(w, "fp4", block_size=64).ravel().tolist()
    [0.3333333432674408, -1.0, 0.5]
    """
    _check_args(scheme, block_size, layout)
    _check_float(x, "array")
    check_finite(x, "x")
    return _fake_quantize_leaf(x, scheme, block_size=block_size, ste=ste, channel_axis=channel_axis, layout=layout)


def _fake_quantize_leaf(x, scheme, *, block_size, ste, channel_axis, layout):
    """``fake_quantize_leaf`` without the checks."""
    codes, scales = _quantize_leaf(x, scheme, block_size=block_size, channel_axis=channel_axis, layout=layout)
    q = dequantize_leaf(codes, scales, scheme, shape=jnp.shape(x), dtype=jnp.result_type(x), layout=layout)
    if ste:
        q = jax.lax.stop_gradient(q) + (x - jax.lax.stop_gradient(x))
    return q


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def quant_targets(
    params: PyTree,
    targets: str = "auto",
    *,
    min_ndim: int = 2,
    where: Callable[[str, jax.Array], bool] | None = None,
) -> PyTree:
    """Which leaves :func:`fake_quantize` quantises: a pytree of Python bools like ``params``.

    ``"blocks"``: floating leaves whose path (``jaxunlearn.tree.path_str``) matches
    ``layers/<i>/.../kernel``, the decoder blocks' linear kernels, which ``transformers``
    hands to bitsandbytes (``lm_head``, embeddings, norms and biases stay 16-bit).
    ``"all"``: floating leaves with ``ndim >= min_ndim``. ``"auto"``: ``"blocks"`` if any
    leaf matches, else ``"all"``. ``where(path, leaf) -> bool`` replaces the rule when given.
    Integer leaves are never selected.

    Args:
      params: a pytree of arrays (dict, tuple, ``nnx.State``).
      targets: ``"auto"``, ``"blocks"`` or ``"all"``.
      min_ndim: the ``"all"`` rule's minimum number of dimensions.
      where: optional static predicate on ``(path, leaf)``.

    Returns:
      A pytree of ``True``/``False`` with the structure of ``params``.

    Raises:
      ValueError: an unknown ``targets``; ``"blocks"`` on a tree with no such kernel.

    >>> p = {"embed": {"embedding": jnp.ones((8, 4))},
    ...      "layers": [{"attn": {"q_proj": {"kernel": jnp.ones((4, 4))}}}]}
    >>> quant_targets(p)
    {'embed': {'embedding': False}, 'layers': [{'attn': {'q_proj': {'kernel': True}}}]}
    """
    _check_choice("targets", targets, TARGETS, "quantisation targets")
    if where is None:  # the per-layer kernel paths (stacked scan_layers leaves would fall back to "all")
        check_unrolled(params, "quant_targets")
    if where is not None:
        return jax.tree_util.tree_map_with_path(lambda p, x: _is_float(x) and bool(where(path_str(p), x)), params)
    blocks = jax.tree_util.tree_map_with_path(
        lambda p, x: _is_float(x) and _BLOCK_KERNEL.search(path_str(p)) is not None, params)
    found = any(jax.tree.leaves(blocks))
    if targets == "blocks" and not found:
        raise ValueError("targets='blocks' but params has no decoder-block linear kernel (a leaf at "
                         "'layers/<i>/.../kernel'); pass targets='all' (every leaf with ndim >= min_ndim) "
                         "or where=")
    if targets == "all" or (targets == "auto" and not found):
        return jax.tree.map(lambda x: _is_float(x) and jnp.ndim(x) >= min_ndim, params)
    return blocks


def fake_quantize(
    params: PyTree,
    scheme: str = "int8",
    *,
    block_size: int = 64,
    ste: bool = False,
    layout: str = "bnb",
    targets: str = "auto",
    min_ndim: int = 2,
    where: Callable[[str, jax.Array], bool] | None = None,
    channel_axis: int = -1,
) -> PyTree:
    """Fake-quantise the selected leaves of a pytree, by default as a bitsandbytes deployment.

    The defaults reproduce the dequantised weights of ``transformers`` +
    bitsandbytes 0.50.2 (``load_in_8bit`` for ``"int8"``, ``load_in_4bit`` with
    ``bnb_4bit_quant_type="fp4"`` / ``"nf4"``, blocksize 64, no double quantisation) on a
    :class:`~jaxunlearn.models.Decoder`'s parameters: only the decoder blocks' linear kernels
    are quantised, in blocks of 64 consecutive input features of each ``(out, in)`` weight
    (``(in, out)`` kernels: along axis 0). ``"int4"`` is our symmetric absmax int4 in those
    blocks (bitsandbytes has none). The module docstring gives every formula.

    The earlier behaviour (every leaf with ``ndim >= 2``, embeddings and ``lm_head``
    included; blocks of the kernels flattened as stored) is
    ``fake_quantize(params, scheme, layout="flat", targets="all")``.

    Args:
      params: a pytree of arrays (dict, tuple, ``nnx.State``).
      scheme: ``"int8"``, ``"int4"``, ``"nf4"`` or ``"fp4"``.
      block_size: block length of the 4-bit schemes (64, bitsandbytes' ``Params4bit`` default).
      ste: if True the gradient of the output with respect to ``params`` is the identity.
      layout: ``"bnb"`` (each leaf viewed as its Hugging Face weight ``x.T``, bitsandbytes'
        blocks and arithmetic) or ``"flat"`` (the earlier layout).
      targets: ``"auto"``, ``"blocks"`` or ``"all"`` (see :func:`quant_targets`).
      min_ndim: the ``"all"`` rule's minimum number of dimensions.
      where: optional static predicate on ``(path, leaf)`` selecting the leaves (overrides
        ``targets`` and ``min_ndim``).
      channel_axis: channel axis for ``"int8"`` (default: the output unit).

    Returns:
      A pytree like ``params``, each selected leaf replaced by its dequantised values in the
      leaf's dtype; the other leaves are returned as they are.

    Raises:
      ValueError: unknown ``scheme``, ``layout`` or ``targets``; bad ``block_size``;
        ``targets="blocks"`` on a tree without decoder-block kernels; a selected
        decoder-block kernel that is not 2-D (``"bnb"`` layout), naming its path; NaN/Inf in
        a concrete leaf of ``params``, naming its path (a
        :class:`jaxunlearn.tree.NonFiniteError`). Traced leaves (inside ``jax.jit``) are not
        checked for NaN.

    References:
      bitsandbytes 0.50.2 ``functional.quantize_4bit`` / ``dequantize_4bit`` and
      ``int8_vectorwise_quant`` / ``int8_vectorwise_dequant``; Dettmers et al., 2022, 2023.

    >>> p = {"embed": {"embedding": jnp.ones((8, 4))},
    ...      "layers": [{"mlp": {"up_proj": {"kernel": jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)}}}]}
    >>> q = fake_quantize(p, "nf4")
    >>> bool(jnp.all(q["embed"]["embedding"] == 1.0))   # embeddings stay as they are
    True
    """
    _check_args(scheme, block_size, layout)
    selected = quant_targets(params, targets, min_ndim=min_ndim, where=where)
    if layout == "bnb":
        check_unrolled(params, "fake_quantize(layout='bnb')")
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        for (path, x), sel in zip(leaves, jax.tree.leaves(selected)):
            name = path_str(path)
            if sel and _BLOCK_KERNEL.search(name) and jnp.ndim(x) != 2:
                raise ValueError(f"cannot quantise '{name}' with layout='bnb': a decoder-block kernel must be "
                                 f"2-D (in, out), got shape {tuple(jnp.shape(x))}")
    check_finite(params, "params")

    def one(x, sel):
        if not sel:
            return x
        return _fake_quantize_leaf(x, scheme, block_size=block_size, ste=ste, channel_axis=channel_axis,
                                   layout=layout)

    return jax.tree.map(one, params, selected)
