"""RMU (Li et al. 2024, WMDP) and the decoder's hidden states.

References: a Hugging Face ``LlamaForCausalLM`` with our weights (its ``output_hidden_states`` and
a forward hook on ``model.layers.{l}``, as open-unlearning's ``RMU.forward_with_cache``), a numpy
port of open-unlearning's ``RMU.compute_activation_loss``, and parameter-by-parameter comparisons.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxunlearn import tree as jt
from jaxunlearn.losses import activation_loss
from jaxunlearn.method_configs import RMUMethod, load_method_config, parse_method_config
from jaxunlearn.methods import UnlearnContext, run_method
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig
from jaxunlearn.rmu import build_rmu, control_vector, rmu_trainable_mask
from toy_lm import lm_batch

V, T = 32, 8
CFG = ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2, num_kv_heads=1)


def _model(seed=0):
    model = Decoder(CFG, rngs=nnx.Rngs(seed))
    fn, params = DecoderFn.of(model)
    # larger weights than the 0.02 init: activations well away from zero
    params = jax.tree.map(lambda x: x * 10.0 if x.ndim == 2 else x, params)
    return fn, params


def _data(n, seed, prompt=3):
    b = lm_batch(n, seed, vocab=V, seq=T, prompt=prompt)
    for i in range(n):  # ragged rows: padding at the end, fewer scored tokens
        b["attention_mask"][i, T - i % 3:] = 0
        b["loss_mask"][i, T - i % 3:] = 0
    return b


def _activation_loss_np(a1, a2, mask):
    """open-unlearning's RMU.compute_activation_loss, in numpy."""
    a1, a2 = np.broadcast_arrays(np.asarray(a1, np.float64), np.asarray(a2, np.float64))
    squared_diff = (a1 - a2) ** 2                                   # mse_loss(reduction="none")
    expanded = np.broadcast_to(np.asarray(mask, np.float64)[..., None], squared_diff.shape)
    squared_diff_sum = (squared_diff * expanded).mean(axis=2).sum(axis=1)
    num_tokens = np.asarray(mask, np.float64).sum(axis=-1)
    return (squared_diff_sum / num_tokens).mean()


# ------------------------------------------------ hidden states


def test_hidden_state_equals_transformers_hidden_states_and_layer_hooks(tmp_path):
    import torch
    import transformers

    from jaxunlearn.models import from_pretrained

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)[0]
    fn, params = DecoderFn.of(model)
    ids = np.array([[5, 6, 7, 8, 9, 10], [12, 13, 14, 15, 0, 0]])
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2])
    hooked = {}
    handles = [hf.model.layers[i].register_forward_hook(
        lambda mod, inp, out, i=i: hooked.__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach()))
        for i in range(3)]
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    for h in handles:
        h.remove()
    real = mask.astype(bool)
    for layer in range(3):
        ours = np.asarray(jax.jit(lambda p, i, m, l=layer: fn.hidden_state(p, i, m, layer=l))(
            params, jnp.asarray(ids), jnp.asarray(mask)))
        ref = hooked[layer].numpy()
        assert ours.shape == ref.shape and np.abs(ref[real]).max() > 1.0
        assert np.abs(ours - ref)[real].max() <= 1e-4, layer
        if layer < 2:  # the last entry of output_hidden_states is after the final norm
            assert np.abs(ours - out.hidden_states[layer + 1].numpy())[real].max() <= 1e-4


def test_hidden_state_stops_the_forward_after_its_block():
    """Not a second full forward: the jaxpr of layer l has the matmuls of l + 1 blocks only."""
    fn, params = _model()
    ids, mask = jnp.zeros((2, T), jnp.int32), jnp.ones((2, T), jnp.int32)

    def dots(f):
        return str(jax.make_jaxpr(f)(params, ids, mask)).count("dot_general")

    full = dots(lambda p, i, m: fn(p, i, m))
    per_block = [dots(lambda p, i, m, l=l: fn.hidden_state(p, i, m, layer=l)) for l in range(3)]
    assert per_block[1] - per_block[0] == per_block[2] - per_block[1] > 0
    assert per_block[0] == per_block[1] - per_block[0]          # block 0 alone
    assert full > per_block[2]                                   # plus the head
    with pytest.raises(ValueError, match="layer must be < num_layers=3, got 3"):
        fn.hidden_state(params, ids, mask, layer=3)
    with pytest.raises(TypeError, match="hidden states need a jaxunlearn.models.Decoder|layer"):
        fn.hidden_state(params, ids, mask, layer=1.5)


# ------------------------------------------------ the losses and the step


def test_rmu_losses_are_open_unlearnings_activation_loss():
    fn, params = _model(0)
    _, other = _model(1)
    fb, rb = _data(4, 1), _data(5, 2)
    cfg = RMUMethod(layer=1, steering_coeff=3.0, alpha=2.0, learning_rate=1e-3)
    u = build_rmu(fn, cfg, params, seed=7)
    _, m = u.step(u.init(params), jax.tree.map(jnp.asarray, fb), jax.tree.map(jnp.asarray, rb), other)
    hidden = jax.jit(lambda p, i, m: fn.hidden_state(p, i, m, layer=1))
    h = lambda p, b: np.asarray(hidden(p, jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])))  # noqa: E731
    control = np.asarray(control_vector(7, 16, 3.0))[None, None, :]
    want_f = _activation_loss_np(h(params, fb), control, fb["loss_mask"])
    want_r = _activation_loss_np(h(params, rb), h(other, rb), rb["loss_mask"])   # frozen = ref_params
    assert want_r > 1e-2
    np.testing.assert_allclose(float(m["forget_loss"]), want_f, rtol=1e-5)
    np.testing.assert_allclose(float(m["retain_loss"]), want_r, rtol=1e-5)
    x = np.random.default_rng(0).normal(size=(3, 4, 5))
    lm = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]], np.float32)
    np.testing.assert_allclose(float(activation_loss(jnp.asarray(x), jnp.ones(5), jnp.asarray(lm))),
                               _activation_loss_np(x, np.ones((1, 1, 5)), lm), rtol=1e-5)


def test_control_vector_is_a_seeded_nonnegative_direction_of_norm_c():
    a, b = control_vector(3, 16, 6.5), control_vector(3, 16, 6.5)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, control_vector(4, 16, 6.5))
    np.testing.assert_allclose(float(jnp.linalg.norm(a)), 6.5, rtol=1e-6)
    assert bool(jnp.all(a >= 0))


def test_one_step_changes_only_the_chosen_mlp_params():
    fn, params = _model()
    fb, rb = jax.tree.map(jnp.asarray, _data(4, 1)), jax.tree.map(jnp.asarray, _data(4, 2))
    cfg = RMUMethod(layer=2, trainable_layers=[0, 2], trainable_params=["down_proj", "up_proj"], learning_rate=1e-2,
                    weight_decay=0.1)
    u = build_rmu(fn, cfg, params)
    state, _ = u.step(u.init(params), fb, rb, params)
    trainable = {f"layers/{l}/mlp/{p}/kernel" for l in (0, 2) for p in ("down_proj", "up_proj")}
    changed = set()
    for (path, new), old in zip(jax.tree_util.tree_flatten_with_path(state.params)[0], jax.tree.leaves(params)):
        if not np.array_equal(np.asarray(new), np.asarray(old)):
            changed.add(jt.path_str(path))
    assert changed == trainable
    mask = rmu_trainable_mask(params, [1], ["gate_proj"])
    assert {jt.path_str(p) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0] if float(m.sum())} == \
        {"layers/1/mlp/gate_proj/kernel"}
    with pytest.raises(ValueError, match="no parameter under 'layers/5/mlp/down_proj/'"):
        rmu_trainable_mask(params, [5])


def test_a_short_run_steers_forget_activations_and_keeps_retain_ones():
    fn, params = _model()
    forget, retain = _data(16, 1), _data(16, 2, prompt=1)
    ctx = UnlearnContext(fn, params, forget, retain, seed=3)
    cfg = {"kind": "rmu", "layer": 1, "steering_coeff": 20.0, "alpha": 10.0, "steps": 40, "learning_rate": 3e-3,
           "batch_size": 8, "trainable_params": ["gate_proj", "up_proj", "down_proj"]}
    seen = []
    out = run_method(ctx, cfg, callback=lambda s, m: seen.append(m))
    assert len(seen) == 40

    hidden = jax.jit(lambda p, i, m: fn.hidden_state(p, i, m, layer=1))

    def dist(p, data, target):
        h = hidden(p, jnp.asarray(data["input_ids"]), jnp.asarray(data["attention_mask"]))
        return float(activation_loss(h, target, jnp.asarray(data["loss_mask"])))

    c = control_vector(3, 16, 20.0)
    h_r = hidden(params, jnp.asarray(retain["input_ids"]), jnp.asarray(retain["attention_mask"]))
    before, after = dist(params, forget, c), dist(out, forget, c)
    assert after < 0.5 * before
    drift = dist(out, retain, h_r)
    assert drift < 0.1 * before and drift < after


def test_rmu_config_parses_and_refuses_bad_values():
    cfg = parse_method_config({"kind": "rmu", "layer": 1, "trainable_layers": [1, 0, 1]})
    assert cfg.trainable_layers == (0, 1) and cfg.trainable_params == ("down_proj",)
    assert RMUMethod(layer=7).trainable_layers == (5, 6, 7) and RMUMethod(layer=1).trainable_layers == (0, 1)
    assert parse_method_config(json_round_trip(cfg)) == cfg
    with pytest.raises(ValueError, match="trainable_params\\[0\\] must be one of"):
        parse_method_config({"kind": "rmu", "trainable_params": ["o_proj"]})
    with pytest.raises(ValueError, match="steering_coeff"):
        RMUMethod(steering_coeff=0.0)
    with pytest.raises(ValueError, match="unknown key 'steering'"):
        parse_method_config({"kind": "rmu", "steering": 2})
    rmu = load_method_config("experiments/configs/rmu.json")
    assert rmu.kind == "rmu" and rmu.layer == 1 and rmu.trainable_layers == (0, 1)
    fn, params = _model()
    ctx = UnlearnContext(fn, params, _data(4, 1), _data(4, 2))
    with pytest.raises(ValueError, match="layer must be < num_layers=3, got 7"):
        run_method(ctx, {"kind": "rmu"})
    toy = UnlearnContext(lambda p, i, m: p["E"][i], {"E": jnp.eye(V)}, _data(4, 1), _data(4, 2))
    with pytest.raises(TypeError, match="RMU needs the model's hidden states"):
        run_method(toy, {"kind": "rmu", "layer": 0})


def json_round_trip(cfg):
    import json

    from jaxunlearn.method_configs import method_config_to_dict

    return json.loads(json.dumps(method_config_to_dict(cfg)))
