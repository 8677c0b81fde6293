"""``jaxunlearn plan`` on the command line: a tiny Hugging Face config.json planned for 8 CPU devices."""

import json

from jaxunlearn.cli import main


def _config_json(path):
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_plan_prints_the_table_and_writes_json(tmp_path, capsys):
    model = _config_json(tmp_path / "tiny")
    out = tmp_path / "plan.json"
    rc = main(["plan", str(model), "--target", "cpu:8", "--mesh", "fsdp=8", "--batch", "8", "--seq", "16",
               "--passes", "eval,unlearn", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "eval" in printed and "unlearn" in printed and "fits:" in printed and "estimate" in printed
    d = json.loads(out.read_text())
    assert set(d["passes"]) == {"eval", "unlearn"} and d["mesh"] == {"fsdp": 8}
    assert all(p["error"] is None and p["argument_bytes"] > 0 for p in d["passes"].values())
    assert d["fits"]["v5e"] is True


def test_plan_refuses_bad_input_before_compiling(tmp_path, capsys):
    assert main(["plan", "llama-9b", "--target", "cpu:8", "--mesh", "fsdp=8"]) == 2
    assert "unknown model preset 'llama-9b'" in capsys.readouterr().err
    assert main(["plan", "llama-2-7b", "--target", "cpu:8", "--mesh", "fsdp=16"]) == 2
    assert "16" in capsys.readouterr().err
