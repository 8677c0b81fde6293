"""LoRA and QLoRA as pytree transforms: adapters over any parameter pytree, an NF4-held frozen base.

A LoRA adapter (Hu et al., 2022) adds a low-rank update to chosen linear kernels. In the
Hugging Face orientation a weight ``W`` of shape ``(out, in)`` becomes
``W + (alpha / r) B A`` with ``A`` ``(r, in)`` and ``B`` ``(out, r)``; our kernels are
``(in, out)`` (``y = x @ W``), so here a kernel ``W`` becomes

    W' = W + s a b,        s = alpha / r,   a = A^T  (in, r),   b = B^T  (r, out).

Everything is a pytree transform, with no change to the model:

- :func:`init_lora` builds the adapter: ``{path: LoraPair(a, b)}`` for every 2-D floating leaf
  whose path (:func:`jaxunlearn.tree.path_str`, e.g. ``layers/3/mlp/up_proj/kernel``)
  matches :attr:`LoraConfig.targets` (default: every linear kernel of the decoder blocks,
  QLoRA's "all linear layers"). ``b = 0``, so the adapted model starts equal to its base; ``a``
  is initialised as PEFT does (``init="kaiming"``: ``kaiming_uniform_(a=sqrt(5))`` of the
  ``(r, in)`` weight, i.e. uniform in ``+-1/sqrt(in)``) or Gaussian with std ``1/r``
  (``init="gaussian"``, PEFT's ``init_lora_weights="gaussian"``). Adapters are float32
  whatever the base's dtype.
- :func:`freeze_base` holds the frozen base for training: as it is (``base="full"``) or, as
  QLoRA does, with every adapted kernel stored as NF4 (``base="nf4"``: :class:`NF4Weight`,
  bitsandbytes' ``quantize_4bit(W, blocksize=64, quant_type="nf4")`` layout, two 4-bit
  codes per byte, one float32 absmax per block of 64 consecutive input features), dequantised
  in the forward.
- :func:`merge` gives the model's parameters ``W'`` from a frozen base and an adapter
  (dequantising NF4 kernels): ``apply(merge(frozen, lora, cfg), ids, mask)`` is the adapted
  model, for any ``apply``. The gradient with respect to the adapter follows by the chain rule
  (``dL/da = s (dL/dW') b^T``, ``dL/db = s a^T (dL/dW')``).
- Deployment merges the adapter into the *full-precision* base (``merge(params, lora, cfg)``
  with the original weights, as QLoRA checkpoints are merged into the 16-bit model), then the
  deployed model may be quantised (:mod:`jaxunlearn.eval.durability`).

The unlearning step runs in adapter space when given ``params_fn=adapter_params_fn(cfg)``
(:func:`jaxunlearn.unlearner`): its state then holds the adapter, the frozen base is an
argument of every step, and the losses, estimators and transforms are the same ones.

Why not ``qwix``: Google's JAX quantisation library has LoRA/QLoRA for Flax modules, by
intercepting the ``dot_general`` calls of a module's methods and adding ``LoRAParam``
variables to it. jaxunlearn's transforms (the Fisher, the projection, the estimators, the
masks) act on parameter pytrees under a functional ``apply(params, ids, mask)``; a pytree
transform keeps that single shape (any apply function, the fused Fisher of the merged
model, orbax-saved adapters as plain arrays), and its NF4 is bitsandbytes' block layout
(blocks of 64 values run row-major over the ``(out, in)`` weight, across rows when ``in``
is not a multiple of 64), which qwix's per-axis tiling does not reproduce.

Cost: :func:`merge` materialises each adapted kernel (``W + s a b``) in the forward, and the
backward forms ``dL/dW'`` before contracting it to ``dL/da, dL/db``: the compute of a
full-parameter step (not the unmerged ``x a b`` path of a fused LoRA layer), with memory for
the adapter's optimizer state only.

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
  Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023.
  bitsandbytes 0.50.2 ``functional.quantize_4bit`` / ``dequantize_4bit``; PEFT ``LoraLayer``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxunlearn import validate as V
from jaxunlearn.models.scan import check_unrolled
from jaxunlearn.quant import dequantize_leaf, quantize_leaf
from jaxunlearn.tree import PyTree, leaves_with_paths, path_str

__all__ = ["ADAPTER_BASES", "LORA_INITS", "DEFAULT_TARGETS", "LoraConfig", "LoraPair", "NF4Weight", "nf4_quantize",
           "nf4_dequantize", "lora_paths", "init_lora", "freeze_base", "dequantize_base", "merge", "lora_delta",
           "scale_lora", "adapter_params_fn", "check_lora"]

ADAPTER_BASES = ("full", "nf4")
LORA_INITS = ("kaiming", "gaussian")
#: Every linear kernel of the decoder blocks (attention and MLP projections).
DEFAULT_TARGETS = r"(?:^|/)layers/\d+/(?:attn|mlp)/[^/]+/kernel$"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """A LoRA adapter's shape and its frozen base.

    Attributes:
      rank: ``r`` (>= 1).
      alpha: ``alpha`` (> 0); the update is scaled by ``alpha / r`` (:attr:`scale`).
      targets: a regular expression searched in each leaf's path (``layers/0/attn/q_proj/kernel``);
        matching 2-D floating leaves get an adapter. Default: the decoder blocks' linear kernels.
      base: ``"full"`` (the frozen base as given) or ``"nf4"`` (QLoRA: adapted kernels held as
        NF4, dequantised in the forward).
      base_block_size: NF4 block length (bitsandbytes' default 64).
      init: ``"kaiming"`` (PEFT's default for ``A``) or ``"gaussian"`` (std ``1/r``).

    Raises:
      TypeError / ValueError: a field of the wrong type or range, or a ``targets`` that is not
        a valid regular expression (the field named).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str = DEFAULT_TARGETS
    base: str = "full"
    base_block_size: int = 64
    init: str = "kaiming"

    def __post_init__(self):
        o = "LoraConfig"
        V.check_int(o, "rank", self.rank, min=1)
        object.__setattr__(self, "alpha", V.check_float(o, "alpha", self.alpha, min=0.0, min_exclusive=True))
        V.check_choice(o, "base", self.base, ADAPTER_BASES)
        V.check_choice(o, "init", self.init, LORA_INITS)
        V.check_int(o, "base_block_size", self.base_block_size, min=1)
        if not isinstance(self.targets, str):
            raise TypeError(f"{o}.targets must be a regular expression string, got {self.targets!r}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"{o}.targets must be a valid regular expression, got {self.targets!r} ({e})") from None

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return self.alpha / self.rank


class LoraPair(NamedTuple):
    """One kernel's adapter: ``a`` ``(in, r)`` and ``b`` ``(r, out)``; the kernel gains ``s a b``."""

    a: jax.Array
    b: jax.Array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed", "absmax"],
                   meta_fields=["shape", "dtype", "block_size"])
@dataclasses.dataclass(frozen=True)
class NF4Weight:
    """A kernel held as NF4, in bitsandbytes' storage.

    Attributes:
      packed: uint8 ``(ceil(n / 2),)``: the NF4 codes (indices into
        :data:`jaxunlearn.quant.NF4_LEVELS`) of the Hugging Face weight ``W^T`` flattened
        row-major, two per byte, the first in the high nibble, an odd count padded with the
        code of 0.0 (byte for byte ``quantize_4bit``'s tensor).
      absmax: float32 ``(n_blocks,)``, the absmax of each block of ``block_size`` values.
      shape: the kernel's shape ``(in, out)``.
      dtype: the dtype it dequantises to (the original kernel's).
      block_size: values per block.
    """

    packed: jax.Array
    absmax: jax.Array
    shape: tuple[int, ...]
    dtype: str
    block_size: int


def nf4_quantize(x: jax.Array, block_size: int = 64) -> NF4Weight:
    """Quantise a 2-D kernel ``(in, out)`` to NF4 as bitsandbytes does its ``(out, in)`` weight.

    ``quantize_4bit(W, blocksize=block_size, quant_type="nf4")``: blocks of ``block_size``
    consecutive values of ``W`` flattened row-major, ``u = clip(W_b / max|W_b|, -1, 1)``,
    the code of the nearest NF4 level (:func:`jaxunlearn.quant.quantize_leaf`, ``"nf4"``).

    Args:
      x: a floating 2-D kernel.
      block_size: values per block (>= 1).

    Returns:
      An :class:`NF4Weight`.

    Raises:
      ValueError: ``x`` not 2-D, NaN/Inf in a concrete ``x``; TypeError: ``x`` not floating.
    """
    if jnp.ndim(x) != 2:
        raise ValueError(f"nf4_quantize: a kernel must be 2-D (in, out), got shape {tuple(jnp.shape(x))}")
    codes, absmax = quantize_leaf(x, "nf4", block_size=block_size, layout="bnb")
    n = math.prod(jnp.shape(x))
    flat = codes.reshape(-1)[:n]
    if n % 2:  # an odd count: the last low nibble holds the code of 0.0 (index 7), as bitsandbytes pads
        flat = jnp.concatenate([flat, jnp.full((1,), 7, flat.dtype)])
    packed = (flat[0::2] << 4) | flat[1::2]
    return NF4Weight(packed.astype(jnp.uint8), absmax.reshape(-1), tuple(int(d) for d in jnp.shape(x)),
                     jnp.dtype(x.dtype).name, int(block_size))


def nf4_dequantize(w: NF4Weight) -> jax.Array:
    """The kernel an :class:`NF4Weight` holds: ``NF4_LEVELS[code] * absmax`` (``dequantize_4bit``),
    in the original kernel's layout and dtype."""
    n = math.prod(w.shape)
    codes = jnp.stack([w.packed >> 4, w.packed & 15], axis=-1).reshape(-1)[:n]
    nb = w.absmax.shape[0]
    codes = jnp.pad(codes, (0, nb * w.block_size - n)).reshape(nb, w.block_size)
    return dequantize_leaf(codes, w.absmax[:, None], "nf4", shape=w.shape, dtype=w.dtype, layout="bnb")


def _is_float2d(x) -> bool:
    return jnp.ndim(x) == 2 and jnp.issubdtype(jnp.result_type(x), jnp.floating)


def lora_paths(params: PyTree, cfg: LoraConfig) -> list[str]:
    """The paths of the leaves ``cfg`` adapts: 2-D floating leaves whose path matches ``cfg.targets``.

    Raises:
      ValueError: no leaf matches (the pattern and some of the tree's paths named).
    """
    check_unrolled(params, "lora_paths")  # stacked (scan_layers) kernels are 3-D: one adapter per layer is not here
    pattern = re.compile(cfg.targets)
    leaves = leaves_with_paths(params)
    paths = [p for p, x in leaves if _is_float2d(x) and pattern.search(p)]
    if not paths:
        some = ", ".join(p for p, _ in leaves[:6])
        raise ValueError(f"LoraConfig.targets {cfg.targets!r} matches no 2-D floating leaf of the parameters "
                         f"(paths: {some}{', ...' if len(leaves) > 6 else ''})")
    return paths


def init_lora(params: PyTree, cfg: LoraConfig, key: jax.Array) -> dict[str, LoraPair]:
    """A fresh adapter for ``params``: ``{path: LoraPair(a, b)}``, ``b = 0`` (the adapted model equals its base).

    ``a`` (float32 ``(in, r)``): ``init="kaiming"`` draws ``U(-1/sqrt(in), 1/sqrt(in))``, the
    bound of PEFT's ``nn.init.kaiming_uniform_(A, a=math.sqrt(5))`` on the ``(r, in)`` weight;
    ``init="gaussian"`` draws ``N(0, 1/r^2)``. Kernel ``i`` in path order draws from
    ``jax.random.fold_in(key, i)``.

    Args:
      params: the base's parameters (only shapes are read).
      cfg: the adapter's config.
      key: a PRNG key.

    Returns:
      A dict ordered by path.

    Raises:
      ValueError: ``cfg.targets`` matches nothing (:func:`lora_paths`).
    """
    by_path = dict(leaves_with_paths(params))
    out = {}
    for i, path in enumerate(lora_paths(params, cfg)):
        d_in, d_out = jnp.shape(by_path[path])
        k = jax.random.fold_in(key, i)
        if cfg.init == "kaiming":
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(k, (d_in, cfg.rank), jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(k, (d_in, cfg.rank), jnp.float32) / cfg.rank
        out[path] = LoraPair(a, jnp.zeros((cfg.rank, d_out), jnp.float32))
    return out


def _map_adapted(fn: Callable[[str, Any], Any], params: PyTree, paths) -> PyTree:
    paths = set(paths)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(path_str(p), x) if path_str(p) in paths else x, params,
        is_leaf=lambda x: isinstance(x, NF4Weight))


def freeze_base(params: PyTree, cfg: LoraConfig) -> PyTree:
    """The frozen base a training step reads: ``params`` itself (``base="full"``), or ``params``
    with every adapted kernel replaced by its :class:`NF4Weight` (``base="nf4"``, QLoRA).

    Raises:
      ValueError: ``cfg.targets`` matches nothing; NaN/Inf in an adapted kernel (``"nf4"``).
    """
    paths = lora_paths(params, cfg)
    if cfg.base == "full":
        return params
    return _map_adapted(lambda p, x: nf4_quantize(x, cfg.base_block_size), params, paths)


def dequantize_base(frozen: PyTree) -> PyTree:
    """``frozen`` with every :class:`NF4Weight` dequantised (the base the adapted model starts from)."""
    return jax.tree.map(lambda x: nf4_dequantize(x) if isinstance(x, NF4Weight) else x, frozen,
                        is_leaf=lambda x: isinstance(x, NF4Weight))


def check_lora(frozen: PyTree, lora: dict[str, LoraPair], cfg: LoraConfig) -> None:
    """Check that every adapter matches a kernel of ``frozen``: the path exists and
    ``a: (in, r)``, ``b: (r, out)`` with ``(in, out)`` the kernel's shape and ``r = cfg.rank``.

    Raises:
      TypeError: ``lora`` is not a dict of :class:`LoraPair`.
      ValueError: an unknown path or a mismatched shape (both named).
    """
    if not isinstance(lora, dict):
        raise TypeError(f"an adapter must be a dict {{path: LoraPair}}, got {type(lora).__name__}")
    leaves = jax.tree_util.tree_flatten_with_path(frozen, is_leaf=lambda x: isinstance(x, NF4Weight))[0]
    shapes = {path_str(p): x.shape if isinstance(x, NF4Weight) else tuple(jnp.shape(x)) for p, x in leaves}
    for path, pair in lora.items():
        if not isinstance(pair, LoraPair):
            raise TypeError(f"adapter '{path}' must be a LoraPair(a, b), got {type(pair).__name__}")
        if path not in shapes:
            raise ValueError(f"adapter '{path}' names no leaf of the base")
        d_in, d_out = shapes[path]
        want_a, want_b = (d_in, cfg.rank), (cfg.rank, d_out)
        if tuple(jnp.shape(pair.a)) != want_a or tuple(jnp.shape(pair.b)) != want_b:
            raise ValueError(f"adapter '{path}': a {tuple(jnp.shape(pair.a))} and b {tuple(jnp.shape(pair.b))} "
                             f"do not fit the kernel {shapes[path]} at rank {cfg.rank} (want {want_a}, {want_b})")


def lora_delta(lora: dict[str, LoraPair], cfg: LoraConfig) -> dict[str, jax.Array]:
    """Each adapted kernel's update ``s a b`` (float32 ``(in, out)``): the adapter's task vector in weight space."""
    return {p: cfg.scale * jnp.dot(pair.a, pair.b, precision=jax.lax.Precision.HIGHEST) for p, pair in lora.items()}


def merge(frozen: PyTree, lora: dict[str, LoraPair], cfg: LoraConfig) -> PyTree:
    """The adapted model's parameters: ``W + s a b`` for each adapted kernel, NF4 kernels dequantised.

    The sum is formed in float32 and cast to the kernel's dtype; leaves without an adapter
    (and NF4 kernels without one) come back as they are (dequantised). Differentiable with
    respect to ``lora``; pure, for use under ``jax.jit``.

    Args:
      frozen: the base (:func:`freeze_base`, or any parameter pytree).
      lora: the adapter (:func:`init_lora`).
      cfg: its config (``s = cfg.scale``).

    Returns:
      A parameter pytree of ``frozen``'s structure, every leaf a plain array.
    """
    delta = lora_delta(lora, cfg)

    def one(path, x):
        w = nf4_dequantize(x) if isinstance(x, NF4Weight) else x
        if path not in delta:
            return w
        return (w.astype(jnp.float32) + delta[path]).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(lambda p, x: one(path_str(p), x), frozen,
                                            is_leaf=lambda x: isinstance(x, NF4Weight))


def scale_lora(lora: dict[str, LoraPair], factor: float) -> dict[str, LoraPair]:
    """The adapter whose update is ``factor`` times ``lora``'s: ``b -> factor * b``.

    ``scale_lora(lora, -1)`` is the negated adapter (Zhang et al., 2023: negation of a LoRA
    module negates ``B``), so ``merge(base, scale_lora(lora, -lam), cfg) = W - lam s a b``.
    """
    return {p: LoraPair(pair.a, pair.b * factor) for p, pair in lora.items()}


@functools.lru_cache(maxsize=64)
def adapter_params_fn(cfg: LoraConfig) -> Callable[[PyTree, dict[str, LoraPair]], PyTree]:
    """``params_fn(frozen, lora) = merge(frozen, lora, cfg)``: the reparametrisation the
    unlearning step takes to run in adapter space (:func:`jaxunlearn.unlearner`). One function
    per config (equal configs give the same object, so steps built on it compile once)."""
    return functools.partial(_merge_with, cfg)


def _merge_with(cfg: LoraConfig, frozen: PyTree, lora: dict[str, LoraPair]) -> PyTree:
    return merge(frozen, lora, cfg)
