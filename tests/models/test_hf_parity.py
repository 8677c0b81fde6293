"""Parity with Hugging Face ``transformers`` (torch, float32) and checkpoint IO.

The references are tiny random ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM``
models: their logits on a padded batch, their ``generate(do_sample=False)`` on a left-padded batch,
their state dicts after a round trip through ``save_pretrained``. torch is imported only here.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import torch  # noqa: E402
import transformers  # noqa: E402

from jaxunlearn.models import (  # noqa: E402
    DecoderFn,
    ModelConfig,
    from_pretrained,
    generate,
    hf_tensor_map,
    save_pretrained,
)

V = 64
_BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8}   # short: the scaling matters
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_parameters=_LLAMA3)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral_window3": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=3)),
}


def _hf_model(case, seed=0):
    cfg_cls, model_cls, extra = CASES[case]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**_BASE, **extra)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():               # larger weights than the default init: non-trivial outputs
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{case: (hf_model, checkpoint dir)} written by transformers' save_pretrained."""
    out = {}
    for case in CASES:
        hf = _hf_model(case)
        d = tmp_path_factory.mktemp(case)
        hf.save_pretrained(d)
        out[case] = (hf, d)
    return out


@pytest.fixture(scope="module")
def loaded(ckpts):
    return {case: from_pretrained(d)[0] for case, (_, d) in ckpts.items()}


def _hf_logits(hf, ids, mask):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _params_equal_state_dict(model, state_dict):
    """Every parameter equals the (transposed where linear) torch tensor of the same name."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for name, (path, transpose) in hf_tensor_map(model.config).items():
        node = pure
        for k in path:
            node = node[k]
        ref = state_dict[name].float().numpy()
        np.testing.assert_array_equal(np.asarray(node, np.float32), ref.T if transpose else ref, err_msg=name)


_IDS = np.array([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 0, 0], [17, 18, 19, 20, 21, 22, 0]])
_MASK = np.array([[1] * 7, [1] * 5 + [0] * 2, [1] * 6 + [0]])


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(ckpts, loaded, case):
    hf, _ = ckpts[case]
    model = loaded[case]
    _params_equal_state_dict(model, hf.state_dict())
    ref = _hf_logits(hf, _IDS, _MASK)
    fn, p = DecoderFn.of(model)
    ours = np.asarray(jax.jit(fn)(p, jnp.asarray(_IDS), jnp.asarray(_MASK)))
    real = _MASK.astype(bool)
    assert np.abs(ours - ref)[real].max() <= 1e-4
    assert np.abs(ref).max() > 1.0          # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_matches_transformers(ckpts, loaded, case):
    hf, _ = ckpts[case]
    ids = np.array([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])
    mask = (ids != 0).astype(np.int64)
    n = 5
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0).numpy()[:, ids.shape[1]:]
    ours = np.asarray(generate(loaded[case], ids, mask, n))
    np.testing.assert_array_equal(ours, ref)
    if case == "llama":                 # EOS: a row stops and emits pad; HF stops when all rows are done
        eos = int(ref[0, 1])
        with torch.no_grad():
            ref_eos = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                  max_new_tokens=n, do_sample=False, eos_token_id=eos,
                                  pad_token_id=0).numpy()[:, ids.shape[1]:]
        ref_eos = np.pad(ref_eos, ((0, 0), (0, n - ref_eos.shape[1])), constant_values=0)
        ours_eos = np.asarray(generate(loaded[case], ids, mask, n, eos_token_id=eos, pad_token_id=0))
        np.testing.assert_array_equal(ours_eos, ref_eos)
        assert (ours_eos[0, 2:] == 0).all()


@pytest.mark.parametrize("case", list(CASES))
def test_save_pretrained_loads_in_transformers(ckpts, loaded, case, tmp_path):
    hf, _ = ckpts[case]
    out = save_pretrained(loaded[case], tmp_path / "out")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]            # no temporary directory left behind
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(hf)
    sd, ref_sd = back.state_dict(), hf.state_dict()
    for name, t in ref_sd.items():
        torch.testing.assert_close(sd[name], t, rtol=0, atol=0, msg=name)
    np.testing.assert_allclose(_hf_logits(back, _IDS, _MASK), _hf_logits(hf, _IDS, _MASK), atol=1e-6)
    # and the config survives the round trip
    assert ModelConfig.from_hf(back.config) == loaded[case].config


def test_sharded_save_round_trip(ckpts, loaded, tmp_path):
    hf, _ = ckpts["llama"]
    model = loaded["llama"]
    out = save_pretrained(model, tmp_path / "sharded", max_shard_size="16KB")
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for f in shards[:-1]:                                     # greedy filling respects the limit
        assert os.path.getsize(out / f) < 16_000 + 1_000      # (+ header)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in hf.state_dict().values())
    again, _ = from_pretrained(out)
    _params_equal_state_dict(again, hf.state_dict())
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    for name, t in hf.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], t, rtol=0, atol=0, msg=name)


def test_bfloat16_checkpoint_is_cast_on_load(tmp_path):
    hf = _hf_model("qwen2", seed=1).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    model, _ = from_pretrained(tmp_path / "bf16")
    assert model.config.param_dtype == "float32"
    _params_equal_state_dict(model, hf.state_dict())          # bf16 values, exactly, in float32
    m16, _ = from_pretrained(tmp_path / "bf16", dtype="bfloat16")
    leaves = jax.tree.leaves(nnx.state(m16, nnx.Param))
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    _params_equal_state_dict(m16, hf.state_dict())


# ----------------------------------------------------------------------------- tokenizers


def _tokenizer(n_words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(n_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def test_tokenizer_round_trip_and_vocab_check(ckpts, loaded, tmp_path):
    tok = _tokenizer(20)
    out = save_pretrained(loaded["llama"], tmp_path / "with_tok", tokenizer=tok)
    model, tok2 = from_pretrained(out)
    assert tok2 is not None and len(tok2) == len(tok) == 23
    assert tok2("w0 w5 w19")["input_ids"] == tok("w0 w5 w19")["input_ids"] == [3, 8, 22]
    _params_equal_state_dict(model, ckpts["llama"][0].state_dict())
    big = _tokenizer(V)                                       # 67 tokens > vocab_size 64
    with pytest.raises(ValueError, match="tokenizer has 67 tokens but the model's vocab_size is 64"):
        save_pretrained(loaded["llama"], tmp_path / "big", tokenizer=big)
    assert not (tmp_path / "big").exists()
    big.save_pretrained(out)
    with pytest.raises(ValueError, match="tokenizer has 67 tokens"):
        from_pretrained(out)


# ----------------------------------------------------------------------------- bad input


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(d, fn):
    """Apply ``fn`` to the tensor dict of ``d/model.safetensors`` and write it back."""
    from safetensors.numpy import load_file, save_file

    tensors = dict(load_file(d / "model.safetensors"))
    fn(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def test_missing_paths(tmp_path, ckpts):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found: .*nowhere"):
        from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path / "empty")
    d = _copy(ckpts["llama"][1], tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        from_pretrained(d)


def test_unsupported_architectures(tmp_path):
    gpt2 = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, bos_token_id=1, eos_token_id=2)
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        from_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        ModelConfig.from_hf(gpt2)
    cls = transformers.LlamaConfig(**_BASE, architectures=["LlamaForSequenceClassification"])
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        ModelConfig.from_hf(cls)


def test_bad_tensors_are_named(tmp_path, ckpts):
    src = ckpts["llama"][1]
    d = _copy(src, tmp_path / "missing")
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        from_pretrained(d)
    d = _copy(src, tmp_path / "extra")
    _rewrite(d, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        from_pretrained(d)
    d = _copy(src, tmp_path / "shape")
    _rewrite(d, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight'.*\(32, 32\), expected \(16, 32\)"):
        from_pretrained(d)
    d = _copy(ckpts["llama3_tied"][1], tmp_path / "tied")
    _rewrite(d, lambda t: t.update({"lm_head.weight": np.ones((V, 32), np.float32)}))
    with pytest.raises(ValueError, match="'lm_head.weight'.*differs.*tie_word_embeddings"):
        from_pretrained(d)


def test_sharded_errors_and_overwrite(tmp_path, loaded):
    model = loaded["llama"]
    out = save_pretrained(model, tmp_path / "s", max_shard_size=16_000)
    with pytest.raises(FileExistsError, match="not empty"):
        save_pretrained(model, out, overwrite=False)
    save_pretrained(model, out, max_shard_size="1GB")                   # replaced whole: one file now
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["s"]
    shutil.rmtree(out)
    out = save_pretrained(model, out, max_shard_size=16_000)
    victim = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[1]
    (out / victim).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {victim} listed in model.safetensors.index.json"):
        from_pretrained(out)
    with pytest.raises(ValueError, match="cannot parse size"):
        save_pretrained(model, tmp_path / "x", max_shard_size="lots")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        save_pretrained(model, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    with pytest.raises(FileExistsError, match="it is a file"):
        (tmp_path / "file").write_text("")
        save_pretrained(model, tmp_path / "file")
