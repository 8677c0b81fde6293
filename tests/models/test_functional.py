"""The decoder adapter DecoderFn: equal to the module call, hashable by value (so jitted functions
keyed on it compile once per architecture), its losses against direct formulas, and which per-example
loss (fused-Fisher capable or not) it hands out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxunlearn import fisher as fi
from jaxunlearn import reduction as rd
from jaxunlearn.fisher_fused import FusedFisherSums
from jaxunlearn.losses import sequence_nll
from jaxunlearn.models import (Decoder, DecoderFn, DecoderNLL, ExampleNLL, ModelConfig, answer_loss, answer_nll,
                               example_nll)

CFG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, num_kv_heads=1)
B, T = 3, 6


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    lm = np.zeros((B, T), np.float32)
    lm[:, 3:] = 1.0
    am = np.ones((B, T), np.int32)
    am[1, :2] = 0
    return {"input_ids": jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32),
            "attention_mask": jnp.asarray(am), "loss_mask": jnp.asarray(lm)}


class Scaled(nnx.Module):
    """A toy LM with non-parameter state (a plain nnx.Variable)."""

    def __init__(self, scale, rngs):
        self.table = nnx.Embed(8, 8, rngs=rngs)
        self.scale = nnx.Variable(jnp.float32(scale))

    def __call__(self, ids, mask=None):
        return self.table(ids) * self.scale[...]


def test_call_losses_and_merge_match_the_module():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    fn, params = DecoderFn.of(model)
    b = _batch()
    logits = fn(params, b["input_ids"], b["attention_mask"])
    np.testing.assert_allclose(logits, model(b["input_ids"], b["attention_mask"]), rtol=1e-6, atol=1e-6)
    nll = sequence_nll(logits, b["input_ids"], b["loss_mask"])
    np.testing.assert_allclose(fn.answer_nll(params, b), nll, rtol=1e-6)
    np.testing.assert_allclose(answer_nll(fn, params, b), nll, rtol=1e-6)
    np.testing.assert_allclose(fn.answer_loss(params, b), np.sum(nll) / np.sum(b["loss_mask"][:, 1:]), rtol=1e-6)
    per_row = [fn.example_nll(params, {k: v[n] for k, v in b.items()}) for n in range(B)]
    np.testing.assert_allclose(per_row, nll, rtol=1e-5)
    _, inputs = fn(params, b["input_ids"], b["attention_mask"], capture_inputs=True)  # model kwargs pass through
    assert "layers/0/attn/q_proj" in inputs
    assert isinstance(fn.merge(params), Decoder)


def test_equal_by_value_and_jit_caches_by_value():
    fn0, p0 = DecoderFn.of(Decoder(CFG, rngs=nnx.Rngs(0)))
    fn1, p1 = DecoderFn.of(Decoder(CFG, rngs=nnx.Rngs(1)))
    other, _ = DecoderFn.of(Decoder(CFG.replace(num_layers=2), rngs=nnx.Rngs(0)))
    assert fn0 == fn1 and hash(fn0) == hash(fn1) and fn0 is not fn1
    assert fn0 != other
    assert fn0.example_nll == fn1.example_nll and hash(fn0.example_nll) == hash(fn1.example_nll)
    b = _batch()
    fwd = jax.jit(lambda fn, p, ids, mask: fn(p, ids, mask), static_argnums=0)
    fwd(fn0, p0, b["input_ids"], b["attention_mask"])
    n = fwd._cache_size()
    out1 = fwd(fn1, p1, b["input_ids"], b["attention_mask"])
    assert fwd._cache_size() == n  # a second model of the same architecture reuses the compilation
    np.testing.assert_allclose(out1, fn1(p1, b["input_ids"], b["attention_mask"]), rtol=1e-6, atol=1e-6)
    # the Fisher engine's jitted step is keyed on the loss object: equal adapters, one compilation
    fi.fisher_diagonal(fn0.example_nll, p0, [b])
    n = rd.accumulate._cache_size()
    fi.fisher_diagonal(fn1.example_nll, p1, [b])
    assert rd.accumulate._cache_size() == n


def test_per_example_losses_offer_the_fused_fisher_only_for_a_decoder():
    fn, _ = DecoderFn.of(Decoder(CFG, rngs=nnx.Rngs(0)))
    assert fn.is_decoder and type(fn.example_nll) is DecoderNLL and example_nll(fn) == fn.example_nll
    assert isinstance(fn.example_nll, fi.FusedFisherLoss)
    assert isinstance(fi.fisher_local_sums(fn.example_nll), FusedFisherSums)
    toy = lambda p, ids, mask: p["E"][ids]  # noqa: E731 - any apply function
    assert type(example_nll(toy)) is ExampleNLL and not isinstance(example_nll(toy), fi.FusedFisherLoss)
    assert example_nll(toy) == example_nll(toy)
    sfn, _ = DecoderFn.of(Scaled(2.0, nnx.Rngs(0)))
    assert not sfn.is_decoder and type(sfn.example_nll) is ExampleNLL
    assert isinstance(fi.fisher_local_sums(sfn.example_nll), fi.PerExampleSums)


def test_non_parameter_state_is_kept_and_compared_by_value():
    m2 = Scaled(2.0, nnx.Rngs(0))
    fn2, params = DecoderFn.of(m2)
    assert fn2.rest is not None and "table" in params
    ids = jnp.array([[1, 2, 3]])
    np.testing.assert_allclose(fn2(params, ids), m2(ids), rtol=1e-6)
    assert fn2 == DecoderFn.of(Scaled(2.0, nnx.Rngs(5)))[0]
    fn3, _ = DecoderFn.of(Scaled(3.0, nnx.Rngs(0)))
    assert fn3 != fn2
    np.testing.assert_allclose(fn3(params, ids), 1.5 * fn2(params, ids), rtol=1e-6)
    b = {"input_ids": ids, "attention_mask": jnp.ones((1, 3)), "loss_mask": jnp.array([[0, 1, 1]])}
    np.testing.assert_allclose(answer_loss(fn2, params, b), fn2.answer_loss(params, b), rtol=1e-6)


def test_errors():
    with pytest.raises(TypeError, match="nnx.Module"):
        DecoderFn.of(lambda ids: ids)
    with pytest.raises(TypeError, match="GraphDef"):
        DecoderFn("llama")
    fn, params = DecoderFn.of(Decoder(CFG, rngs=nnx.Rngs(0)))
    with pytest.raises(KeyError, match="loss_mask"):
        fn.example_nll(params, {"input_ids": jnp.zeros(4, jnp.int32), "attention_mask": jnp.ones(4)})
