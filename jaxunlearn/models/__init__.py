"""Llama-family decoders in Flax nnx: model, greedy generation, Hugging Face checkpoint IO.

>>> from jaxunlearn.models import ModelConfig, Decoder, generate
>>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
...                   num_heads=4, num_kv_heads=2)
>>> from flax import nnx
>>> model = Decoder(cfg, rngs=nnx.Rngs(0))               # or: model, tok = from_pretrained(dir)
>>> graphdef, params = nnx.split(model, nnx.Param)       # functional use: apply(graphdef, params, ids, mask)
"""

from jaxunlearn.models.config import SUPPORTED_ARCHITECTURES, SUPPORTED_ROPE_TYPES, ModelConfig, rope_inv_freq
from jaxunlearn.models.decoder import (
    MLP,
    Attention,
    Block,
    Decoder,
    Dense,
    Embed,
    KVCache,
    RMSNorm,
    apply,
    count_params,
    default_positions,
    dense_paths,
    dense_shapes,
    zero_taps,
)
from jaxunlearn.models.generate import generate
from jaxunlearn.models.hf import check_tokenizer, from_pretrained, hf_tensor_map, load_config, save_pretrained

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_ROPE_TYPES",
    "ModelConfig",
    "rope_inv_freq",
    "Decoder",
    "Dense",
    "Embed",
    "RMSNorm",
    "Attention",
    "MLP",
    "Block",
    "KVCache",
    "apply",
    "count_params",
    "default_positions",
    "dense_paths",
    "dense_shapes",
    "zero_taps",
    "generate",
    "from_pretrained",
    "save_pretrained",
    "load_config",
    "hf_tensor_map",
    "check_tokenizer",
]
