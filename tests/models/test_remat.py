"""Activation rematerialisation (``ModelConfig.remat``) changes memory, not numbers.

The loss and every parameter gradient of a decoder with ``remat="full"`` or ``"dots_saveable"``
equal those of ``remat="none"`` (float32; loss rtol 1e-6, gradients rtol 1e-5 / atol 1e-7 on
entries of order 1e-2: the recomputed forward is the same computation, fused differently); the differentiated program really contains a checkpoint (``remat`` in its jaxpr)
and the compiled backward needs fewer temporary bytes with ``"full"``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxunlearn.models import Decoder, DecoderFn, ModelConfig

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def _loss_and_grad(remat):
    fn, params = DecoderFn.of(Decoder(CFG.replace(remat=remat), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(0, 64, (4, 12)), jnp.int32),
             "attention_mask": jnp.ones((4, 12), jnp.int32), "loss_mask": jnp.ones((4, 12), jnp.float32)}
    f = jax.jit(jax.value_and_grad(lambda p: fn.answer_loss(p, batch)))
    return f, params


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_leaves_loss_and_gradients_unchanged(remat):
    f0, params = _loss_and_grad("none")
    f1, _ = _loss_and_grad(remat)
    (l0, g0), (l1, g1) = f0(params), f1(params)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)
    assert "remat" in str(f1.trace(params).jaxpr) and "remat" not in str(f0.trace(params).jaxpr)


def test_full_remat_needs_fewer_temporary_bytes():
    temps = {}
    for remat in ("none", "full"):
        f, params = _loss_and_grad(remat)
        temps[remat] = f.lower(params).compile().memory_analysis().temp_size_in_bytes
    assert temps["full"] < temps["none"]


def test_an_unknown_remat_policy_is_named():
    with pytest.raises(ValueError, match="remat must be one of"):
        CFG.replace(remat="some")
