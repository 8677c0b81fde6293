"""Decoder blocks under one ``lax.scan`` (``ModelConfig(scan_layers=True)``) against the unrolled blocks.

The reference is always the unrolled decoder (``scan_layers=False``, a Python loop over separate
``Block`` modules) with the same weights: the two layouts initialise to the same numbers (the
stacked leaves are the per-layer leaves stacked), and logits, hidden states, gradients (with every
remat policy), taps and captured inputs, cached generation, the fused Fisher (against the unrolled
model's ``vmap`` per-example-gradient Fisher), a sharded forward and Hugging Face checkpoints
(byte-equal files) must agree. Float32 tolerances: logits 1e-5 relative, gradients and Fisher 1e-4
relative to each leaf's largest entry (the scan body is the same computation, fused differently).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxunlearn import sharding as sh
from jaxunlearn.fisher import fisher_diagonal
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig, dense_paths, generate, zero_taps
from jaxunlearn.models.hf import from_pretrained, save_pretrained
from jaxunlearn.models.scan import (check_unrolled, is_stacked, stack_layer_params, stack_taps, to_scanned,
                                    to_unrolled, unstack_layer_params, unstack_taps)

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                  attention_bias=True, mlp_bias=True, initializer_range=0.2)
QWEN = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   architecture="qwen2", sliding_window=3, tie_word_embeddings=True, initializer_range=0.2)


def _pair(cfg):
    """(unrolled, scanned) decoders built from the same seed."""
    return Decoder(cfg, rngs=nnx.Rngs(0)), Decoder(cfg.replace(scan_layers=True), rngs=nnx.Rngs(0))


def _pure(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _close(a, b, rtol=1e-4):
    """Each leaf of ``a`` equals ``b`` to ``rtol`` of the leaf's largest magnitude."""
    def one(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=0, atol=rtol * max(np.abs(y).max(), 1e-30))
    jax.tree.map(one, a, b)


def _batch(b=3, t=7, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, t), np.int32)
    mask[0, :2] = 0  # left padding on one row
    return {"input_ids": jnp.asarray(rng.integers(0, 64, (b, t)), jnp.int32), "attention_mask": jnp.asarray(mask),
            "loss_mask": jnp.asarray(mask, jnp.float32)}


@pytest.fixture(scope="module")
def pair():
    return _pair(CFG)


def test_stacked_layout_is_the_per_layer_initialisation_stacked(pair):
    m0, m1 = pair
    p0, p1 = _pure(m0), _pure(m1)
    assert p1["layers"]["attn"]["q_proj"]["kernel"].shape == (3, 32, 32)
    assert p1["layers"]["mlp_norm"]["scale"].shape == (3, 32)
    jax.tree.map(np.testing.assert_array_equal, stack_layer_params(p0), p1)     # bitwise
    jax.tree.map(np.testing.assert_array_equal, unstack_layer_params(p1, 3), p0)
    # model conversion both ways keeps the numbers
    jax.tree.map(np.testing.assert_array_equal, _pure(to_scanned(m0)), p1)
    jax.tree.map(np.testing.assert_array_equal, _pure(to_unrolled(m1)), p0)
    with pytest.raises(TypeError, match="scan_layers must be a bool"):
        CFG.replace(scan_layers="yes")
    # the guard of code that walks layers/{i}/... paths (an optax-like prefix included)
    assert is_stacked({"0": {"mu": p1}}) and not is_stacked(p0)
    check_unrolled(p0, "layer_mask")
    with pytest.raises(ValueError, match="layer_mask needs per-layer .*scan_layers=True"):
        check_unrolled({"0": {"mu": p1}}, "layer_mask")


@pytest.mark.parametrize("cfg", [CFG, QWEN], ids=["llama_bias", "qwen2_tied_window"])
def test_logits_and_hidden_states_equal_the_unrolled_model(cfg):
    m0, m1 = _pair(cfg)
    b = _batch()

    @jax.jit
    def run(p0, p1):
        outs = [fn(p, b["input_ids"], b["attention_mask"]) for fn, p in ((fn0, p0), (fn1, p1))]
        for layer in range(cfg.num_layers):
            outs += [fn.hidden_state(p, b["input_ids"], b["attention_mask"], layer=layer)
                     for fn, p in ((fn0, p0), (fn1, p1))]
        return outs
    (fn0, p0), (fn1, p1) = DecoderFn.of(m0), DecoderFn.of(m1)
    outs = run(p0, p1)
    for ref, got in zip(outs[::2], outs[1::2]):   # logits, then the residual stream after each block
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_hidden_state_scans_only_the_first_blocks(pair):
    _, m1 = pair
    ids = _batch()["input_ids"]
    jaxpr = str(jax.make_jaxpr(lambda i: m1.hidden_state(i, layer=0))(ids))
    assert "length=1" in jaxpr and "length=3" not in jaxpr


def _loss_and_grad(model):
    fn, params = DecoderFn.of(model)
    f = jax.jit(jax.value_and_grad(lambda p: fn.answer_loss(p, _batch())))
    return f(params), str(f.trace(params).jaxpr)


@pytest.fixture(scope="module")
def unrolled_grads(pair):
    (loss, grads), _ = _loss_and_grad(pair[0])
    return loss, stack_layer_params(nnx.to_pure_dict(grads))


@pytest.mark.parametrize("remat", ["none", "full", "dots_saveable"])
def test_gradients_equal_the_unrolled_model_under_every_remat_policy(unrolled_grads, remat):
    """(The unrolled reference runs without remat: remat does not change its gradients, test_remat.py.)"""
    (loss, grads), jaxpr = _loss_and_grad(Decoder(CFG.replace(scan_layers=True, remat=remat), rngs=nnx.Rngs(0)))
    np.testing.assert_allclose(loss, unrolled_grads[0], rtol=1e-6)
    _close(nnx.to_pure_dict(grads), unrolled_grads[1])
    assert "scan" in jaxpr and (("remat" in jaxpr) == (remat != "none"))   # remat wraps the scan body


def test_program_size_does_not_grow_with_depth():
    """Dense matmuls in the gradient's jaxpr: constant in depth scanned, linear unrolled."""
    b = _batch()
    counts = {}
    for scan in (False, True):
        for layers in (2, 4):
            fn, params = DecoderFn.of(Decoder(CFG.replace(num_layers=layers, scan_layers=scan), rngs=nnx.Rngs(0)))
            jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: fn.answer_loss(p, b)))(params))
            counts[scan, layers] = jaxpr.count("dot_general")
    assert counts[True, 2] == counts[True, 4]
    assert counts[False, 4] > counts[False, 2] > counts[True, 2] // 2


def test_taps_and_captured_inputs_equal_the_unrolled_model(pair):
    """Per-layer taps: the gradient wrt each tap (the output cotangent) and each captured input agree;
    the stacked form is the same arrays with a layer axis."""
    m0, m1 = pair
    b = _batch()

    def run(m, taps, **kw):
        fn, params = DecoderFn.of(m)

        def loss(t):
            logits, inputs = fn(params, b["input_ids"], b["attention_mask"], taps=t, capture_inputs=True, **kw)
            return jnp.sum(jnp.sin(logits)), inputs
        return jax.jit(jax.grad(loss, has_aux=True))(taps)

    taps = {**zero_taps(CFG, 3, 7), "layers/1/mlp/up_proj": jnp.ones((3, 7, 64))}   # one tap that acts
    g0, a0 = run(m0, taps)
    g1, a1 = run(m1, taps)
    assert set(g1) == set(g0) == set(a1) == set(dense_paths(CFG))
    _close(g1, g0)
    _close(a1, a0)
    gs, as_ = run(m1, stack_taps(taps, CFG), stacked=True)
    assert gs["layers/attn/q_proj"].shape == (3, 3, 7, 32)
    _close(unstack_taps(gs, 3), g0)
    _close(unstack_taps(as_, 3), a0)
    # a Dense tapped at some layers only gets the identity (zero) tap at the others
    x = jnp.ones((3, 7, 64))
    np.testing.assert_array_equal(stack_taps({"layers/1/mlp/up_proj": x}, CFG)["layers/mlp/up_proj"],
                                  jnp.stack([0 * x, x, 0 * x]))
    ids = jax.ShapeDtypeStruct((3, 7), jnp.int32)   # errors come before any work: abstract inputs suffice
    with pytest.raises(ValueError, match="scan_layers=True"):
        jax.eval_shape(lambda i: m0(i, stacked=True), ids)
    with pytest.raises(ValueError, match="unknown tap paths"):
        jax.eval_shape(lambda i: m1(i, taps={"layers/7/attn/q_proj": jnp.zeros((3, 7, 32))}), ids)
    with pytest.raises(ValueError, match="leading layer axis of 3"):
        jax.eval_shape(lambda i: m1(i, taps={"layers/attn/q_proj": jnp.zeros((2, 3, 7, 32))}, stacked=True), ids)


def test_cached_generation_equals_the_unrolled_model(pair):
    m0, m1 = pair
    b = _batch()
    prompts, mask = b["input_ids"], b["attention_mask"]
    cache = m1.init_cache(3, 10)
    assert cache["k"].shape == (3, 3, 10, 2, 8)   # (L, B, S, K, d)
    out0 = generate(m0, prompts, mask, 3)
    np.testing.assert_array_equal(generate(m1, prompts, mask, 3), out0)
    with pytest.raises(ValueError, match="cache has 2 layers"):
        m1.decode(prompts, positions=jnp.zeros((3, 7), jnp.int32), kv_mask=jnp.ones((3, 10)),
                  cache={k: v[:2] for k, v in cache.items()}, cache_index=0)


def test_fused_fisher_equals_the_unrolled_vmap_fisher():
    """fisher_diagonal(method="auto") of a scanned decoder runs the fused pass; it equals the per-example
    gradient Fisher of the unrolled model (stacked), weights included."""
    m0, m1 = _pair(QWEN.replace(num_layers=2))
    b = {**_batch(4, 6), "example_weight": jnp.array([1.0, 2.0, 0.0, 0.5])}
    fn0, p0 = DecoderFn.of(m0)
    fn1, p1 = DecoderFn.of(m1)
    assert hasattr(fn1.example_nll, "fisher_sums")
    ref = fisher_diagonal(fn0.example_nll, p0, [b], method="vmap")
    got = fisher_diagonal(fn1.example_nll, p1, [b])
    _close(nnx.to_pure_dict(got), stack_layer_params(nnx.to_pure_dict(ref)))


def test_partition_rules_put_the_layer_axis_first_and_sharded_forward_matches():
    _, m1 = _pair(CFG)
    mesh = sh.make_mesh("fsdp=4,tp=2")
    fn, params = DecoderFn.of(m1)
    specs = nnx.to_pure_dict(sh.param_specs(params, mesh))
    assert specs["layers"]["attn"]["q_proj"]["kernel"] == P(None, "fsdp", "tp")
    assert specs["layers"]["attn"]["q_proj"]["bias"] == P(None, "tp")
    assert specs["layers"]["attn"]["o_proj"]["kernel"] == P(None, "tp", "fsdp")
    assert specs["layers"]["mlp"]["down_proj"]["kernel"] == P(None, "tp", "fsdp")
    assert specs["layers"]["attn_norm"]["scale"] == P()
    assert specs["lm_head"]["kernel"] == P("fsdp", "tp")
    b = _batch(4, 6)
    f = jax.jit(lambda p, ids, m: fn(p, ids, m))
    ref = f(params, b["input_ids"], b["attention_mask"])
    placed = sh.shard_params(params, mesh)
    bb = sh.shard_batch({k: b[k] for k in ("input_ids", "attention_mask")}, mesh)
    np.testing.assert_allclose(f(placed, bb["input_ids"], bb["attention_mask"]), ref, rtol=1e-5, atol=1e-5)


def test_hf_checkpoint_is_the_same_from_either_layout(pair, tmp_path):
    """Saved unrolled, loaded scanned (scan_layers=True), saved again: byte-equal files; the scanned model
    saved and loaded unrolled gives the unrolled model's parameters."""
    m0, m1 = pair
    save_pretrained(m0, tmp_path / "a")
    loaded, _ = from_pretrained(tmp_path / "a", scan_layers=True)
    assert loaded.config.scan_layers
    jax.tree.map(np.testing.assert_array_equal, _pure(loaded), _pure(m1))
    save_pretrained(loaded, tmp_path / "b")
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    back, _ = from_pretrained(tmp_path / "b")
    jax.tree.map(np.testing.assert_array_equal, _pure(back), _pure(m0))
