"""Configuration of the Llama-family decoder, and conversion from/to Hugging Face configs.

One frozen dataclass, :class:`ModelConfig`, describes every supported architecture:

- ``"llama"`` (Llama 2/3, SmolLM, TinyLlama ...): ``attention_bias`` puts biases on q, k, v *and* o
  (as ``LlamaAttention``); ``mlp_bias`` on gate/up/down;
- ``"qwen2"``: q, k, v always carry a bias, o does not (``attention_bias`` is forced to ``True``);
- ``"mistral"``: no biases; ``sliding_window`` is honoured exactly (key ``s`` is visible from query
  ``t`` iff ``0 <= t - s < sliding_window``, as ``transformers``' sliding-window mask).

RoPE (Su et al., 2021, "RoFormer") follows ``transformers.modeling_rope_utils``: ``rope_type``
``"default"``, ``"linear"`` (inverse frequencies divided by ``factor``) and ``"llama3"`` (the
piecewise frequency rescaling of Llama 3.1). Other types raise ``ValueError``.

transformers 5 keeps ``rope_theta`` in ``config.rope_parameters`` (``config.rope_theta`` is gone);
:meth:`ModelConfig.from_hf` reads either place.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

__all__ = [
    "ModelConfig",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_ROPE_TYPES",
    "REMAT_POLICIES",
    "rope_inv_freq",
]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots_saveable")
_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
_DTYPES = ("float32", "bfloat16", "float16")
_ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _freeze(value: Any) -> Any:
    """A hashable stand-in for nested dicts/lists (used only by ``__hash__``)."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _token_ids(value: Any, name: str) -> int | tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        ids = tuple(int(v) for v in value)
        if not ids:
            return None
        return ids[0] if len(ids) == 1 else ids
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    raise TypeError(f"{name} must be an int, a list of ints or None, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder-only transformer.

    Attributes:
      vocab_size: number of token embeddings (rows of ``embed/embedding``).
      hidden_size: model width ``D``.
      intermediate_size: SwiGLU width ``F``: ``down(silu(gate(x)) * up(x))``.
      num_layers: number of transformer blocks.
      num_heads: query heads ``H``.
      num_kv_heads: key/value heads ``K`` (grouped-query attention; ``H % K == 0``).
      head_dim: per-head width; ``None`` means ``hidden_size // num_heads``.
      max_position_embeddings: the context length the model was trained for (informative; RoPE
        itself has no table, and llama3 scaling reads ``original_max_position_embeddings``).
      rms_norm_eps: epsilon of RMSNorm, ``x / sqrt(mean(x^2) + eps) * scale``.
      rope_theta: RoPE base; inverse frequencies ``theta^(-2i/head_dim)``.
      rope_scaling: ``None`` for plain RoPE, else a dict with ``"rope_type"`` in
        :data:`SUPPORTED_ROPE_TYPES` and that type's parameters (``factor``; for llama3 also
        ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``).
      tie_word_embeddings: the output projection is ``embed/embedding`` transposed (no ``lm_head``).
      attention_bias: biases on the attention projections (see the module docstring for which);
        ``None`` picks the architecture's default (True for qwen2, else False).
      mlp_bias: biases on gate/up/down (llama only).
      sliding_window: sliding-window attention span (mistral, qwen2) or ``None`` for full attention.
      architecture: one of :data:`SUPPORTED_ARCHITECTURES`.
      bos_token_id, eos_token_id, pad_token_id: special ids (``eos_token_id`` may be a tuple).
      dtype: compute dtype (``"float32"``, ``"bfloat16"`` or ``"float16"``); softmax, RMSNorm
        statistics and the returned logits are float32 regardless.
      param_dtype: storage dtype of the parameters.
      initializer_range: std of the normal init of kernels and embeddings (fresh models only).
      remat: activation rematerialisation of each block under differentiation (``jax.checkpoint``
        through ``nnx.remat``): ``"none"`` keeps every activation for the backward pass,
        ``"full"`` keeps only the block inputs and recomputes the rest, ``"dots_saveable"``
        keeps the matmul outputs (``jax.checkpoint_policies.dots_saveable``). Values and
        gradients are unchanged; forwards with taps or captured inputs (the fused Fisher) and
        KV-cache decoding run without it.
      scan_layers: keep the blocks' parameters stacked along a leading layer axis (one ``Block``
        whose leaves are ``(num_layers, ...)``, paths ``layers/attn/q_proj/kernel``) and run them
        with one ``jax.lax.scan`` (:mod:`jaxunlearn.models.scan`): the compiled program holds one
        block, so compile time and HLO size stop growing with depth. Values, gradients, the taps,
        KV-cache decoding, hidden states and Hugging Face IO are those of the unrolled model
        (``False``, the default). Costs: building a fresh model stacks the per-layer
        initialisations (the block parameters are briefly held twice); the layer loop is
        sequential (XLA cannot fuse across blocks, tiny models may run slightly slower); and code
        that walks ``layers/{i}/...`` paths sees stacked leaves instead.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None
    mlp_bias: bool = False
    sliding_window: int | None = None
    architecture: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    initializer_range: float = 0.02
    remat: str = "none"
    scan_layers: bool = False

    # ------------------------------------------------------------------ validation

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {SUPPORTED_ARCHITECTURES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        head_dim = self.head_dim
        if head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); "
                    "pass head_dim explicitly"
                )
            head_dim = self.hidden_size // self.num_heads
        if int(head_dim) <= 0 or int(head_dim) % 2:
            raise ValueError(f"head_dim must be a positive even int (RoPE rotates pairs), got {head_dim}")
        object.__setattr__(self, "head_dim", int(head_dim))
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        object.__setattr__(self, "rope_scaling", self._check_rope_scaling(self.rope_scaling))
        default_bias = self.architecture == "qwen2"
        bias = default_bias if self.attention_bias is None else bool(self.attention_bias)
        if self.architecture == "qwen2" and not bias:
            raise ValueError("architecture 'qwen2' always has q/k/v biases: attention_bias must be True")
        if self.architecture == "mistral" and bias:
            raise ValueError("architecture 'mistral' has no attention biases: attention_bias must be False")
        object.__setattr__(self, "attention_bias", bias)
        if self.mlp_bias and self.architecture != "llama":
            raise ValueError(f"mlp_bias is only supported for architecture 'llama', not {self.architecture!r}")
        if self.sliding_window is not None:
            if self.architecture == "llama":
                raise ValueError("architecture 'llama' has no sliding-window attention (sliding_window must be None)")
            if int(self.sliding_window) <= 0:
                raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window}")
            object.__setattr__(self, "sliding_window", int(self.sliding_window))
        for name in ("dtype", "param_dtype"):
            v = getattr(self, name)
            v = str(jnp.dtype(v).name) if not isinstance(v, str) else v
            if v not in _DTYPES:
                raise ValueError(f"ModelConfig.{name} must be one of {_DTYPES}, got {v!r}")
            object.__setattr__(self, name, v)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if not isinstance(self.scan_layers, (bool, np.bool_)):
            raise TypeError(f"ModelConfig.scan_layers must be a bool, got {self.scan_layers!r}")
        object.__setattr__(self, "scan_layers", bool(self.scan_layers))
        object.__setattr__(self, "bos_token_id", _token_ids(self.bos_token_id, "bos_token_id"))
        object.__setattr__(self, "eos_token_id", _token_ids(self.eos_token_id, "eos_token_id"))
        object.__setattr__(self, "pad_token_id", _token_ids(self.pad_token_id, "pad_token_id"))
        for name in ("bos_token_id", "pad_token_id"):
            if isinstance(getattr(self, name), tuple):
                raise ValueError(f"{name} must be a single id, got {getattr(self, name)}")

    @staticmethod
    def _check_rope_scaling(rs: Mapping | None) -> dict | None:
        if rs is None:
            return None
        if not isinstance(rs, Mapping):
            raise TypeError(f"rope_scaling must be a dict or None, got {type(rs).__name__}")
        rs = dict(rs)
        rope_type = rs.pop("rope_type", rs.pop("type", "default"))
        rs.pop("rope_theta", None)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
            )
        prf = rs.pop("partial_rotary_factor", 1.0)
        if prf not in (None, 1, 1.0):
            raise ValueError(f"partial_rotary_factor={prf} is not supported (only 1.0)")
        if rope_type == "default":
            return None
        missing = [k for k in _ROPE_REQUIRED[rope_type] if k not in rs]
        if missing:
            raise ValueError(f"rope_scaling of type {rope_type!r} lacks {missing}")
        unknown = [k for k in rs if k not in _ROPE_REQUIRED[rope_type]]
        if unknown:
            raise ValueError(f"rope_scaling of type {rope_type!r} has unsupported keys {unknown}")
        if not float(rs["factor"]) > 0:
            raise ValueError(f"rope_scaling factor must be > 0, got {rs['factor']}")
        return {"rope_type": rope_type, **{k: rs[k] for k in _ROPE_REQUIRED[rope_type]}}

    def __hash__(self) -> int:  # rope_scaling is a dict: hash a frozen copy (configs are static under jit)
        return hash(tuple(_freeze(getattr(self, f.name)) for f in dataclasses.fields(self)))

    # ------------------------------------------------------------------ derived

    @property
    def rope_type(self) -> str:
        """``"default"``, ``"linear"`` or ``"llama3"``."""
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def qkv_bias(self) -> bool:
        """Whether q/k/v projections carry a bias."""
        return bool(self.attention_bias)

    @property
    def o_bias(self) -> bool:
        """Whether the attention output projection carries a bias (llama with attention_bias only)."""
        return bool(self.attention_bias) and self.architecture == "llama"

    @property
    def compute_dtype(self) -> jnp.dtype:
        """``jnp.dtype(self.dtype)``."""
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        """``jnp.dtype(self.param_dtype)``."""
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the fields (inverse: ``ModelConfig(**d)``)."""
        d = dataclasses.asdict(self)
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        json.dumps(d)  # fail early if something is not serialisable
        return d

    # ------------------------------------------------------------------ Hugging Face

    @classmethod
    def from_hf(cls, hf_config: Any, *, dtype: str | None = None,
                param_dtype: str | None = None) -> "ModelConfig":
        """Build from a ``transformers`` config (``LlamaConfig``, ``Qwen2Config``, ``MistralConfig``).

        Args:
          hf_config: a ``transformers.PretrainedConfig`` or the dict of a ``config.json``.
          dtype: compute dtype (default ``"float32"``).
          param_dtype: parameter dtype (default: ``dtype``).

        Returns:
          The equivalent :class:`ModelConfig`.

        Raises:
          ValueError: naming the unsupported ``model_type`` / architecture class / activation / rope
            type / per-layer sliding-window pattern.
        """
        get = (hf_config.get if isinstance(hf_config, Mapping)
               else lambda k, d=None: getattr(hf_config, k, d))
        model_type = get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {SUPPORTED_ARCHITECTURES}"
            )
        archs = get("architectures") or []
        bad = [a for a in archs if a != _HF_CLASS[model_type]]
        if bad:
            raise ValueError(
                f"unsupported architectures {bad} for model_type {model_type!r}: only "
                f"{_HF_CLASS[model_type]} (a causal LM) can be loaded"
            )
        act = get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: only 'silu' (SwiGLU) is implemented")
        num_heads = get("num_attention_heads")
        hidden = get("hidden_size")
        rope = get("rope_parameters") or get("rope_scaling") or {}
        if any(isinstance(v, Mapping) for v in rope.values()):
            raise ValueError(f"per-layer rope_parameters are not supported: {sorted(rope)}")
        rope = dict(rope)
        theta = rope.pop("rope_theta", None) or get("rope_theta", None) or 10000.0
        if get("partial_rotary_factor", None) not in (None, 1, 1.0):
            raise ValueError(f"partial_rotary_factor={get('partial_rotary_factor')} is not supported")
        window = None
        if model_type == "mistral":
            window = get("sliding_window", None)
        elif model_type == "qwen2":
            layer_types = list(get("layer_types", None) or [])
            sliding = [t == "sliding_attention" for t in layer_types]
            unknown = sorted({t for t in layer_types} - {"full_attention", "sliding_attention"})
            if unknown:
                raise ValueError(f"unsupported layer_types {unknown} in qwen2 config")
            if any(sliding) and not all(sliding):
                raise ValueError(
                    "qwen2 config mixes sliding-window and full-attention layers "
                    f"(layer_types={layer_types}); per-layer sliding windows are not supported"
                )
            if sliding and all(sliding):
                window = get("sliding_window", None)
        kwargs: dict[str, Any] = dict(
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=get("num_key_value_heads", None) or num_heads,
            head_dim=get("head_dim", None) or None,
            max_position_embeddings=get("max_position_embeddings", 2048),
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope or None,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else bool(get("attention_bias", False)),
            mlp_bias=bool(get("mlp_bias", False)),
            sliding_window=window,
            architecture=model_type,
            bos_token_id=get("bos_token_id", None),
            eos_token_id=get("eos_token_id", None),
            pad_token_id=get("pad_token_id", None),
            dtype=dtype or "float32",
            param_dtype=param_dtype or dtype or "float32",
            initializer_range=get("initializer_range", 0.02),
        )
        return cls(**kwargs)

    def to_hf(self):
        """The equivalent ``transformers`` config (``LlamaConfig``, ``Qwen2Config`` or ``MistralConfig``).

        ``dtype`` of the HF config is set to ``param_dtype`` (the dtype of the saved weights), and
        ``architectures`` to the causal-LM class, so ``AutoModelForCausalLM`` can load the result.
        """
        import transformers

        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update({k: v for k, v in self.rope_scaling.items() if k != "rope_type"})
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        common = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            bos_token_id=self.bos_token_id,
            eos_token_id=eos,
            pad_token_id=self.pad_token_id,
            initializer_range=self.initializer_range,
            dtype=self.param_dtype,
            architectures=[_HF_CLASS[self.architecture]],
        )
        if self.architecture == "llama":
            return transformers.LlamaConfig(
                **common, attention_bias=self.attention_bias, mlp_bias=self.mlp_bias
            )
        if self.architecture == "qwen2":
            sliding = self.sliding_window is not None
            return transformers.Qwen2Config(
                **common,
                use_sliding_window=sliding,
                sliding_window=self.sliding_window,
                max_window_layers=0 if sliding else self.num_layers,
                layer_types=["sliding_attention" if sliding else "full_attention"] * self.num_layers,
            )
        return transformers.MistralConfig(**common, sliding_window=self.sliding_window)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies (float32, shape ``(head_dim // 2,)``), as ``transformers`` computes them.

    ``inv_freq_i = theta^(-2i/d)``, i = 0..d/2-1. ``"linear"`` divides by ``factor``. ``"llama3"``
    (Llama 3.1): with wavelength ``w = 2 pi / inv_freq`` and ``L = original_max_position_embeddings``,
    divide by ``factor`` where ``w > L / low_freq_factor``, keep where ``w < L / high_freq_factor``,
    and in between interpolate ``(1 - s) inv_freq / factor + s inv_freq`` with
    ``s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)``.
    """
    d = config.head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    factor = np.float32(rs["factor"])
    if rs["rope_type"] == "linear":
        return (inv_freq / factor).astype(np.float32)
    # llama3
    low, high = np.float32(rs["low_freq_factor"]), np.float32(rs["high_freq_factor"])
    old_len = np.float32(rs["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = np.float32(2 * np.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
