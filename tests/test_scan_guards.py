"""Code that walks per-layer parameter paths (``layers/{i}/...``) refuses stacked ``scan_layers`` parameters
with an error naming ``scan_layers``, before any work: LoRA targets, RMU's and FIT's layer masks, the
quantisation targets (and so magnitude pruning) and bnb-layout fake quantisation, and the planner."""

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxunlearn.adapters import LoraConfig, lora_paths
from jaxunlearn.continual import layer_attribution, layer_mask
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig
from jaxunlearn.quant import fake_quantize, quant_targets
from jaxunlearn.rmu import rmu_trainable_mask
from jaxunlearn.sparsity import magnitude_prune_mask

CFG = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def stacked():
    fn, params = DecoderFn.of(Decoder(ModelConfig(**CFG, scan_layers=True), rngs=nnx.Rngs(0)))
    return fn, params


def test_per_layer_path_walkers_refuse_stacked_parameters(stacked):
    fn, params = stacked
    batch = {"input_ids": jnp.ones((2, 4), jnp.int32), "attention_mask": jnp.ones((2, 4), jnp.int32),
             "loss_mask": jnp.ones((2, 4), jnp.float32)}
    for call in (lambda: lora_paths(params, LoraConfig()),
                 lambda: rmu_trainable_mask(params, [1], ("down_proj",)),
                 lambda: layer_mask(params, [0]),
                 lambda: layer_attribution(fn, params, batch),
                 lambda: quant_targets(params),
                 lambda: magnitude_prune_mask(params, 0.5),
                 lambda: fake_quantize(params, "int4", layout="bnb")):
        with pytest.raises(ValueError, match="scan_layers"):
            call()


def test_unrolled_parameters_still_pass():
    _, params = DecoderFn.of(Decoder(ModelConfig(**CFG), rngs=nnx.Rngs(0)))
    assert lora_paths(params, LoraConfig())
    assert any(jnp.any(m > 0) for m in __import__("jax").tree.leaves(layer_mask(params, [0])))


def test_the_planner_refuses_scan_layers():
    from jaxunlearn.plan import plan

    with pytest.raises(ValueError, match="scan_layers"):
        plan(ModelConfig(**CFG, scan_layers=True), target="cpu:8", mesh="fsdp=8", batch=8, seq=8)
