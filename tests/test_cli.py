import json

import numpy as np
import pytest

from jaxunlearn.cli import main
from jaxunlearn.train import TrainConfig


@pytest.fixture(scope="module")
def demo_dir(tiny_pair):
    """The layout `jaxunlearn demo` writes, with the session's trained tiny target/reference."""
    return tiny_pair.dir


def test_unlearn_then_eval_with_two_commands(demo_dir, tmp_path, capsys):
    cfg = tmp_path / "ga.json"
    cfg.write_text(json.dumps({"kind": "gradient", "batch_size": 8,
                               "unlearn": {"method": "ga", "steps": 5, "learning_rate": 1e-2}}))
    unl = tmp_path / "unlearned"
    assert main(["unlearn", "--model", str(demo_dir / "models" / "target"), "--data", str(demo_dir / "data"),
                 "--forget", "forget10", "--retain", "retain90", "--method", "ga", "--config", str(cfg),
                 "--out", str(unl)]) == 0
    assert (unl / "config.json").is_file() and (unl / "model.safetensors").is_file()
    out = tmp_path / "eval.json"
    args = ["--data", str(demo_dir / "data"), "--forget", "forget10", "--retain", "retain90",
            "--general", "general", "--holdout", "holdout", "--rouge-examples", "2", "--quant", "int4"]
    assert main(["eval", "--model", str(unl), "--reference", str(demo_dir / "models" / "reference"),
                 "--out", str(out), *args]) == 0
    res = json.loads(out.read_text())
    assert 0.0 <= res["aggregates"]["forget_quality"] <= 1.0
    assert "int4" in res["quantization"]
    base = tmp_path / "eval_target.json"
    assert main(["eval", "--model", str(demo_dir / "models" / "target"), "--out", str(base), *args]) == 0
    before = json.loads(base.read_text())["aggregates"]["forget"]["probability"]
    assert res["aggregates"]["forget"]["probability"] < before  # gradient ascent lowered it
    # refuse to overwrite
    assert main(["eval", "--model", str(unl), "--out", str(out), *args]) == 2
    assert "exists" in capsys.readouterr().err


def test_eval_reads_tofu_format_files(demo_dir, tmp_path):
    from jaxunlearn.data import load_benchmark

    dd, _ = load_benchmark(demo_dir / "data")
    tofu = tmp_path / "tofu"
    tofu.mkdir()
    for split in ("forget10", "retain90"):
        with open(tofu / f"{split}.json", "w") as f:
            for row in dd[split]:
                f.write(json.dumps({k: row[k] for k in ("question", "answer", "paraphrased_answer",
                                                        "perturbed_answer")}) + "\n")
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(demo_dir / "models" / "target"), "--data", str(tofu), "--forget", "forget10",
                 "--retain", "retain90", "--rouge-examples", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["roles"] == {"forget10": "forget", "retain90": "retain"}


def test_bad_input_is_named(demo_dir, tmp_path, capsys):
    common = ["--data", str(demo_dir / "data"), "--forget", "forget10", "--retain", "retain90",
              "--out", str(tmp_path / "x")]
    assert main(["unlearn", "--model", str(demo_dir / "models" / "target"), "--method", "no_such_method", *common]) == 2
    assert "unknown method 'no_such_method'" in capsys.readouterr().err
    assert main(["unlearn", "--model", str(tmp_path / "missing"), "--method", "npo", *common]) == 2
    assert "missing" in capsys.readouterr().err
    bad = ["--data", str(demo_dir / "data"), "--forget", "forget99", "--retain", "retain90", "--method", "npo",
           "--out", str(tmp_path / "y"), "--model", str(demo_dir / "models" / "target")]
    assert main(["unlearn", *bad]) == 2
    assert "no split 'forget99'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_train_command_equals_the_library_run_and_learns(demo_dir, tmp_path, capsys):
    """`jaxunlearn train` on forget10 from the reference == `train.train` with the same settings
    (bitwise: batches are a pure function of (seed, step)), and the answer loss on the split drops."""
    import jax
    from flax import nnx

    from jaxunlearn.checkpoint import latest_step
    from jaxunlearn.data import encode_split, load_benchmark
    from jaxunlearn.models import DecoderFn, from_pretrained
    from jaxunlearn.train import train

    ref_dir, data_dir, out, rd = demo_dir / "models" / "reference", demo_dir / "data", tmp_path / "t", tmp_path / "r"
    settings = dict(steps=12, batch_size=8, learning_rate=5e-3, warmup_steps=2, seed=3)
    flags = ["--steps", "12", "--batch-size", "8", "--learning-rate", "5e-3", "--warmup-steps", "2", "--seed", "3"]
    assert main(["train", "--model", str(ref_dir), "--data", str(data_dir), "--splits", "forget10", "--out", str(out),
                 "--resume-dir", str(rd), "--checkpoint-every", "6", "--no-progress", *flags]) == 0
    assert "trained on forget10" in capsys.readouterr().out
    assert latest_step(str(rd)) == 12

    model, tok = from_pretrained(str(ref_dir))
    dd, _ = load_benchmark(data_dir)
    enc = encode_split(tok, dd["forget10"], max_length=None, fact_column=None)
    expected, _ = train(model, enc, TrainConfig(**settings), progress=False)
    got, _ = from_pretrained(str(out), load_tokenizer=False)
    want_p, got_p = nnx.state(expected, nnx.Param), nnx.state(got, nnx.Param)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), want_p, got_p)

    batch = {k: jax.numpy.asarray(v) for k, v in enc.items()}

    def loss(m):
        fn, params = DecoderFn.of(m)
        return float(fn.answer_loss(params, batch))

    assert loss(got) < 0.8 * loss(model)  # the reference never saw these people; 12 steps teach it some


def test_train_bad_input_is_named(demo_dir, tmp_path, capsys):
    base = ["train", "--model", str(demo_dir / "models" / "reference"), "--data", str(demo_dir / "data"),
            "--out", str(tmp_path / "t"), "--no-progress"]
    assert main([*base, "--splits", "nosuch"]) == 2
    assert "no split 'nosuch'" in capsys.readouterr().err
    assert main([*base, "--splits", "forget10", "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err
    assert main([*base, "--splits", "forget10", "--checkpoint-every", "5"]) == 2
    assert "--checkpoint-every needs --resume-dir" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_bench_rows_equal_unlearn_then_eval(demo_dir, tmp_path, capsys):
    """`jaxunlearn bench`'s row for a method == `unlearn` with that config, then `eval` (same seed,
    same splits): the table is the two commands' numbers, for every method it lists."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "ga.json").write_text(json.dumps({"kind": "gradient", "batch_size": 8,
                                                 "unlearn": {"method": "ga", "steps": 3, "learning_rate": 1e-2}}))
    (configs / "task_vector.json").write_text(json.dumps({"kind": "task_vector", "scale": 1.0, "finetune": {
        "steps": 3, "learning_rate": 1e-2, "batch_size": 8}}))
    model, ref, data = (str(demo_dir / "models" / "target"), str(demo_dir / "models" / "reference"),
                        str(demo_dir / "data"))
    splits = ["--forget", "forget10", "--retain", "retain90", "--general", "general", "--holdout", "holdout",
              "--rouge-examples", "2"]
    out = tmp_path / "bench"
    assert main(["bench", "--model", model, "--reference", ref, "--data", data, *splits, "--methods", "ga",
                 "task_vector", "--configs", str(configs), "--out", str(out), "--no-progress", "--seeds", "2",
                 "--muse", str(demo_dir / "muse"), "--verbmem-tokens", "64", "--relearn-data", "paraphrase",
                 "--relearn-steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert "task_vector" in printed and "int4_rec" in printed and "VerbMem_f" in printed
    assert "relearn_rec" in printed and "REMIND_AUC" in printed  # the probes' table
    res = json.loads((out / "results.json").read_text())
    assert list(res["table"]) == ["reference", "target", "ga", "task_vector"]
    assert (out / "forget_vs_utility.png").is_file() and (out / "relearn.png").is_file()
    assert res["relearn"]["data"] == "paraphrase" and res["relearn"]["steps"] == 4
    assert sorted(k for k in res["per_seed"]["ga"][0] if k.startswith("relearn_p_step")) == [
        "relearn_p_step0", "relearn_p_step2", "relearn_p_step4"]
    assert res["probes_not_available"] == {}  # the saved benchmark has every column the probes need

    unl, ev_out = tmp_path / "ga_model", tmp_path / "ga_eval.json"
    assert main(["unlearn", "--model", model, "--data", data, "--forget", "forget10", "--retain", "retain90",
                 "--method", "ga", "--configs", str(configs), "--out", str(unl)]) == 0
    assert main(["eval", "--model", str(unl), "--reference", ref, "--data", data, *splits,
                 "--out", str(ev_out)]) == 0
    agg = json.loads(ev_out.read_text())["aggregates"]
    assert res["seeds"] == [0, 1] and [r["seed"] for r in res["per_seed"]["ga"]] == [0, 1]
    row = res["per_seed"]["ga"][0]  # seed 0, the seed `unlearn` uses by default
    np.testing.assert_allclose(row["forget_probability"], agg["forget"]["probability"], rtol=1e-5)
    np.testing.assert_allclose(row["model_utility"], agg["model_utility"], rtol=1e-5)
    np.testing.assert_allclose(row["forget_quality"], agg["forget_quality"], rtol=1e-5)
    assert row["forget_probability"] < res["table"]["target"]["forget_probability"]
    # the MUSE columns are muse_eval's of the unlearned model, PrivLeak against the reference's AUC
    from jaxunlearn.benchmark import MUSE_EVAL
    from jaxunlearn.data.muse import load_muse
    from jaxunlearn.eval.muse import muse_eval
    from jaxunlearn.models import from_pretrained

    muse = load_muse(demo_dir / "muse")
    unlearned, tok = from_pretrained(unl)
    ref_muse = muse_eval(from_pretrained(ref)[0], tok, muse, **MUSE_EVAL)
    got = muse_eval(unlearned, tok, muse, reference=ref_muse, **MUSE_EVAL)
    for key, src in (("knowmem_forget", "knowmem_forget"), ("verbmem_forget", "verbmem_forget"),
                     ("privleak_muse", "privleak")):
        np.testing.assert_allclose(row[key], got[src], rtol=1e-5, atol=1e-9, err_msg=key)
    assert res["per_seed"]["reference"][0]["privleak_muse"] == 0.0
    assert res["muse_eval"] == MUSE_EVAL  # --verbmem-tokens 64 is the demo's budget
    # an unknown method is named before any model is loaded; an existing directory is refused
    assert main(["bench", "--model", model, "--data", data, *splits, "--methods", "no_such", "--configs",
                 str(configs), "--out", str(tmp_path / "b2")]) == 2
    assert "unknown method 'no_such'" in capsys.readouterr().err
    assert main(["bench", "--model", model, "--data", data, *splits, "--methods", "ga", "--configs", str(configs),
                 "--muse", str(demo_dir / "muse"), "--verbmem-tokens", "0", "--out", str(tmp_path / "b3")]) == 2
    assert "--verbmem-tokens must be >= 1, got 0" in capsys.readouterr().err
    assert main(["bench", "--model", model, "--data", data, *splits, "--methods", "ga", "--configs", str(configs),
                 "--muse", str(tmp_path / "no-muse"), "--out", str(tmp_path / "b4")]) == 2
    assert "no MUSE corpus directory" in capsys.readouterr().err
    assert main(["bench", "--model", model, "--data", data, *splits, "--methods", "ga", "--configs", str(configs),
                 "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_unlearn_in_adapter_space_changes_only_adapted_kernels_by_rank_r(demo_dir, tmp_path, capsys):
    from jaxunlearn.adapters import lora_paths, LoraConfig
    from jaxunlearn.models import DecoderFn, from_pretrained
    from jaxunlearn.tree import leaves_with_paths

    cfg = tmp_path / "npo.json"
    cfg.write_text(json.dumps({"kind": "gradient", "batch_size": 8,
                               "unlearn": {"method": "npo", "steps": 3, "learning_rate": 1e-2}}))
    out = tmp_path / "unlearned"
    target = demo_dir / "models" / "target"
    args = ["unlearn", "--model", str(target), "--data", str(demo_dir / "data"), "--forget", "forget10",
            "--retain", "retain90", "--method", "npo", "--config", str(cfg), "--out", str(out)]
    assert main([*args, "--adapter", "rank=2,base=nf4,targets=mlp/(up|down)_proj/kernel$"]) == 0
    before = DecoderFn.of(from_pretrained(target, load_tokenizer=False)[0])[1]
    after = DecoderFn.of(from_pretrained(out, load_tokenizer=False)[0])[1]
    adapted = set(lora_paths(before, LoraConfig(targets="mlp/(up|down)_proj/kernel$")))
    assert adapted and all("mlp" in p for p in adapted)
    for (p, x), (_, y) in zip(leaves_with_paths(after), leaves_with_paths(before)):
        d = np.asarray(x, np.float64) - np.asarray(y, np.float64)
        if p in adapted:
            s = np.linalg.svd(d, compute_uv=False)
            assert s[0] > 0 and np.sum(s > 1e-3 * s[0]) <= 2, p
        else:
            assert not np.any(d), p
    # a bad spec and a method without an adapter form are named before any work
    assert main([*args[:-1], str(tmp_path / "o2"), "--adapter", "rnk=2"]) == 2
    assert "unknown key 'rnk'" in capsys.readouterr().err
    assert main(["unlearn", "--model", str(target), "--data", str(demo_dir / "data"), "--forget", "forget10",
                 "--retain", "retain90", "--method", "ssd", "--out", str(tmp_path / "o3"), "--adapter", "nf4"]) == 2
    assert "has no adapter form" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_eval_at_deployment_precisions(demo_dir, tmp_path, capsys):
    from jaxunlearn.eval.durability import evaluate_precisions
    from jaxunlearn.eval.runner import encode_eval_splits
    from jaxunlearn.data import load_benchmark
    from jaxunlearn.models import from_pretrained

    target = demo_dir / "models" / "target"
    out = tmp_path / "e.json"
    args = ["eval", "--model", str(target), "--data", str(demo_dir / "data"), "--forget", "forget10",
            "--rouge-examples", "0", "--precisions", "bf16", "int4", "--out", str(out)]
    assert main(args) == 2 and "--precisions needs --retain" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--retain", "retain90"]) == 0
    dep = json.loads(out.read_text())["deployment"]
    assert list(dep["precisions"]) == ["bf16", "int4"] and dep["q_int4"] == dep["precisions"]["int4"]["fa"]
    assert "deployed at int4: FA" in capsys.readouterr().out
    # the same numbers as the library call
    model, tok = from_pretrained(target)
    dd, _ = load_benchmark(demo_dir / "data")
    roles = {"forget10": "forget", "retain90": "retain"}
    enc = encode_eval_splits(tok, {n: dd[n] for n in roles}, roles=roles)
    lib = evaluate_precisions(model, tok, enc, forget="forget10", retain=["retain90"], precisions=("bf16", "int4"))
    for p in ("bf16", "int4"):
        assert dep["precisions"][p]["fa"] == lib["precisions"][p]["fa"]
        assert dep["precisions"][p]["ra"] == lib["precisions"][p]["ra"]
