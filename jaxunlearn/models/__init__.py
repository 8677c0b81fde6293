"""Llama-family decoders in Flax nnx: model, greedy generation, Hugging Face checkpoint IO.

>>> from jaxunlearn.models import ModelConfig, Decoder, DecoderFn, generate
>>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
...                   num_heads=4, num_kv_heads=2)
>>> from flax import nnx
>>> import jax.numpy as jnp
>>> model = Decoder(cfg, rngs=nnx.Rngs(0))               # or: model, tok = from_pretrained(dir)
>>> scanned = to_scanned(model)                          # blocks stacked, run by one lax.scan (scan_layers=True)
>>> fn, params = DecoderFn.of(model)                     # functional use: fn(params, ids, mask) -> logits
>>> fn(params, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4))).shape
(1, 4, 64)
"""

from jaxunlearn.models.config import (REMAT_POLICIES, SUPPORTED_ARCHITECTURES, SUPPORTED_ROPE_TYPES, ModelConfig,
                                      rope_inv_freq)
from jaxunlearn.models.decoder import (
    MLP,
    Attention,
    Block,
    Decoder,
    Dense,
    Embed,
    KVCache,
    RMSNorm,
    count_params,
    default_positions,
    dense_paths,
    dense_shapes,
    zero_taps,
)
from jaxunlearn.models.functional import DecoderFn, DecoderNLL, ExampleNLL, answer_loss, answer_nll, example_nll
from jaxunlearn.models.generate import generate
from jaxunlearn.models.hf import check_tokenizer, from_pretrained, hf_tensor_map, load_config, save_pretrained
from jaxunlearn.models.scan import check_unrolled, stack_layer_params, to_scanned, to_unrolled, unstack_layer_params

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_ROPE_TYPES",
    "REMAT_POLICIES",
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
    "DecoderFn",
    "ExampleNLL",
    "DecoderNLL",
    "example_nll",
    "answer_nll",
    "answer_loss",
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
    "to_scanned",
    "to_unrolled",
    "stack_layer_params",
    "unstack_layer_params",
    "check_unrolled",
]
