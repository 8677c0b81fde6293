"""Decoder: padding invariance, taps == output cotangents, dense paths, dtypes, cached generation.

All checks are against independent references: the same model on an unpadded sequence, plain
``jax.grad`` wrt the kernels, a naive generation loop that re-runs the full forward every step.
(Parity with ``transformers`` is in test_hf_parity.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxunlearn.models import (
    Decoder,
    Dense,
    DecoderFn,
    ModelConfig,
    count_params,
    dense_paths,
    dense_shapes,
    generate,
    zero_taps,
)
from jaxunlearn.tree import leaves_with_paths

V, D, F, L, H, K = 64, 32, 48, 2, 4, 2


def _config(**kw):
    base = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=H, num_kv_heads=K,
                initializer_range=0.2, attention_bias=True, mlp_bias=True)
    base.update(kw)
    return ModelConfig(**base)


def _numpy_model(cfg, seed):
    """A Decoder with N(0, 0.2) numpy weights (no random-number compile: keeps the suite fast)."""
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.RandomState(seed)
    pure = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.2, a.shape), a.dtype), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model():
    return Decoder(_config(), rngs=nnx.Rngs(0))   # the real initialiser (llama with all biases)


@pytest.fixture(scope="module")
def fwd():
    """One jitted functional forward shared by the tests (the adapter is a static, hashable
    argument: compiled once per shape and architecture)."""
    return jax.jit(lambda fn, params, ids, mask: fn(params, ids, mask), static_argnums=0)


def _split(m):
    return DecoderFn.of(m)


# ----------------------------------------------------------------------------- structure


def test_param_paths_and_dense_paths(model):
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    names = {p for p, _ in leaves_with_paths(pure)}
    expected = {"embed/embedding", "norm/scale", "lm_head/kernel"}
    for i in range(L):
        expected |= {f"layers/{i}/attn_norm/scale", f"layers/{i}/mlp_norm/scale"}
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            expected |= {f"layers/{i}/attn/{n}/kernel", f"layers/{i}/attn/{n}/bias"}
        for n in ("gate_proj", "up_proj", "down_proj"):
            expected |= {f"layers/{i}/mlp/{n}/kernel", f"layers/{i}/mlp/{n}/bias"}
    assert names == expected
    # every Dense module in the graph, and only those, is listed; its path is its kernel's path
    dense_modules = {"/".join(map(str, p)): m for p, m in nnx.iter_graph(model) if isinstance(m, Dense)}
    paths = dense_paths(model)
    assert paths[:8] == ["layers/0/attn/q_proj", "layers/0/attn/k_proj", "layers/0/attn/v_proj",
                         "layers/0/attn/o_proj", "layers/0/mlp/gate_proj", "layers/0/mlp/up_proj",
                         "layers/0/mlp/down_proj", "layers/1/attn/q_proj"]
    assert len(paths) == 7 * L + 1 and paths[-1] == "lm_head"
    assert set(paths) == set(dense_modules)
    for p, (din, dout) in dense_shapes(model).items():
        assert f"{p}/kernel" in names
        assert dense_modules[p].kernel[...].shape == (din, dout)
    # parameter count by hand: norms, q/k/v/o (+bias), gate/up/down (+bias); embed, final norm, head
    hd = D // H
    per_layer = (2 * D + (D * H * hd + H * hd) + 2 * (D * K * hd + K * hd) + (H * hd * D + D)
                 + 2 * (D * F + F) + (F * D + D))
    assert count_params(model) == V * D + L * per_layer + D + D * V
    # the real initialiser: unit norm scales, zero biases, kernels with std ~ initializer_range
    assert np.all(np.asarray(pure["norm"]["scale"]) == 1.0)
    assert np.all(np.asarray(pure["layers"][0]["attn"]["q_proj"]["bias"]) == 0.0)
    assert abs(float(np.std(pure["layers"][0]["mlp"]["gate_proj"]["kernel"])) - 0.2) < 0.03


def test_tied_embeddings_have_no_lm_head(fwd):
    m = _numpy_model(_config(tie_word_embeddings=True), 1)
    assert "lm_head" not in dense_paths(m)
    ids = jnp.array([[3, 4, 5, 6, 7, 8, 9]] * 3)
    g, p = _split(m)
    logits, inputs = jax.jit(lambda p: g(p, ids, None, capture_inputs=True))(p)
    assert "lm_head" not in inputs and len(inputs) == 7 * L
    # reference: an untied model with the same weights and lm_head/kernel = embed/embedding.T
    untied = nnx.eval_shape(lambda: Decoder(_config(), rngs=nnx.Rngs(0)))
    g_u, s_u = nnx.split(untied, nnx.Param)
    pure = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    pure["lm_head"] = {"kernel": pure["embed"]["embedding"].T}
    nnx.replace_by_pure_dict(s_u, pure)
    np.testing.assert_allclose(logits, fwd(DecoderFn(g_u), s_u, ids, None), atol=1e-5)
    with pytest.raises(ValueError, match="lm_head is tied"):
        jax.eval_shape(lambda: m(ids, taps={"lm_head": jnp.zeros((3, 7, V))}))


# ----------------------------------------------------------------------------- forward

SEQ = [5, 6, 7, 8, 9, 10, 11]


def test_padding_invariance_right_and_left(model, fwd):
    """A padded row's real positions equal the unpadded sequence's logits (causality gives the
    reference for a prefix: logits[:5] of the full row depend only on its first 5 tokens)."""
    g, p = _split(model)
    ids = jnp.array([SEQ, SEQ[:5] + [0, 0], [0, 0] + SEQ[:5]])
    mask = jnp.array([[1] * 7, [1] * 5 + [0] * 2, [0] * 2 + [1] * 5])
    out = np.asarray(fwd(g, p, ids, mask))
    assert out.dtype == np.float32 and out.shape == (3, 7, V)
    ref = out[0, :5]
    np.testing.assert_allclose(out[1, :5], ref, atol=1e-5)
    np.testing.assert_allclose(out[2, 2:], ref, atol=1e-5)
    # the pad tokens' ids do not leak either
    out2 = np.asarray(fwd(g, p, ids.at[1, 5:].set(33).at[2, :2].set(44), mask))
    np.testing.assert_allclose(out2[1, :5], ref, atol=1e-5)
    np.testing.assert_allclose(out2[2, 2:], ref, atol=1e-5)
    # the module call and the adapter agree
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m: m(ids, mask))(model)), out, atol=1e-5)


def test_positions_argument(model, fwd):
    g, p = _split(model)
    ids = jnp.array([SEQ, [0, 0] + SEQ[:5], SEQ])
    mask = jnp.array([[1] * 7, [0, 0] + [1] * 5, [1] * 7])
    explicit = jnp.array([list(range(7)), [0, 0, 0, 1, 2, 3, 4], list(range(7))])
    f = jax.jit(lambda pos: g(p, ids, mask, positions=pos))
    default = np.asarray(fwd(g, p, ids, mask))
    np.testing.assert_allclose(f(explicit), default, atol=1e-5)
    # RoPE is relative: shifting every position of a row by a constant leaves its logits unchanged
    np.testing.assert_allclose(f(explicit + 11), default, atol=1e-4)
    # ... but a non-uniform change of positions does change them
    assert np.abs(np.asarray(f(explicit.at[0, 3:].add(5))) - default)[0, 3:].max() > 1e-3


def test_bfloat16_forward_close_to_float32(model, fwd):
    ids = jnp.array([SEQ] * 3)
    g, p = _split(model)
    ref = np.asarray(fwd(g, p, ids, None))
    for param_dtype in ("float32", "bfloat16"):
        cfg = model.config.replace(dtype="bfloat16", param_dtype=param_dtype)
        g16, p16 = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
        p16 = jax.tree.map(lambda a, b: a.astype(b.dtype), p, p16)   # same weights, stored in param_dtype
        out = np.asarray(fwd(DecoderFn(g16), p16, ids, None))
        assert out.dtype == np.float32
        err = np.abs(out - ref).max() / np.abs(ref).max()
        assert 0 < err < 0.05, (param_dtype, err)                     # it really ran in bfloat16


# ----------------------------------------------------------------------------- taps


def test_taps_give_output_cotangents_and_weight_gradients(model, fwd):
    """For every Dense, with A the captured inputs and G = d loss_n / d taps (taps = 0):
    A_n^T G_n == d loss_n / d kernel and sum_t G_n == d loss_n / d bias, per example n (the
    reference is plain autodiff wrt the parameters); zero taps leave the logits unchanged."""
    cfg = model.config
    g, params = _split(model)
    ids = jnp.array([SEQ[:5] + [0, 0], SEQ, [0] + SEQ[1:]])
    mask = jnp.array([[1] * 5 + [0] * 2, [1] * 7, [0] + [1] * 6])
    r = jax.random.normal(jax.random.key(3), (3, 7, V))

    def loss(prm, taps, weights):
        logits, inputs = g(prm, ids, mask, taps=taps, capture_inputs=True)
        return jnp.sum(logits * r * weights[:, None, None]), (logits, inputs)

    @jax.jit
    def run():
        per_example = jax.vmap(jax.grad(loss, argnums=(0, 1), has_aux=True), in_axes=(None, None, 0))
        return per_example(params, zero_taps(cfg, 3, 7), jnp.eye(3))

    (g_params, g_taps), (logits, inputs) = run()
    np.testing.assert_allclose(logits[0], fwd(g, params, ids, mask), atol=1e-5)   # zero taps change nothing
    assert set(g_taps) == set(dense_paths(cfg)) == set(inputs)   # (jit returns dicts with sorted keys)
    g_params = nnx.to_pure_dict(g_params)
    checked_bias = 0
    for path in dense_paths(cfg):
        node = g_params
        for k in path.split("/"):
            node = node[int(k) if k.isdigit() else k]
        a = np.asarray(inputs[path][0])                                  # (3, 7, in), same for every n
        assert a.shape == (3, 7, dense_shapes(cfg)[path][0])
        for n in range(3):
            gg = np.asarray(g_taps[path][n])                             # cotangent of loss_n: (3, 7, out)
            assert np.abs(np.delete(gg, n, axis=0)).max() == 0           # loss_n only reaches example n
            np.testing.assert_allclose(a[n].T @ gg[n], node["kernel"][n], rtol=1e-4, atol=1e-5)
            if "bias" in node:
                np.testing.assert_allclose(gg[n].sum(0), node["bias"][n], rtol=1e-4, atol=1e-5)
        assert np.abs(node["kernel"]).max() > 1e-3
        checked_bias += "bias" in node
    assert checked_bias == 7 * L                        # every projection but lm_head has a bias here


def test_bad_taps_and_inputs(model):
    ids = jnp.array([[1, 2, 3]])

    def shape_of(*args, **kw):          # abstract evaluation: the checks run, nothing compiles
        return jax.eval_shape(lambda: model(*args, **kw))

    with pytest.raises(ValueError, match="unknown tap paths.*layers/9/attn/q_proj"):
        shape_of(ids, taps={"layers/9/attn/q_proj": jnp.zeros((1, 3, D))})
    with pytest.raises(ValueError, match="tap 'layers/0/mlp/up_proj' has shape"):
        shape_of(ids, taps={"layers/0/mlp/up_proj": jnp.zeros((1, 3, D))})
    with pytest.raises(ValueError, match="input_ids must be"):
        shape_of(jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        shape_of(ids, jnp.ones((1, 4), jnp.int32))
    with pytest.raises(TypeError, match="integers"):
        shape_of(jnp.ones((1, 3), jnp.float32))
    with pytest.raises(ValueError, match="positions shape"):
        shape_of(ids, positions=jnp.zeros((1, 2), jnp.int32))
    assert shape_of(ids).shape == (1, 3, V)


# ----------------------------------------------------------------------------- generation


def _naive_generate(fwd, g, p, ids, mask, n, eos=None, pad=0):
    """Reference: re-run the full forward on the whole sequence every step, no cache. The sequence
    lives in a fixed (B, P + n) buffer whose future slots are masked right padding (one compile)."""
    b, plen = ids.shape
    buf = np.concatenate([ids, np.zeros((b, n), ids.dtype)], 1)
    bmask = np.concatenate([mask, np.zeros((b, n), mask.dtype)], 1)
    done = np.zeros(b, bool)
    out = []
    for i in range(n):
        logits = np.asarray(fwd(g, p, jnp.asarray(buf), jnp.asarray(bmask)))
        nxt = np.where(done, pad, logits[:, plen + i - 1].argmax(-1)).astype(np.int32)
        out.append(nxt)
        if eos is not None:
            done |= nxt == eos
        buf[:, plen + i], bmask[:, plen + i] = nxt, 1
    return np.stack(out, 1)


def test_generate_matches_naive(model, fwd):
    g, p = _split(model)
    ids = np.array([[0, 0, 5], [7, 8, 9], [0, 12, 13]])
    mask = np.array([[0, 0, 1], [1, 1, 1], [0, 1, 1]], np.int32)
    n = 4                                      # P + n = 7: the naive loop reuses the (3, 7) forward
    out = np.asarray(generate(model, ids, mask, n))
    assert out.shape == (3, n) and out.dtype == np.int32
    np.testing.assert_array_equal(out, _naive_generate(fwd, g, p, ids, mask, n))
    # EOS: choose the token row 1 emits at step 1; after it, that row emits pad (no recompilation:
    # eos and pad ids are traced)
    eos = int(out[1, 1])
    out_eos = np.asarray(generate(model, ids, mask, n, eos_token_id=[eos], pad_token_id=63))
    np.testing.assert_array_equal(out_eos, _naive_generate(fwd, g, p, ids, mask, n, eos=eos, pad=63))
    assert (out_eos[1, 2:] == 63).all()


def test_generate_bad_input(model):
    ids = np.array([[5, 6, 0]])
    with pytest.raises(ValueError, match=r"left-padded.*\[0\]"):
        generate(model, ids, np.array([[1, 1, 0]]), 3)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, np.array([[0, 0, 0]]), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, None, 0)
    with pytest.raises(ValueError, match="attention_mask shape"):
        generate(model, ids, np.ones((1, 2)), 2)
    with pytest.raises(TypeError, match="Decoder"):
        generate(object(), ids, None, 2)
