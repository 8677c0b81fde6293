"""Model sparsity (Jia et al., NeurIPS 2023): one-shot global magnitude pruning against
``torch.nn.utils.prune.global_unstructured(L1Unstructured)`` (the paper's pruner), the
reported sparsity against a count, the decaying l1 term against its formula, and the two
recipes composed with a gradient method: pruned weights stay exactly zero while unlearning,
and the l1 term adds ``alpha_t sign(theta)`` to the first update.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch.nn.utils import prune

import jaxunlearn as ju
from jaxunlearn.method_configs import GradientMethod
from jaxunlearn.methods import UnlearnContext, run_method
from jaxunlearn.sparsity import l1_regularization, magnitude_prune_mask, sparsity
from toy_lm import lm_batch


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"embed": {"embedding": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)},
            "layers": {"0": {"attn": {"q_proj": {"kernel": jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)}},
                             "mlp": {"up_proj": {"kernel": jnp.asarray(rng.standard_normal((8, 12)), jnp.float32)}}}},
            "norm": {"scale": jnp.ones(8, jnp.float32)}}


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.75, 0.9])
def test_global_magnitude_pruning_equals_torch_global_unstructured(amount):
    p = _params()
    kernels = [p["layers"]["0"]["attn"]["q_proj"]["kernel"], p["layers"]["0"]["mlp"]["up_proj"]["kernel"]]
    mods = [torch.nn.Linear(1, 1) for _ in kernels]
    for m, k in zip(mods, kernels):
        m.weight = torch.nn.Parameter(torch.tensor(np.asarray(k)))
    prune.global_unstructured([(m, "weight") for m in mods], pruning_method=prune.L1Unstructured, amount=amount)
    mask = magnitude_prune_mask(p, amount)
    got = [mask["layers"]["0"]["attn"]["q_proj"]["kernel"], mask["layers"]["0"]["mlp"]["up_proj"]["kernel"]]
    for g, m in zip(got, mods):
        np.testing.assert_array_equal(np.asarray(g), m.weight_mask.numpy().astype(bool))
    assert bool(jnp.all(mask["embed"]["embedding"])) and bool(jnp.all(mask["norm"]["scale"]))  # not targets
    pruned = jax.tree.map(lambda x, m: jnp.where(m, x, 0.0), p, mask)
    n = sum(int(k.size) for k in kernels)
    assert sparsity(pruned) == sum(int((m.weight_mask == 0).sum()) for m in mods) / n


def test_bad_sparsity():
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_prune_mask(_params(), 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        GradientMethod(unlearn=ju.UnlearnConfig(), prune_sparsity=1.5)


def test_l1_term_decays_linearly_to_zero():
    tx = l1_regularization(0.3, decay_steps=4)
    p = {"w": jnp.array([1.5, -2.0, 0.0])}
    s = tx.init(p)
    for t in range(6):
        u, s = tx.update({"w": jnp.full(3, 0.1)}, s, p)
        a = 0.3 * max(0.0, 1 - t / 4)
        np.testing.assert_allclose(np.asarray(u["w"]), [0.1 + a, 0.1 - a, 0.1], rtol=1e-6)
    with pytest.raises(ValueError, match="params"):
        tx.update({"w": jnp.zeros(3)}, s)


def _ctx():
    from jaxunlearn.models import Decoder, DecoderFn, ModelConfig
    from flax import nnx
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, num_kv_heads=1)
    fn, params = DecoderFn.of(Decoder(cfg, rngs=nnx.Rngs(0)))
    forget = lm_batch(8, 0, vocab=32, seq=6, prompt=2)
    retain = lm_batch(8, 1, vocab=32, seq=6, prompt=2)
    return UnlearnContext(apply_fn=fn, params=params, forget=forget, retain=retain, seed=0)


def test_prune_then_unlearn_keeps_the_pruned_weights_at_zero():
    ctx = _ctx()
    cfg = GradientMethod(unlearn=ju.UnlearnConfig(method="grad_diff", steps=3, learning_rate=1e-2), batch_size=4,
                         prune_sparsity=0.6)
    out = run_method(ctx, cfg)
    keep = magnitude_prune_mask(ctx.params, 0.6)
    s = sparsity(out)
    assert s == pytest.approx(sparsity(jax.tree.map(lambda x, m: jnp.where(m, x, 0.0), ctx.params, keep)), abs=1e-9)
    assert s >= 0.6 - 1e-3
    for x, m, x0 in zip(jax.tree.leaves(out), jax.tree.leaves(keep), jax.tree.leaves(ctx.params)):
        assert bool(jnp.all(jnp.where(m, True, x == 0)))  # pruned stays zero
    moved = [bool(jnp.any((x != x0) & m)) for x, m, x0 in zip(jax.tree.leaves(out), jax.tree.leaves(keep),
                                                                 jax.tree.leaves(ctx.params))]
    assert any(moved)  # the kept weights were unlearned


def test_l1_enters_the_unlearning_update_before_the_optimizer():
    ctx = _ctx()
    fb = {k: jnp.asarray(v) for k, v in ctx.forget.items()}
    plain = ju.UnlearnConfig(method="ga", optimizer="sgd", learning_rate=1.0, grad_clip=0.0, steps=2)
    with_l1 = ju.UnlearnConfig(method="ga", optimizer="sgd", learning_rate=1.0, grad_clip=0.0, steps=2, l1=0.01)
    u0, u1 = plain.build(ctx.apply_fn), with_l1.build(ctx.apply_fn)
    s0, _ = u0.step(u0.init(ctx.params), fb)
    s1, _ = u1.step(u1.init(ctx.params), fb)
    for a, b, p in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s0.params), jax.tree.leaves(ctx.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b - 0.01 * jnp.sign(p)), atol=1e-6)
