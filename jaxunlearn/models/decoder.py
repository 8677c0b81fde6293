"""A Llama-family decoder-only transformer in Flax nnx, with dense-layer taps for the fused Fisher.

Architecture (Touvron et al., 2023, "Llama 2"; identical maths in Qwen2 and Mistral), for each block::

    h = x + o_proj(attention(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))
    x' = h + down_proj(silu(gate_proj(n2(h))) * up_proj(n2(h)))

with ``n(x) = x / sqrt(mean(x^2) + eps) * scale`` (RMSNorm), grouped-query attention (query head
``h`` reads key/value head ``h // (num_heads // num_kv_heads)``), and ``softmax(q k^T / sqrt(d))``
taken in float32 under a causal mask that also hides padded keys. Logits are
``lm_head(norm(x))`` (or ``norm(x) @ embed.T`` with tied embeddings), returned in float32.

Parameter paths (stable; the sharding rules of ``jaxunlearn.sharding`` match on them)::

    embed/embedding                      (vocab, hidden)
    layers/{i}/attn_norm/scale           (hidden,)
    layers/{i}/attn/{q,k,v,o}_proj/kernel  (in, out)   [+ /bias]
    layers/{i}/mlp_norm/scale            (hidden,)
    layers/{i}/mlp/{gate,up,down}_proj/kernel          [+ /bias]
    norm/scale                           (hidden,)
    lm_head/kernel                       (hidden, vocab)   absent with tied embeddings

(as keys of ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``; flattening the ``nnx.State`` itself
appends a trailing ``value`` to each path). With ``ModelConfig(scan_layers=True)`` the blocks are one
stacked ``Block``: ``layers/attn/q_proj/kernel`` is ``(num_layers, in, out)`` (no ``{i}``), and the
forward runs them under one ``jax.lax.scan`` (:mod:`jaxunlearn.models.scan`), with the same values.

Taps. Every dense projection is a :class:`Dense`, and the forward accepts
``taps = {dense_path: array shaped like that layer's output}`` that is *added* to the layer's
output. With zero taps the forward is unchanged, and ``d loss / d taps[p]`` is the cotangent
``G`` of layer ``p``'s output. With ``capture_inputs=True`` the forward also returns the layer
inputs ``A``; the per-example weight gradient is then ``A^T G`` (the fused Fisher of
``jaxunlearn.fisher_fused``). With tied embeddings the output projection is ``embed.T``, not a Dense:
it has no tap and no captured input. Tap and input keys are the per-layer :func:`dense_paths` for
both layouts; a scanned model also takes ``stacked=True``: keys ``layers/attn/q_proj`` with a
leading layer axis ``(L, B, T, .)``, the scan's own layout (no per-layer slices or copies).

Hidden states. ``model.hidden_state(input_ids, attention_mask, layer=l)`` is the residual stream
after block ``l`` (the input of block ``l + 1``), computed by the same forward stopped after that
block: what representation methods (RMU) steer, at the cost of ``l + 1`` blocks.

Functional use (per-example gradients, jit with shardings): the adapter of
:mod:`jaxunlearn.models.functional`::

    fn, params = DecoderFn.of(model)
    logits = fn(params, input_ids, attention_mask)   # == model(input_ids, attention_mask)
"""

from __future__ import annotations

from typing import Any, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn.models.config import ModelConfig, rope_inv_freq
from jaxunlearn.models.scan import (block_dense_shapes, scan_modules, stack_modules, stack_taps,
                                    stacked_dense_shapes, unstack_taps)
from jaxunlearn.validate import check_int

__all__ = [
    "Dense",
    "Embed",
    "RMSNorm",
    "Attention",
    "MLP",
    "Block",
    "Decoder",
    "KVCache",
    "dense_paths",
    "dense_shapes",
    "zero_taps",
    "default_positions",
    "count_params",
]

Array = jax.Array
KVCache = list  # list over layers of {"k": (B, S, K, d), "v": (B, S, K, d)}; scanned: one such dict of (L, ...)

_NEG = float(np.finfo(np.float32).min)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: jnp.dtype) -> Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


# --------------------------------------------------------------------------- layers


class Dense(nnx.Module):
    """Dense projection ``y = x @ kernel (+ bias) (+ tap)``, kernel shaped ``(in, out)``.

    The single module used for every projection of the :class:`Decoder`, so the fused Fisher can
    hook all of them the same way.

    Args:
      in_features: input width.
      out_features: output width.
      use_bias: add a learned bias (zero-initialised).
      dtype: compute dtype (inputs and kernel are cast to it).
      param_dtype: storage dtype of ``kernel`` and ``bias``.
      init_std: std of the normal kernel init.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, init_std: float = 0.02,
                 rngs: nnx.Rngs):
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.dtype = jnp.dtype(dtype)
        self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), init_std, jnp.dtype(param_dtype)))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: Array, *, tap: Array | None = None) -> Array:
        """Apply the projection.

        Args:
          x: (..., in_features).
          tap: optional array shaped like the output, added to it (cast to the compute dtype).

        Returns:
          (..., out_features) in the compute dtype.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Dense expects inputs with last dim {self.in_features}, got {x.shape}")
        # one 2-D matmul over the flattened leading axes: XLA:CPU runs the weight gradient of a
        # 3-D einsum (a contraction over two axes) at about half the rate of the 2-D one
        lead = x.shape[:-1]
        y = jnp.dot(x.reshape(-1, self.in_features).astype(self.dtype),
                    self.kernel[...].astype(self.dtype)).reshape(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if tap is not None:
            y = y + tap.astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table ``embedding`` (vocab, hidden); ``attend`` is the tied output head."""

    def __init__(self, num_embeddings: int, features: int, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs):
        self.num_embeddings = int(num_embeddings)
        self.dtype = jnp.dtype(dtype)
        self.embedding = nnx.Param(_normal(rngs, (num_embeddings, features), init_std, jnp.dtype(param_dtype)))

    def __call__(self, ids: Array) -> Array:
        """Rows ``embedding[ids]`` in the compute dtype (out-of-range ids give NaN rows)."""
        return jnp.take(self.embedding[...], ids, axis=0, mode="fill",
                        fill_value=jnp.nan).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """Tied logits ``x @ embedding.T``: (..., hidden) -> (..., vocab)."""
        lead, d = x.shape[:-1], x.shape[-1]
        return jnp.dot(x.reshape(-1, d).astype(self.dtype),
                       self.embedding[...].astype(self.dtype).T).reshape(*lead, self.num_embeddings)


class RMSNorm(nnx.Module):
    """RMSNorm (Zhang & Sennrich, 2019): ``x / sqrt(mean(x^2) + eps) * scale``, statistics in float32."""

    def __init__(self, features: int, *, eps: float, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        self.eps = float(eps)
        self.dtype = jnp.dtype(dtype)
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))

    def __call__(self, x: Array) -> Array:
        """Normalise over the last axis; returns the compute dtype."""
        xf = x.astype(jnp.float32)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        y = (xf * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * y


class _Tape:
    """Per-call routing of taps into, and capture of inputs out of, the named Dense layers."""

    def __init__(self, taps: Mapping[str, Array] | None, capture: bool):
        self.taps = taps or {}
        self.inputs: dict[str, Array] | None = {} if capture else None

    def __call__(self, layer: Dense, path: str, x: Array) -> Array:
        if self.inputs is not None:
            self.inputs[path] = x
        tap = self.taps.get(path)
        if tap is not None:
            want = x.shape[:-1] + (layer.out_features,)
            if tuple(tap.shape) != want:
                raise ValueError(f"tap '{path}' has shape {tuple(tap.shape)}, expected the output shape {want}")
        return layer(x, tap=tap)


def _rope_cos_sin(positions: Array, inv_freq: np.ndarray, dtype: jnp.dtype) -> tuple[Array, Array]:
    """``cos, sin`` of ``positions * inv_freq`` duplicated to the head width: (B, T, head_dim)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """``x cos + rotate_half(x) sin`` with ``rotate_half([a, b]) = [-b, a]`` (HF convention); x (B,T,N,d)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def _attention_mask(q_slots: Array, kv_valid: Array, window: int | None) -> Array:
    """Boolean (B, T, S) mask: key slot ``s`` visible from query slot ``t`` iff ``s <= t``, key ``s``
    is not padding, and (sliding window) ``t - s < window``."""
    k_slots = jnp.arange(kv_valid.shape[-1], dtype=jnp.int32)
    diff = q_slots.astype(jnp.int32)[:, None] - k_slots[None, :]
    ok = diff >= 0
    if window is not None:
        ok = ok & (diff < window)
    return ok[None] & kv_valid.astype(bool)[:, None, :]


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE (q, k, v, o projections are :class:`Dense`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.dtype = c.compute_dtype
        kw = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype, init_std=c.initializer_range, rngs=rngs)
        qd, kvd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.q_proj = Dense(c.hidden_size, qd, use_bias=c.qkv_bias, **kw)
        self.k_proj = Dense(c.hidden_size, kvd, use_bias=c.qkv_bias, **kw)
        self.v_proj = Dense(c.hidden_size, kvd, use_bias=c.qkv_bias, **kw)
        self.o_proj = Dense(qd, c.hidden_size, use_bias=c.o_bias, **kw)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, tape: _Tape, prefix: str,
                 cache: dict[str, Array] | None = None, cache_index: Array | int | None = None):
        """Attend; with ``cache`` the new keys/values are written at slot ``cache_index`` first.

        Returns:
          ``(out (B, T, hidden), new_cache or None)``.
        """
        b, t, _ = x.shape
        h, k, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = tape(self.q_proj, f"{prefix}/q_proj", x).reshape(b, t, h, d)
        kk = tape(self.k_proj, f"{prefix}/k_proj", x).reshape(b, t, k, d)
        v = tape(self.v_proj, f"{prefix}/v_proj", x).reshape(b, t, k, d)
        q, kk = _apply_rope(q, cos, sin), _apply_rope(kk, cos, sin)
        new_cache = None
        if cache is not None:
            idx = jnp.asarray(cache_index, jnp.int32)
            zero = jnp.zeros((), jnp.int32)
            kk = jax.lax.dynamic_update_slice(cache["k"], kk.astype(cache["k"].dtype), (zero, idx, zero, zero))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (zero, idx, zero, zero))
            new_cache = {"k": kk, "v": v}
        # the g = h // k queries sharing a key/value head stacked into one (g t, d) matrix per
        # (batch, kv head): two batched matmuls of (g t, d) x (d, s), larger than per query head
        # (about 1.4x faster forward + backward on XLA:CPU than the 5-D einsum)
        g, s = h // k, kk.shape[1]
        q = q.reshape(b, t, k, g, d).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, d)
        kt = kk.astype(self.dtype).transpose(0, 2, 3, 1)  # (b, k, d, s)
        vt = v.astype(self.dtype).transpose(0, 2, 1, 3)  # (b, k, s, d)
        scores = jnp.matmul(q, kt, preferred_element_type=jnp.float32).reshape(b, k, g, t, s) * (d ** -0.5)
        if mask.dtype == jnp.bool_:
            scores = jnp.where(mask[:, None, None], scores, _NEG)
        else:  # a 0/1 float mask (scanned blocks): the same values and gradients as the select
            keep = mask[:, None, None]
            scores = scores * keep + (1.0 - keep) * _NEG
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype).reshape(b, k, g * t, s)
        out = jnp.matmul(probs, vt).reshape(b, k, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h * d)
        return tape(self.o_proj, f"{prefix}/o_proj", out), new_cache


class MLP(nnx.Module):
    """SwiGLU feed-forward (Shazeer, 2020): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        kw = dict(use_bias=c.mlp_bias, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
                  init_std=c.initializer_range, rngs=rngs)
        self.gate_proj = Dense(c.hidden_size, c.intermediate_size, **kw)
        self.up_proj = Dense(c.hidden_size, c.intermediate_size, **kw)
        self.down_proj = Dense(c.intermediate_size, c.hidden_size, **kw)

    def __call__(self, x: Array, tape: _Tape, prefix: str) -> Array:
        g = tape(self.gate_proj, f"{prefix}/gate_proj", x)
        u = tape(self.up_proj, f"{prefix}/up_proj", x)
        return tape(self.down_proj, f"{prefix}/down_proj", jax.nn.silu(g) * u)


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(attn_norm(x))``, then ``+ mlp(mlp_norm(.))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        nkw = dict(eps=c.rms_norm_eps, dtype=c.compute_dtype, param_dtype=c.weight_dtype)
        self.attn_norm = RMSNorm(c.hidden_size, **nkw)
        self.attn = Attention(c, rngs=rngs)
        self.mlp_norm = RMSNorm(c.hidden_size, **nkw)
        self.mlp = MLP(c, rngs=rngs)

    def __call__(self, x, cos, sin, mask, tape, prefix, cache=None, cache_index=None):
        h, cache = self.attn(self.attn_norm(x), cos, sin, mask, tape, f"{prefix}/attn", cache, cache_index)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x), tape, f"{prefix}/mlp")
        return x, cache


def _remat_block(layer: Block, x: Array, cos: Array, sin: Array, mask: Array, *, policy: str) -> Array:
    """``layer(x, ...)`` under ``nnx.remat``: ``"full"`` saves nothing inside the block,
    ``"dots_saveable"`` saves its matmul outputs (``jax.checkpoint_policies.dots_saveable``)."""
    saveable = jax.checkpoint_policies.dots_saveable if policy == "dots_saveable" else None

    def run(block, x, cos, sin, mask):
        return block(x, cos, sin, mask, _Tape(None, False), "")[0]

    return nnx.remat(run, policy=saveable)(layer, x, cos, sin, mask)


# --------------------------------------------------------------------------- the model


def default_positions(attention_mask: Array) -> Array:
    """RoPE positions from a padding mask: ``clip(cumsum(mask) - 1, 0)`` (int32, (B, T)).

    Real tokens get 0, 1, 2, ... whatever the padding side (Hugging Face ``generate`` does the
    same); pad positions get 0 (their value does not matter, they are masked).
    """
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0).astype(jnp.int32)


def _check_ids_mask(input_ids: Any, attention_mask: Any) -> tuple[Array, Array]:
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise TypeError(f"input_ids must be integers, got dtype {input_ids.dtype}")
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {attention_mask.shape} does not match input_ids shape {input_ids.shape}"
        )
    return input_ids.astype(jnp.int32), attention_mask


class Decoder(nnx.Module):
    """Llama / Qwen2 / Mistral decoder-only language model.

    Args:
      config: the :class:`ModelConfig`.
      rngs: ``nnx.Rngs`` for the initialisation (normal(0, initializer_range) kernels and
        embeddings, zero biases, unit norm scales).

    Example:
      >>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
      ...                   num_heads=4, num_kv_heads=2)
      >>> model = Decoder(cfg, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 5), jnp.int32)).shape
      (2, 5, 64)
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        c = config
        self.config = c
        self.embed = Embed(c.vocab_size, c.hidden_size, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
                           init_std=c.initializer_range, rngs=rngs)
        blocks = [Block(c, rngs=rngs) for _ in range(c.num_layers)]  # same init for both layouts
        self.layers = stack_modules(blocks) if c.scan_layers else nnx.List(blocks)
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=c.compute_dtype, param_dtype=c.weight_dtype)
        self.lm_head = (None if c.tie_word_embeddings else
                        Dense(c.hidden_size, c.vocab_size, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
                              init_std=c.initializer_range, rngs=rngs))

    # -- shared body
    def _run(self, input_ids, positions, mask, tape, cache=None, cache_index=None, stop_after=None):
        """``(logits, new cache)``; with ``stop_after=l`` the residual stream after block ``l`` instead,
        the later blocks, the norm and the head not run."""
        c = self.config
        cos, sin = _rope_cos_sin(positions, rope_inv_freq(c), c.compute_dtype)
        x = self.embed(input_ids)
        new_cache = []
        remat = c.remat != "none" and cache is None and not tape.taps and tape.inputs is None
        if c.scan_layers:
            x, new_cache = self._scan(x, cos, sin, mask, tape, cache, cache_index,
                                      c.num_layers if stop_after is None else stop_after + 1, remat)
            if stop_after is not None:
                return x
        for i, layer in enumerate(() if c.scan_layers else self.layers):
            if remat:  # a pure block call (no taps, no capture): safe to recompute in the backward pass
                x = _remat_block(layer, x, cos, sin, mask, policy=c.remat)
                lc = None
            else:
                x, lc = layer(x, cos, sin, mask, tape, f"layers/{i}",
                              None if cache is None else cache[i], cache_index)
            if i == stop_after:
                return x
            new_cache.append(lc)
        x = self.norm(x)
        if self.lm_head is None:
            logits = self.embed.attend(x)
        else:
            logits = tape(self.lm_head, "lm_head", x)
        return logits.astype(jnp.float32), (new_cache if cache is not None else None)

    def _scan(self, x, cos, sin, mask, tape, cache, cache_index, n, remat):
        """Blocks ``0 .. n-1`` of a scanned model under one ``lax.scan``: ``(x, new stacked cache)``;
        the tape holds stacked taps, and stacked captured inputs are added to it."""
        capture = tape.inputs is not None
        taps = {k: v[:n] for k, v in tape.taps.items() if k != "lm_head"}

        # the mask enters the loop as float32 0/1: a bool loop input is a standalone kernel that
        # XLA:CPU takes over a second to compile
        keep = mask.astype(jnp.float32)

        def step(block, x, xs):
            lt = _Tape(xs["taps"], capture)
            x, lc = block(x, cos, sin, keep, lt, "layers", xs["cache"], cache_index)
            return x, {"cache": lc, "inputs": lt.inputs}

        x, ys = scan_modules(self.layers, step, x, {"taps": taps, "cache": cache}, length=n,
                             remat=self.config.remat if remat else "none")
        if capture:
            tape.inputs.update(ys["inputs"])
        return x, ys["cache"]

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 positions: Array | None = None, taps: Mapping[str, Array] | None = None,
                 capture_inputs: bool = False, stacked: bool = False):
        """Next-token logits of a padded batch.

        Args:
          input_ids: int (B, T) tokens.
          attention_mask: (B, T) of 0/1 (1 = real token); ``None`` means no padding. Left and right
            padding both work: padded keys are hidden from every query.
          positions: int (B, T) RoPE positions; default :func:`default_positions` of the mask.
          taps: optional ``{dense_path: array shaped like that Dense's output (B, T, out)}`` added to
            the outputs (see the module docstring); keys must come from :func:`dense_paths`.
          capture_inputs: also return ``{dense_path: input (B, T, in)}`` of every Dense.
          stacked: (``scan_layers=True`` only) taps and captured inputs of the blocks keyed by
            ``layers/attn/q_proj`` etc. with a leading layer axis, ``(L, B, T, .)``
            (:func:`jaxunlearn.models.scan.stacked_dense_shapes`); ``lm_head`` as before.

        Returns:
          float32 logits (B, T, vocab), or ``(logits, inputs)`` with ``capture_inputs=True``.
        """
        input_ids, attention_mask, positions, mask = self._inputs(input_ids, attention_mask, positions)
        c = self.config
        if stacked and not c.scan_layers:
            raise ValueError("Decoder(...)(stacked=True) needs a model with ModelConfig.scan_layers=True")
        if taps:
            known = set(stacked_dense_shapes(c) if stacked else dense_paths(c))
            unknown = sorted(set(taps) - known)
            if unknown:
                extra = (" (lm_head is tied to embed/embedding and has no tap)"
                         if "lm_head" in unknown and c.tie_word_embeddings else "")
                where = "stacked_dense_shapes()" if stacked else "dense_paths()"
                raise ValueError(f"unknown tap paths {unknown}{extra}; valid paths come from {where}")
            bad = [k for k, v in taps.items() if stacked and k != "lm_head" and jnp.shape(v)[:1] != (c.num_layers,)]
            if bad:
                raise ValueError(f"stacked taps {bad} need a leading layer axis of {c.num_layers}")
            if c.scan_layers and not stacked:
                taps = stack_taps(taps, c)
        tape = _Tape(taps, capture_inputs)
        logits, _ = self._run(input_ids, positions, mask, tape)
        if not capture_inputs:
            return logits
        return logits, (unstack_taps(tape.inputs, c.num_layers) if c.scan_layers and not stacked else tape.inputs)

    def _inputs(self, input_ids, attention_mask, positions):
        """Checked ``(input_ids, attention_mask, positions, attention mask (B, T, T))`` of a forward."""
        input_ids, attention_mask = _check_ids_mask(input_ids, attention_mask)
        b, t = input_ids.shape
        if positions is None:
            positions = default_positions(attention_mask)
        elif tuple(jnp.shape(positions)) != (b, t):
            raise ValueError(f"positions shape {jnp.shape(positions)} does not match input_ids shape {(b, t)}")
        mask = _attention_mask(jnp.arange(t, dtype=jnp.int32), attention_mask, self.config.sliding_window)
        return input_ids, attention_mask, jnp.asarray(positions, jnp.int32), mask

    def hidden_state(self, input_ids: Array, attention_mask: Array | None = None, *, layer: int,
                     positions: Array | None = None) -> Array:
        """The residual stream after block ``layer``: ``x_{l+1}`` with ``x_0 = embed(ids)`` and
        ``x_{i+1} = block_i(x_i)`` (before the final norm).

        The forward of :meth:`__call__` stopped after that block (blocks ``layer + 1 ..``, the norm
        and the head are not run). It is the output of the module ``model.layers.{layer}`` of a
        Hugging Face model (what RMU hooks), and its ``output_hidden_states`` entry
        ``hidden_states[layer + 1]`` for ``layer < num_layers - 1`` (its last entry is taken after
        the final norm).

        Args:
          input_ids: int (B, T) tokens.
          attention_mask: (B, T) of 0/1, as in :meth:`__call__`.
          layer: the block, ``0 <= layer < num_layers``.
          positions: RoPE positions, as in :meth:`__call__`.

        Returns:
          (B, T, hidden) in the compute dtype.

        Raises:
          ValueError: ``layer`` out of range (named), bad ids / mask / positions.
        """
        layer = check_int("Decoder.hidden_state", "layer", layer, min=0)
        if layer >= self.config.num_layers:
            raise ValueError(f"Decoder.hidden_state.layer must be < num_layers={self.config.num_layers}, got {layer}")
        input_ids, _, positions, mask = self._inputs(input_ids, attention_mask, positions)
        return self._run(input_ids, positions, mask, _Tape(None, False), stop_after=layer)

    # -- incremental decoding
    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """Zero KV cache: a list over layers of ``{"k", "v"}`` arrays (B, max_length, num_kv_heads, head_dim)
        in the compute dtype; with ``scan_layers`` one ``{"k", "v"}`` of ``(num_layers, B, ...)``."""
        c = self.config
        shape = (int(batch_size), int(max_length), c.num_kv_heads, c.head_dim)
        if c.scan_layers:
            shape = (c.num_layers,) + shape
            return {"k": jnp.zeros(shape, c.compute_dtype), "v": jnp.zeros(shape, c.compute_dtype)}
        return [{"k": jnp.zeros(shape, c.compute_dtype), "v": jnp.zeros(shape, c.compute_dtype)}
                for _ in range(c.num_layers)]

    def decode(self, input_ids: Array, *, positions: Array, kv_mask: Array, cache: KVCache,
               cache_index: Array | int) -> tuple[Array, KVCache]:
        """Forward of ``T`` new tokens written into cache slots ``cache_index .. cache_index + T - 1``.

        Query slot ``cache_index + t`` sees key slot ``s`` iff ``s <= cache_index + t`` and
        ``kv_mask[b, s] == 1`` (and the sliding window allows it). Pure: returns the new cache.

        Args:
          input_ids: int (B, T).
          positions: int (B, T) RoPE positions of the new tokens.
          kv_mask: (B, S) 0/1 validity of every cache slot (S = cache length).
          cache: from :meth:`init_cache` or a previous call.
          cache_index: int scalar (may be traced), first slot to write.

        Returns:
          ``(float32 logits (B, T, vocab), new cache)``.
        """
        input_ids = jnp.asarray(input_ids, jnp.int32)
        t = input_ids.shape[1]
        n = len(cache) if not self.config.scan_layers else jnp.shape(cache["k"])[0]
        if n != self.config.num_layers:
            raise ValueError(f"cache has {n} layers, the model {self.config.num_layers}")
        q_slots = jnp.asarray(cache_index, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
        mask = _attention_mask(q_slots, kv_mask, self.config.sliding_window)
        return self._run(input_ids, jnp.asarray(positions, jnp.int32), mask, _Tape(None, False),
                         cache, cache_index)


# --------------------------------------------------------------------------- helpers


def _config_of(model_or_config: Union[Decoder, ModelConfig]) -> ModelConfig:
    if isinstance(model_or_config, ModelConfig):
        return model_or_config
    config = getattr(model_or_config, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"expected a Decoder or a ModelConfig, got {type(model_or_config).__name__}")
    return config


def dense_shapes(model_or_config: Union[Decoder, ModelConfig]) -> dict[str, tuple[int, int]]:
    """``{dense_path: (in_features, out_features)}`` in :func:`dense_paths` order (per layer, also
    for a scanned model: the logical layers, whose kernels are rows of the stacked leaves there)."""
    c = _config_of(model_or_config)
    block = block_dense_shapes(c)
    out = {f"layers/{i}/{sub}": shape for i in range(c.num_layers) for sub, shape in block.items()}
    if not c.tie_word_embeddings:
        out["lm_head"] = (c.hidden_size, c.vocab_size)
    return out


def dense_paths(model_or_config: Union[Decoder, ModelConfig]) -> list[str]:
    """Paths of every :class:`Dense` in forward order: per layer q, k, v, o, gate, up, down; then lm_head.

    Each path is also the parameter path of that layer's kernel minus ``/kernel``
    (``"layers/0/attn/q_proj"`` -> ``layers/0/attn/q_proj/kernel``). ``lm_head`` is absent with tied
    embeddings.
    """
    return list(dense_shapes(model_or_config))


def zero_taps(model_or_config: Union[Decoder, ModelConfig], batch_size: int, seq_len: int,
              dtype: Any = None) -> dict[str, Array]:
    """Zero taps ``{path: zeros (B, T, out)}`` for every Dense (dtype default: the compute dtype)."""
    c = _config_of(model_or_config)
    dt = c.compute_dtype if dtype is None else jnp.dtype(dtype)
    return {p: jnp.zeros((batch_size, seq_len, o), dt) for p, (_, o) in dense_shapes(c).items()}


def count_params(model_or_tree: Any) -> int:
    """Number of parameter scalars of a module (its ``nnx.Param``s) or of any pytree of arrays."""
    tree = nnx.state(model_or_tree, nnx.Param) if isinstance(model_or_tree, nnx.Module) else model_or_tree
    return int(sum(int(np.prod(jnp.shape(x))) for x in jax.tree_util.tree_leaves(tree)))
