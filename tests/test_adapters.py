"""LoRA / QLoRA pytree adapters and adapter-space unlearning, against dense and bitsandbytes references.

- ``merge`` equals the Hugging Face formula ``W + (alpha / r) B A`` on the ``(out, in)`` weight,
  computed here in numpy float64 from the transposed factors;
- the NF4 base equals bitsandbytes' ``quantize_4bit(..., quant_type="nf4")`` byte for byte
  (packed codes and absmax) and ``dequantize_4bit`` exactly, on odd shapes too;
- one adapter-space step equals the chain rule applied by hand: with ``G = dL/dW'`` the
  full-space gradient (plain, SAM or SAF estimator, computed on the merged weights by the
  full-space estimator), ``da = s G b^T`` and ``db = s a^T G``; SGD moves ``(a, b)`` by
  ``-lr`` times that;
- the runs (gradient, task vector, PerTA) change only the adapted kernels, by at most rank r.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxunlearn.adapters import (LoraConfig, LoraPair, NF4Weight, adapter_params_fn, check_lora, dequantize_base,
                                 freeze_base, init_lora, lora_delta, lora_paths, merge, nf4_dequantize, nf4_quantize,
                                 scale_lora)
from jaxunlearn.estimators import plain_estimator, saf_estimator, sam_estimator
from jaxunlearn.method_configs import parse_method_config
from jaxunlearn.methods import UnlearnContext, finetune_on_forget, run_method
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig
from jaxunlearn.tree import leaves_with_paths
from jaxunlearn.unlearn_step import forget_loss_fn, unlearner
from test_quant_bnb import _bnb_4bit

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)


@functools.lru_cache(maxsize=None)
def _model():
    return DecoderFn.of(Decoder(CFG, rngs=nnx.Rngs(0)))


def _data(n, seed, t=12):
    rng = np.random.default_rng(seed)
    lm = np.zeros((n, t), np.float32)
    lm[:, t // 2:] = 1
    return {"input_ids": rng.integers(0, 64, (n, t)).astype(np.int32),
            "attention_mask": np.ones((n, t), np.float32), "loss_mask": lm}


def _flat(tree):
    return dict(leaves_with_paths(tree))


def _random_adapter(params, cfg, seed=1):
    """An adapter with both factors nonzero (a fresh one has b = 0)."""
    lora = init_lora(params, cfg, jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 100), len(lora))
    return {p: LoraPair(pair.a, 0.05 * jax.random.normal(k, pair.b.shape)) for k, (p, pair) in zip(keys, lora.items())}


# ---------------------------------------------------------------- merge, NF4, init


def test_merge_equals_hf_formula_w_plus_scale_b_a():
    _, params = _model()
    cfg = LoraConfig(rank=3, alpha=7.0)
    lora = _random_adapter(params, cfg)
    merged = _flat(merge(params, lora, cfg))
    base = _flat(params)
    assert set(lora) == {p for p in base if p.startswith("layers/") and p.endswith("kernel")}
    for path, w in base.items():
        if path not in lora:
            np.testing.assert_array_equal(np.asarray(merged[path]), np.asarray(w))
            continue
        w_hf = np.asarray(w, np.float64).T                       # (out, in)
        A = np.asarray(lora[path].a, np.float64).T               # (r, in)
        B = np.asarray(lora[path].b, np.float64).T               # (out, r)
        want = w_hf + (7.0 / 3) * B @ A
        np.testing.assert_allclose(np.asarray(merged[path], np.float64).T, want, rtol=1e-6, atol=1e-7)


def test_fresh_adapter_is_identity_and_init_follows_peft():
    _, params = _model()
    for init in ("kaiming", "gaussian"):
        cfg = LoraConfig(rank=4, init=init)
        lora = init_lora(params, cfg, jax.random.key(0))
        for path, pair in lora.items():
            assert pair.a.dtype == jnp.float32 and not np.any(np.asarray(pair.b))
            d_in = pair.a.shape[0]
            if init == "kaiming":  # kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
                assert np.abs(np.asarray(pair.a)).max() <= 1 / np.sqrt(d_in)
                assert np.abs(np.asarray(pair.a)).max() > 0.8 / np.sqrt(d_in)
        if init == "gaussian":
            a = np.concatenate([np.asarray(p.a).ravel() for p in lora.values()])
            assert abs(a.std() - 1 / 4) < 0.02
        merged = merge(params, lora, cfg)
        for (p, x), (_, y) in zip(leaves_with_paths(merged), leaves_with_paths(params)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=p)


def test_targets_pattern_and_errors():
    _, params = _model()
    only_q = LoraConfig(targets=r"attn/q_proj/kernel$")
    assert lora_paths(params, only_q) == ["layers/0/attn/q_proj/kernel", "layers/1/attn/q_proj/kernel"]
    with pytest.raises(ValueError, match="matches no 2-D floating leaf"):
        lora_paths(params, LoraConfig(targets="nothing_here"))
    with pytest.raises(ValueError, match=r"LoraConfig.targets must be a valid regular expression"):
        LoraConfig(targets="(")
    with pytest.raises(ValueError, match=r"LoraConfig.rank"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match=r"LoraConfig.base"):
        LoraConfig(base="int4")
    lora = init_lora(params, only_q, jax.random.key(0))
    check_lora(params, lora, only_q)
    with pytest.raises(ValueError, match="do not fit the kernel"):
        check_lora(params, lora, LoraConfig(rank=2, targets=only_q.targets))
    with pytest.raises(ValueError, match="names no leaf"):
        check_lora(params, {"layers/9/attn/q_proj/kernel": lora["layers/0/attn/q_proj/kernel"]}, only_q)


@pytest.mark.parametrize("shape", [(70, 3), (96, 160), (64, 32), (37, 5)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nf4_base_equals_bitsandbytes(shape, dtype):
    import bitsandbytes.functional as F  # the test extra (make test installs it)
    import torch
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.normal(size=shape) * np.exp(rng.normal(size=shape[-1:])), dtype)   # (in, out)
    w = nf4_quantize(x)
    assert isinstance(w, NF4Weight) and w.packed.dtype == jnp.uint8
    W = torch.tensor(np.asarray(x.astype(jnp.float32)).T.copy())                               # (out, in)
    if dtype == "bfloat16":
        W = W.to(torch.bfloat16)
    q, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(np.asarray(w.packed), q.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(w.absmax), state.absmax.float().numpy())
    # what bitsandbytes stored, decoded by the format (its CPU dequantize_4bit kernel misreads the absmax
    # of blocks that straddle rows of some widths; test_quant_bnb._bnb_4bit explains and checks the rest)
    deq = _bnb_4bit(np.asarray(x.astype(jnp.float32)).T, dtype, "nf4").T
    got = nf4_dequantize(w)
    assert got.dtype == x.dtype and got.shape == shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(deq).astype(dtype)))


def test_freeze_base_nf4_holds_adapted_kernels_as_nf4_only():
    _, params = _model()
    cfg = LoraConfig(rank=2, base="nf4", targets=r"mlp/.*kernel$")
    frozen = freeze_base(params, cfg)
    nf4 = [x for x in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, NF4Weight)) if isinstance(x, NF4Weight)]
    assert len(nf4) == 6
    base = _flat(dequantize_base(frozen))
    merged = _flat(jax.jit(adapter_params_fn(cfg))(frozen, init_lora(params, cfg, jax.random.key(0))))
    for path, w in _flat(params).items():
        if "mlp" in path and path.endswith("kernel"):
            np.testing.assert_array_equal(np.asarray(base[path]), np.asarray(nf4_dequantize(nf4_quantize(w))))
            assert not np.array_equal(np.asarray(base[path]), np.asarray(w))
        else:
            np.testing.assert_array_equal(np.asarray(base[path]), np.asarray(w))
        np.testing.assert_array_equal(np.asarray(merged[path]), np.asarray(base[path]))


def test_scale_lora_scales_the_update():
    _, params = _model()
    cfg = LoraConfig(rank=2)
    lora = _random_adapter(params, cfg)
    d1, d2 = lora_delta(lora, cfg), lora_delta(scale_lora(lora, -2.5), cfg)
    for p in d1:
        np.testing.assert_allclose(np.asarray(d2[p]), -2.5 * np.asarray(d1[p]), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- the step in adapter space


def _chain_rule(lora, g_full, cfg):
    """dL/da = s G b^T, dL/db = s a^T G for each adapted kernel (numpy float64)."""
    g = _flat(g_full)
    out = {}
    for p, pair in lora.items():
        G = np.asarray(g[p], np.float64)
        a, b = np.asarray(pair.a, np.float64), np.asarray(pair.b, np.float64)
        out[p] = (cfg.scale * G @ b.T, cfg.scale * a.T @ G)
    return out


@pytest.mark.parametrize("estimator", ["plain", "sam", "saf"])
def test_adapter_step_is_the_chain_rule_of_the_full_space_estimator(estimator):
    fn, params = _model()
    cfg = LoraConfig(rank=3, alpha=6.0, base="nf4")
    frozen = freeze_base(params, cfg)
    lora = _random_adapter(params, cfg)
    est = {"plain": plain_estimator(), "sam": sam_estimator(0.05), "saf": saf_estimator("int4", rho=0.01)}[estimator]
    f_loss = forget_loss_fn(fn, "ga")
    lr = 0.1
    u = unlearner(f_loss, optax.sgd(lr), estimator=est, params_fn=adapter_params_fn(cfg))
    batch = {k: jnp.asarray(v) for k, v in _data(4, 0).items()}
    state, metrics = u.step(u.init(lora), batch, frozen=frozen)
    # independent: the full-space estimator on the merged weights, pulled back by hand
    theta = merge(frozen, lora, cfg)
    loss_ref, g_full = est(f_loss, theta, batch)
    np.testing.assert_allclose(float(metrics["forget_loss"]), float(loss_ref), rtol=1e-5)
    want = _chain_rule(lora, g_full, cfg)
    for p, pair in state.params.items():
        np.testing.assert_allclose(np.asarray(pair.a), np.asarray(lora[p].a) - lr * want[p][0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(pair.b), np.asarray(lora[p].b) - lr * want[p][1], rtol=1e-4, atol=1e-6)


def test_adapter_npo_reference_is_the_frozen_base_and_retain_term_is_pulled_back():
    fn, params = _model()
    cfg = LoraConfig(rank=2, base="nf4")
    frozen = freeze_base(params, cfg)
    lora0 = init_lora(params, cfg, jax.random.key(0))
    from jaxunlearn.unlearn import UnlearnConfig
    ucfg = UnlearnConfig(method="npo", optimizer="sgd", learning_rate=0.1, grad_clip=0.0, alpha=0.5)
    u = ucfg.build(fn, params_fn=adapter_params_fn(cfg))
    fb = {k: jnp.asarray(v) for k, v in _data(4, 0).items()}
    rb = {k: jnp.asarray(v) for k, v in _data(4, 1).items()}
    state, metrics = u.step(u.init(lora0), fb, rb, lora0, frozen=frozen)
    # at t = t0 the model is its reference: NPO's loss is (2 / beta) log 2
    np.testing.assert_allclose(float(metrics["forget_loss"]), 2 / 0.1 * np.log(2), rtol=1e-5)
    # the update: -lr * chain rule of (g_npo + alpha g_retain), both full-space gradients on the merged weights
    theta = merge(frozen, lora0, cfg)
    ref_logp = -fn.answer_nll(theta, fb)
    from jaxunlearn.unlearn_step import retain_loss_fn
    g_f = jax.grad(forget_loss_fn(fn, "npo"))(theta, {**fb, "ref_logp": ref_logp})
    g_r = jax.grad(retain_loss_fn(fn, "nll"))(theta, rb)
    want = _chain_rule(lora0, jax.tree.map(lambda a, b: a + 0.5 * b, g_f, g_r), cfg)
    for p, pair in state.params.items():
        np.testing.assert_allclose(np.asarray(pair.b), -0.1 * want[p][1], rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(pair.a), np.asarray(lora0[p].a))   # b = 0: no gradient on a


def test_adapter_step_needs_frozen_and_refuses_it_without_params_fn():
    fn, params = _model()
    cfg = LoraConfig(rank=2)
    batch = {k: jnp.asarray(v) for k, v in _data(2, 0).items()}
    u = unlearner(forget_loss_fn(fn, "ga"), optax.sgd(0.1), params_fn=adapter_params_fn(cfg))
    with pytest.raises(ValueError, match="needs frozen="):
        u.step(u.init(init_lora(params, cfg, jax.random.key(0))), batch)
    plain = unlearner(forget_loss_fn(fn, "ga"), optax.sgd(0.1))
    with pytest.raises(ValueError, match="only for an unlearner built with params_fn"):
        plain.step(plain.init(params), batch, frozen=params)


# ---------------------------------------------------------------- runs


def _ctx(seed=0):
    fn, params = _model()
    return UnlearnContext(fn, params, _data(8, 10), _data(8, 11), seed=seed)


def _assert_low_rank_change(out, params, cfg):
    for (p, x), (_, y) in zip(leaves_with_paths(out), leaves_with_paths(params)):
        diff = np.asarray(x, np.float64) - np.asarray(y, np.float64)
        if p in lora_paths(params, cfg):
            assert np.abs(diff).max() > 0, p
            s = np.linalg.svd(diff, compute_uv=False)
            assert np.sum(s > 1e-3 * s[0]) <= cfg.rank, (p, s)   # above float32 rounding of W + s a b
        else:
            np.testing.assert_array_equal(diff, 0.0, err_msg=p)


@pytest.mark.parametrize("unlearn", [
    {"method": "npo", "steps": 3, "learning_rate": 1e-2},
    {"method": "grad_diff", "steps": 3, "learning_rate": 1e-2, "saf": True, "project": True, "retain_k": 2},
    {"method": "simnpo", "steps": 2, "learning_rate": 1e-2, "sam_rho": 0.01, "retain_loss": "kl"},
])
def test_gradient_run_in_adapter_space_changes_only_adapted_kernels_by_rank_r(unlearn):
    ctx = _ctx()
    cfg = {"kind": "gradient", "batch_size": 4, "adapter": {"rank": 2, "base": "nf4"}, "unlearn": unlearn}
    out = run_method(ctx, cfg)
    _assert_low_rank_change(out, ctx.params, LoraConfig(rank=2, base="nf4"))


def test_salun_mask_over_the_adapter():
    ctx = _ctx()
    cfg = {"kind": "gradient", "batch_size": 4, "salun_fraction": 0.5, "adapter": {"rank": 2},
           "unlearn": {"method": "ga", "steps": 2, "learning_rate": 1e-2, "optimizer": "sgd"}}
    out = run_method(ctx, cfg)
    _assert_low_rank_change(out, ctx.params, LoraConfig(rank=2))


def test_task_vector_in_adapter_space_negates_the_adapter_update():
    ctx = _ctx(seed=4)
    ft = {"steps": 3, "learning_rate": 1e-2, "batch_size": 4}
    acfg = LoraConfig(rank=2, base="nf4")
    lora_ft = finetune_on_forget(ctx, ft, acfg)
    out = _flat(run_method(ctx, {"kind": "task_vector", "scale": 1.5, "finetune": ft,
                                 "adapter": {"rank": 2, "base": "nf4"}}))
    delta = lora_delta(lora_ft, acfg)
    for p, w in _flat(ctx.params).items():
        want = np.asarray(w) - 1.5 * np.asarray(delta[p]) if p in delta else np.asarray(w)
        np.testing.assert_allclose(np.asarray(out[p]), want, rtol=1e-6, atol=1e-7, err_msg=p)


def test_perta_in_adapter_space_runs_and_touches_adapted_kernels_only():
    ctx = _ctx()
    out = run_method(ctx, {"kind": "perta", "strength": 1.0, "adapter": {"rank": 2},
                           "finetune": {"steps": 2, "learning_rate": 1e-2, "batch_size": 4}})
    paths = set(lora_paths(ctx.params, LoraConfig(rank=2)))
    for (p, x), (_, y) in zip(leaves_with_paths(out), leaves_with_paths(ctx.params)):
        changed = not np.array_equal(np.asarray(x), np.asarray(y))
        assert changed == (p in paths), p


def test_adapter_config_is_parsed_strictly():
    cfg = parse_method_config({"kind": "gradient", "adapter": {"rank": 4, "base": "nf4"}, "unlearn": {}})
    assert cfg.adapter == LoraConfig(rank=4, base="nf4")
    with pytest.raises(ValueError, match=r"unknown key 'adapter.rnk'.*did you mean 'rank'"):
        parse_method_config({"kind": "gradient", "adapter": {"rnk": 4}, "unlearn": {}})
    with pytest.raises(ValueError, match="cannot be combined with adapter"):
        parse_method_config({"kind": "gradient", "adapter": {}, "prune_sparsity": 0.5, "unlearn": {}})


def test_adapter_run_resumes_to_identical_params(tmp_path):
    ctx = _ctx()
    cfg = {"kind": "gradient", "batch_size": 4, "adapter": {"rank": 2, "base": "nf4"},
           "unlearn": {"method": "npo", "steps": 4, "learning_rate": 1e-2}}
    full = run_method(ctx, cfg)

    class Stop(Exception):
        pass

    def stop_at_2(s, _):
        if s == 2:
            raise Stop

    with pytest.raises(Stop):
        run_method(ctx, cfg, checkpoint_dir=tmp_path / "run", checkpoint_every=1, callback=stop_at_2)
    resumed = run_method(ctx, cfg, checkpoint_dir=tmp_path / "run")
    for (p, x), (_, y) in zip(leaves_with_paths(resumed), leaves_with_paths(full)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=p)


def test_adapter_spec_parsing():
    from jaxunlearn.method_configs import parse_adapter_spec, with_adapter

    assert parse_adapter_spec("default") == LoraConfig()
    assert parse_adapter_spec("nf4") == LoraConfig(base="nf4")
    assert parse_adapter_spec("rank=4, alpha=8,init=gaussian") == LoraConfig(rank=4, alpha=8.0, init="gaussian")
    assert parse_adapter_spec("rank=2,targets=attn/(q|v)_proj,kernel") == LoraConfig(rank=2,
                                                                                      targets="attn/(q|v)_proj,kernel")
    with pytest.raises(ValueError, match="unknown key 'rnk'.*did you mean 'rank'"):
        parse_adapter_spec("rnk=4")
    with pytest.raises(ValueError, match="rank='x' is not an int"):
        parse_adapter_spec("rank=x")
    with pytest.raises(ValueError, match="LoraConfig.base"):
        parse_adapter_spec("base=int4")
    with pytest.raises(ValueError, match="not key=value"):
        parse_adapter_spec("rank")
    ssd = parse_method_config({"kind": "ssd"})
    with pytest.raises(ValueError, match="method 'ssd' .*has no adapter form"):
        with_adapter(ssd, LoraConfig(), "method 'ssd'")
    assert with_adapter(ssd, None) is ssd


def test_sharded_adapter_run_equals_the_unsharded_one():
    """On a (fsdp=4, tp=2) mesh with the target sharded, the adapter run (NF4 base, NPO + projection)
    ends where the single-device run does (atol 1e-6: another reduction order)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxunlearn import sharding as sh
    from toy_lm import bigram_apply, bigram_params, lm_batch

    params = bigram_params(16, 8)
    data = lambda n, s: lm_batch(n, s, vocab=16, seq=6, prompt=2)  # noqa: E731
    cfg = {"kind": "gradient", "batch_size": 8, "adapter": {"rank": 2, "base": "nf4", "targets": "^W$"},
           "unlearn": {"method": "npo", "steps": 3, "learning_rate": 0.05, "project": True, "retain_k": 2}}
    single = run_method(UnlearnContext(bigram_apply, params, data(16, 1), data(16, 2), seed=3), cfg)
    mesh = sh.make_mesh("fsdp=4,tp=2")
    placed = jax.device_put(params, {"E": NamedSharding(mesh, P("fsdp", "tp")), "W": NamedSharding(mesh, P("tp", "fsdp"))})
    sharded = run_method(UnlearnContext(bigram_apply, placed, data(16, 1), data(16, 2), seed=3, mesh=mesh), cfg)
    np.testing.assert_array_equal(np.asarray(sharded["E"]), np.asarray(params["E"]))
    assert np.abs(np.asarray(single["W"]) - np.asarray(params["W"])).max() > 1e-4
    np.testing.assert_allclose(np.asarray(sharded["W"]), np.asarray(single["W"]), atol=1e-6, rtol=0)
