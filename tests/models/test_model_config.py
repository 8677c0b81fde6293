"""ModelConfig: conversion from/to transformers configs, RoPE frequencies vs transformers, bad input."""

import json

import numpy as np
import pytest

from jaxunlearn.models import ModelConfig, rope_inv_freq

import transformers  # noqa: E402
import torch  # noqa: E402

_BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8}


@pytest.mark.parametrize("extra", [
    dict(architecture="llama"),
    dict(architecture="llama", rope_theta=5e5, rope_scaling=_LLAMA3, tie_word_embeddings=True, eos_token_id=(2, 7)),
    dict(architecture="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True,
         mlp_bias=True, head_dim=16),
    dict(architecture="qwen2", pad_token_id=0),
    dict(architecture="qwen2", sliding_window=5),
    dict(architecture="mistral", sliding_window=3, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5),
])
def test_hf_round_trip(extra):
    cfg = ModelConfig(**_BASE, **extra)
    hf = cfg.to_hf()
    assert type(hf).__name__ == {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}[
        cfg.architecture]
    assert hf.num_hidden_layers == 2 and hf.num_key_value_heads == 2
    assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
    assert ModelConfig.from_hf(hf) == cfg
    # through config.json as well (a plain dict, the on-disk form)
    assert ModelConfig.from_hf(json.loads(hf.to_json_string())) == cfg
    assert ModelConfig(**cfg.to_dict()) == cfg and hash(ModelConfig(**cfg.to_dict())) == hash(cfg)


def test_from_hf_reads_transformers5_and_legacy_rope_fields():
    hf = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, vocab_size=64,
                                  intermediate_size=48)
    assert getattr(hf, "rope_theta", None) is None                 # transformers 5: only in rope_parameters
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None and cfg.num_kv_heads == 4
    assert cfg.head_dim == 8 and cfg.dtype == "float32" and cfg.param_dtype == "float32"
    legacy = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0})
    cfg = ModelConfig.from_hf(legacy, dtype="bfloat16")
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.dtype == cfg.param_dtype == "bfloat16"
    # qwen2 with sliding window switched off by use_sliding_window=False is full attention
    q = transformers.Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                                 vocab_size=64, intermediate_size=48,
                                 sliding_window=4, use_sliding_window=False)
    assert ModelConfig.from_hf(q).sliding_window is None and ModelConfig.from_hf(q).attention_bias


def _hf_inv_freq(hf_cfg):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope_type = hf_cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        inv, scale = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    else:
        inv, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, "cpu")
    assert scale == 1.0
    return inv.numpy()


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, _LLAMA3,
                                     {**_LLAMA3, "original_max_position_embeddings": 64}])
def test_rope_frequencies_match_transformers(scaling):
    cfg = ModelConfig(**{**_BASE, "num_heads": 2, "num_kv_heads": 1}, rope_theta=5e5, rope_scaling=scaling)  # d=16
    ours = rope_inv_freq(cfg)
    ref = _hf_inv_freq(cfg.to_hf())
    assert ours.dtype == np.float32 and ours.shape == (8,)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    if scaling is not None:        # the scaling really changed something
        plain = rope_inv_freq(cfg.replace(rope_scaling=None))
        assert not np.allclose(ours, plain)


def test_config_is_hashable_and_isolated_from_the_input_dict():
    rs = dict(_LLAMA3)
    cfg = ModelConfig(**_BASE, rope_scaling=rs)
    rs["factor"] = 99.0
    assert cfg.rope_scaling["factor"] == 8.0
    assert hash(cfg) == hash(ModelConfig(**_BASE, rope_scaling=dict(_LLAMA3)))
    assert cfg.head_dim == 8 and cfg.rope_type == "llama3"


@pytest.mark.parametrize("kwargs, match", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "unsupported rope_type 'yarn'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 2.0}), "lacks"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta": 1}), "unsupported keys"),
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(architecture="gpt2"), "unsupported architecture 'gpt2'"),
    (dict(architecture="qwen2", attention_bias=False), "qwen2.*attention_bias"),
    (dict(architecture="mistral", attention_bias=True), "mistral.*attention_bias"),
    (dict(sliding_window=4), "'llama' has no sliding-window"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(vocab_size=0), "vocab_size must be a positive int"),
    (dict(head_dim=7), "even"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**_BASE, **kwargs})


def test_from_hf_rejects_what_is_not_implemented():
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        ModelConfig.from_hf(transformers.LlamaConfig(**base, hidden_act="gelu"))
    with pytest.raises(ValueError, match="unsupported rope_type 'dynamic'"):
        ModelConfig.from_hf(transformers.LlamaConfig(**base, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                                 "rope_theta": 1e4}))
    mixed = transformers.Qwen2Config(**base, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert mixed.layer_types == ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="mixes sliding-window and full-attention layers"):
        ModelConfig.from_hf(mixed)
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        ModelConfig.from_hf({"model_type": "bert"})
