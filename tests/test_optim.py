"""bfloat16 parameters with float32 optimizer state: the wrapper, and unlearning / the Fisher
in bfloat16 against the float32 path.

References: plain optax on float32 parameters (the wrapper must be the identity there, bit for
bit); Adam's moment recursions in float64 numpy; the same decoder weights in float32 for the
bfloat16 unlearning run (params within 2e-2 relative, what bfloat16's 8-bit mantissa allows
after a few steps) and the bfloat16 Fisher (within 5e-2 of the largest entry per leaf).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxunlearn as ju
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig
from jaxunlearn.optim import float32_state
from toy_lm import lm_batch


def test_identity_for_float32_params():
    p = {"w": jnp.linspace(-1.0, 1.0, 7), "b": jnp.ones(2)}
    g = jax.tree.map(lambda x: jnp.cos(3 * x), p)
    plain, wrapped = optax.adamw(1e-2, weight_decay=0.1), float32_state(optax.adamw(1e-2, weight_decay=0.1))
    s1, s2 = plain.init(p), wrapped.init(p)
    for _ in range(3):
        u1, s1 = plain.update(g, s1, p)
        u2, s2 = wrapped.update(g, s2, p)
        for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))):
            np.testing.assert_array_equal(a, b)


def test_bfloat16_params_keep_float32_moments_exactly():
    b1, b2, steps = 0.9, 0.999, 50
    tx = float32_state(optax.adam(1e-3, b1=b1, b2=b2))
    p = {"w": jnp.ones(4, jnp.bfloat16)}
    s = tx.init(p)
    g = np.array([1.0, 0.5, 1e-3, 3.0])
    mu, nu = np.zeros(4), np.zeros(4)
    for _ in range(steps):
        u, s = tx.update({"w": jnp.asarray(g, jnp.bfloat16)}, s, p)
        gb = np.asarray(jnp.asarray(g, jnp.bfloat16).astype(jnp.float32), np.float64)
        mu, nu = b1 * mu + (1 - b1) * gb, b2 * nu + (1 - b2) * gb ** 2
    assert s[0].mu["w"].dtype == jnp.float32 and s[0].nu["w"].dtype == jnp.float32 and u["w"].dtype == jnp.float32
    np.testing.assert_allclose(s[0].nu["w"], nu, rtol=1e-5)
    np.testing.assert_allclose(s[0].mu["w"], mu, rtol=1e-5)
    # optax's own bfloat16 moments drift from the recursion (what the wrapper avoids)
    raw = optax.adam(1e-3, b1=b1, b2=b2)
    rs = raw.init(p)
    for _ in range(steps):
        _, rs = raw.update({"w": jnp.asarray(g, jnp.bfloat16)}, rs, p)
    assert rs[0].nu["w"].dtype == jnp.bfloat16
    assert np.max(np.abs(np.asarray(rs[0].nu["w"], np.float64) / nu - 1)) > 1e-3


def _decoder(param_dtype):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, param_dtype=param_dtype)
    return DecoderFn.of(Decoder(cfg, rngs=nnx.Rngs(0)))


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def test_unlearning_with_bfloat16_params_follows_the_float32_run():
    fn32, p32 = _decoder("float32")
    fn16, p16 = _decoder("bfloat16")
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)  # the same weights, rounded
    start = jax.tree.map(lambda x: x.astype(jnp.float32), p16)
    fb = {k: jnp.asarray(v) for k, v in lm_batch(4, 0, vocab=64, seq=8, prompt=3).items()}
    rb = {k: jnp.asarray(v) for k, v in lm_batch(4, 1, vocab=64, seq=8, prompt=3).items()}
    cfg = ju.UnlearnConfig(method="npo", learning_rate=1e-3, steps=3)
    runs = {}
    for name, fn, p in (("f32", fn32, start), ("bf16", fn16, p16)):
        u = cfg.build(fn)
        state = u.init(p)
        for _ in range(3):
            state, m = u.step(state, fb, rb, p)
        runs[name] = state
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(runs["bf16"].params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(runs["bf16"].opt_state)
               if jnp.issubdtype(x.dtype, jnp.floating))
    moved = max(_rel(a, b) for a, b in zip(jax.tree.leaves(runs["f32"].params), jax.tree.leaves(start)))
    assert moved > 1e-3  # the steps did something
    for a, b in zip(jax.tree.leaves(runs["bf16"].params), jax.tree.leaves(runs["f32"].params)):
        assert _rel(a, b) < 2e-2


def test_fisher_of_bfloat16_params_follows_the_float32_fisher():
    fn32, p32 = _decoder("float32")
    fn16, _ = _decoder("bfloat16")
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
    batch = {k: jnp.asarray(v) for k, v in lm_batch(8, 2, vocab=64, seq=8, prompt=3).items()}
    f32 = ju.fisher_diagonal(fn32.example_nll, jax.tree.map(lambda x: x.astype(jnp.float32), p16), [batch])
    f16 = ju.fisher_diagonal(fn16.example_nll, p16, [batch])
    for a, b in zip(jax.tree.leaves(f16), jax.tree.leaves(f32)):
        assert a.dtype == jnp.float32  # accumulated in float32
        assert _rel(a, b) < 5e-2


def test_training_with_bfloat16_params_follows_the_float32_run():
    from jaxunlearn.train import TrainConfig, TrainState, make_optimizer, make_train_step

    fn32, p32 = _decoder("float32")
    fn16, _ = _decoder("bfloat16")
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
    start = jax.tree.map(lambda x: x.astype(jnp.float32), p16)
    batch = {k: jnp.asarray(v) for k, v in lm_batch(4, 3, vocab=64, seq=8, prompt=3).items()}
    tx = make_optimizer(TrainConfig(steps=3, batch_size=4, learning_rate=1e-3, warmup_steps=0))
    out = {}
    for name, fn, p in (("f32", fn32, start), ("bf16", fn16, p16)):
        step = make_train_step(fn, tx)
        state = TrainState(jnp.zeros((), jnp.int32), p, tx.init(p))
        for _ in range(3):
            state, _ = step(state, batch)
        out[name] = state
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out["bf16"].opt_state)
               if jnp.issubdtype(x.dtype, jnp.floating))
    for a, b in zip(jax.tree.leaves(out["bf16"].params), jax.tree.leaves(out["f32"].params)):
        assert a.dtype == jnp.bfloat16 and _rel(a, b) < 2e-2
