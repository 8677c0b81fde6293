"""Fused decoder Fisher (one forward/backward pass) against the chunked vmap(grad) Fisher.

The reference is ``fisher_diagonal(DecoderFn(graphdef).example_nll, ..., method="vmap")``: one
``jax.grad`` of the single-example loss per example, squared and averaged, which shares
no code with the fused rules (taps, captured inputs, dense_fisher, embedding scatter).
Tolerances: float32 ``rtol 1e-4`` (``atol 1e-6 * max|F|`` per leaf for entries near 0);
bfloat16 params and compute ``atol 3e-2 * max|F|`` per leaf: both paths round the
per-example gradients to bfloat16 at different points (the vmap path's per-example
weight gradient is a bf16 matmul output, the fused path accumulates ``a^T g`` in float32).
Tiny decoders: hidden 32, 2 layers (1 in the bfloat16 case), vocab 64, T 8.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxunlearn import fisher as fi
from jaxunlearn import fisher_fused as ff
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig

B, T = 5, 8


LLAMA = ("llama", False, "float32", (("attention_bias", True), ("mlp_bias", True)))
QWEN2 = ("qwen2", True, "float32", ())
QWEN2_BF16_1L = ("qwen2", True, "bfloat16", (("num_layers", 1),))  # bf16 rounding, not depth, is tested


@functools.lru_cache(maxsize=None)
def _model(arch, tied, dtype="float32", extra=()):
    """``(graphdef, params)`` of a tiny decoder with random values in every leaf (numpy, so no
    per-shape initialiser compilations; zero biases and unit norm scales would hide mistakes)."""
    kw = {"num_layers": 2, **dict(extra)}
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4,
                      num_kv_heads=2, architecture=arch, tie_word_embeddings=tied, dtype=dtype,
                      param_dtype=dtype, **kw)
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), shapes)
    return graphdef, params


def _batch(seed=0, size=B):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 12, (size, T)).astype(np.int32)  # 12 of 64 tokens: many repeats per example
    am = np.ones((size, T), np.int32)
    am[1, :3] = 0  # left padding
    am[2, 6:] = 0  # right padding
    lm = np.zeros((size, T), np.float32)
    lm[:, 4:] = 1.0
    lm[2, 6:] = 0.0
    ids[2, 6:] = 0
    w = np.array([1.0, 0.0, 2.0, 1.0, 0.5], np.float32)[:size]  # a zero and a fractional weight
    return {"input_ids": ids, "attention_mask": am, "loss_mask": lm, fi.WEIGHT_KEY: w}


def _assert_trees_close(out, ref, rtol, atol_rel):
    assert jax.tree.structure(out) == jax.tree.structure(ref)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(out)[0], jax.tree.leaves(ref)):
        assert a.dtype == jnp.float32 and a.shape == b.shape, jax.tree_util.keystr(path)
        b = np.asarray(b)
        assert np.abs(b).max() > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(a), b, rtol=rtol, atol=atol_rel * np.abs(b).max(),
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("spec", [LLAMA, QWEN2], ids=["llama-untied-all-biases", "qwen2-tied"])
def test_fused_equals_vmap_float32(spec):
    graphdef, params = _model(*spec)
    loss = DecoderFn(graphdef).example_nll
    batches = [_batch(0), _batch(1)]
    ref = fi.fisher_diagonal(loss, params, batches, method="vmap", chunk_size=B)
    out = ff.fisher_diagonal_fused(graphdef, params, batches)
    _assert_trees_close(out, ref, rtol=1e-4, atol_rel=1e-6)


def test_fused_equals_vmap_bfloat16():
    graphdef, params = _model(*QWEN2_BF16_1L)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    loss = DecoderFn(graphdef).example_nll
    ref = fi.fisher_diagonal(loss, params, [_batch()], method="vmap", chunk_size=B)
    out = fi.fisher_diagonal(loss, params, [_batch()], method="fused")
    _assert_trees_close(out, ref, rtol=0.0, atol_rel=3e-2)


def test_auto_routing():
    graphdef, params = _model(*LLAMA)
    model = nnx.merge(graphdef, params)
    batch = _batch()
    whole = ff.fisher_diagonal_fused(model, params, [batch])  # a Decoder works as well as its graphdef
    fn = DecoderFn.of(model)[0]
    # method="auto" (the default) picks the fused path for the adapter's loss: the same computation
    assert isinstance(fi.fisher_local_sums(fn.example_nll), ff.FusedFisherSums)
    assert not isinstance(fi.fisher_local_sums(fn.example_nll, method="vmap"), ff.FusedFisherSums)
    for out in (fi.fisher_diagonal(fn.example_nll, params, [batch]), ff.fisher_diagonal_fused(fn, params, [batch])):
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(whole)):
            np.testing.assert_array_equal(a, b)


def test_sampled_labels_and_microbatches():
    # labels="sampled" == the empirical fused Fisher of the batch whose answer tokens were drawn
    # by sample_fn with the documented keys fold_in(fold_in(rng, batch_index), n); computed in
    # micro-batches of 2 (the last one padded with a weight-0 row), which must not change the sums.
    graphdef, params = _model(*LLAMA)
    logits_fn = lambda p, ex: nnx.merge(graphdef, p)(ex["input_ids"][None], ex["attention_mask"][None])[0]  # noqa: E731
    sample_fn = fi.sample_labels_fn(logits_fn, autoregressive=False)
    batch, rng = _batch(), jax.random.key(3)
    out = ff.fisher_diagonal_fused(graphdef, params, [batch], labels="sampled", rng=rng, sample_fn=sample_fn,
                                   microbatch=2)
    keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(rng, 0), n) for n in range(B)])
    examples = {k: jnp.asarray(v) for k, v in batch.items() if k != fi.WEIGHT_KEY}
    drawn = jax.jit(jax.vmap(sample_fn, in_axes=(None, 0, 0)))(params, examples, keys)
    assert not np.array_equal(np.asarray(drawn["input_ids"]), batch["input_ids"])
    ref = ff.fisher_diagonal_fused(graphdef, params, [{**batch, "input_ids": np.asarray(drawn["input_ids"])}])
    _assert_trees_close(out, ref, rtol=1e-5, atol_rel=1e-7)


def test_errors():
    graphdef, params = _model(*LLAMA)
    batch = _batch()
    toy_loss = lambda p, ex: jnp.sum(p["embed"]["embedding"][...])  # noqa: E731
    with pytest.raises(NotImplementedError, match="fisher_sums"):
        fi.fisher_diagonal(toy_loss, params, [batch], method="fused")
    with pytest.raises(KeyError, match="loss_mask"):
        ff.fisher_diagonal_fused(graphdef, params, [{k: v for k, v in batch.items() if k != "loss_mask"}])
    with pytest.raises(TypeError, match="Decoder"):
        ff.fisher_diagonal_fused("llama", params, [batch])
    with pytest.raises(ValueError, match="empty"):
        ff.fisher_diagonal_fused(graphdef, params, [])
    with pytest.raises(ValueError, match="microbatch|chunk_size"):
        ff.fisher_diagonal_fused(graphdef, params, [batch], microbatch=0)
    with pytest.raises(ValueError, match="rng"):
        ff.fisher_diagonal_fused(graphdef, params, [batch], labels="sampled")
    with pytest.raises(ValueError, match="example_weight"):
        ff.fisher_diagonal_fused(graphdef, params, [{**batch, fi.WEIGHT_KEY: -batch[fi.WEIGHT_KEY]}])
    bad = jax.tree.map(lambda x: x, params)
    bad["lm_head"]["kernel"] = nnx.Param(jnp.zeros((32, 63)))
    with pytest.raises(ValueError, match="lm_head"):
        ff.fisher_diagonal_fused(graphdef, bad, [batch])
