"""Bad inputs and faults against the command line: refused before any work, named, nothing lost.

Fixtures as a new user would make them: a 10-person benchmark saved with ``save_benchmark``,
two random tiny decoders saved with ``save_pretrained`` (no training: these tests are about
what the commands refuse, write and keep), and small method configs. Every case asserts the
exit status 2 (a refused input), that stderr names the offending path / flag / key, and that
nothing was written or replaced.
"""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from flax import nnx

from jaxunlearn.cli import main
from jaxunlearn.data import save_benchmark
from jaxunlearn.models import Decoder, save_pretrained
from jaxunlearn.outputs import MARKER
from jaxunlearn.pipeline import DemoConfig, model_config_for, prepare_data
from jaxunlearn.runs import RUN_RECORD_FILE

TINY = DemoConfig(num_people=10, num_general=10, vocab_size=200, hidden_size=16, intermediate_size=32,
                  num_layers=1, num_heads=2, num_kv_heads=1)
SPLITS = ["--forget", "forget10", "--retain", "retain90"]
GA = {"kind": "gradient", "batch_size": 4, "unlearn": {"method": "ga", "steps": 2, "learning_rate": 1e-3}}
READ_ONLY = "/proc/jaxunlearn-no-such-dir/out"  # not writable even for root


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("badcli")
    data = prepare_data(TINY)
    save_benchmark(root / "data", data.dataset, data.tokenizer)
    mcfg = model_config_for(TINY, data.tokenizer, data.max_length)
    for name, seed in (("model", 0), ("other", 1)):
        save_pretrained(Decoder(mcfg, rngs=nnx.Rngs(seed)), root / name, tokenizer=data.tokenizer)
    configs = root / "configs"
    configs.mkdir()
    (configs / "ga.json").write_text(json.dumps(GA))
    (configs / "diverge.json").write_text(json.dumps(
        {"kind": "gradient", "batch_size": 4,
         "unlearn": {"method": "ga", "steps": 3, "learning_rate": 1e30, "optimizer": "sgd", "grad_clip": 0.0}}))
    return root


def _err(capsys) -> str:
    return capsys.readouterr().err


def _foreign_dir(path):
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")
    return path


def _unlearn(fx, *extra, model="model"):
    return main(["unlearn", "--model", str(fx / model), "--data", str(fx / "data"), *SPLITS, "--method", "ga",
                 "--configs", str(fx / "configs"), "--no-progress", *extra])


def _train(fx, *extra, model="model"):
    return main(["train", "--model", str(fx / model), "--data", str(fx / "data"), "--splits", "forget10",
                 "--no-progress", "--steps", "2", "--batch-size", "4", *extra])


def _bench(fx, *extra):
    return main(["bench", "--model", str(fx / "model"), "--data", str(fx / "data"), *SPLITS,
                 "--configs", str(fx / "configs"), "--rouge-examples", "1", "--quant", "--no-progress", *extra])


# ------------------------------------------------------------------ data loss


@pytest.mark.parametrize("command", ["bench", "demo"])
def test_overwrite_never_deletes_a_directory_the_tool_did_not_write(fx, tmp_path, capsys, command):
    out = _foreign_dir(tmp_path / "mine")
    if command == "bench":
        rc = _bench(fx, "--methods", "ga", "--out", str(out), "--overwrite")
    else:
        rc = main(["demo", "--out", str(out), "--overwrite", "--steps", "1", "--methods"])
    assert rc == 2
    err = _err(capsys)
    assert str(out) in err and "not written by jaxunlearn" in err
    assert (out / "thesis.tex").read_text() == "years of work"


def test_demo_into_a_file_is_refused_before_work(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("keep")
    assert main(["demo", "--out", str(f), "--steps", "1", "--methods"]) == 2
    assert f"'{f}' is a file" in _err(capsys) and f.read_text() == "keep"


def test_bench_overwrites_its_own_output_and_keeps_it_when_a_run_fails(fx, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench"
    assert _bench(fx, "--methods", "ga", "--out", str(out)) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["complete"] and (out / MARKER).is_file() and list(first["table"]) == ["target", "ga"]
    # a second run that dies after the first method: the old results stay whole, the partial ones are kept aside
    import jaxunlearn.benchmark as bm

    real = bm.run_method

    def dies_after_first(ctx, cfg, **kw):
        if dies_after_first.calls:
            raise KeyboardInterrupt
        dies_after_first.calls += 1
        return real(ctx, cfg, **kw)

    dies_after_first.calls = 0
    monkeypatch.setattr(bm, "run_method", dies_after_first)
    with pytest.raises(KeyboardInterrupt) as info:  # one seed: the second call is the second method
        _bench(fx, "--methods", "ga", "diverge", "--out", str(out), "--overwrite", "--seeds", "1")
    assert json.loads((out / "results.json").read_text()) == first
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".bench.partial-")]
    assert len(partial) == 1 and f"partial output kept in '{partial[0]}'" in info.value.__notes__
    kept = json.loads((partial[0] / "results.json").read_text())
    assert not kept["complete"] and list(kept["table"]) == ["target", "ga"]


@pytest.mark.parametrize("flags, message", [(["--seeds", "0"], "--seeds must be >= 1, got 0"),
                                           (["--seed", "-1"], "--seed must be >= 0, got -1")])
@pytest.mark.parametrize("command", ["bench", "demo"])
def test_bad_seeds_are_refused_before_work(fx, tmp_path, capsys, command, flags, message):
    out = tmp_path / "b"
    if command == "bench":
        rc = _bench(fx, "--methods", "ga", "--out", str(out), *flags)
    else:
        rc = main(["demo", "--out", str(out), "--steps", "1", "--methods", "ga", *flags])
    assert rc == 2 and message in _err(capsys) and not out.exists()


def test_a_method_failing_on_one_seed_is_aggregated_over_the_others(fx, tmp_path, capsys, monkeypatch):
    import jaxunlearn.benchmark as bm

    real = bm.run_method

    def fails_on_seed_1(ctx, cfg, **kw):
        if ctx.seed == 1:
            raise RuntimeError("out of luck")
        return real(ctx, cfg, **kw)

    monkeypatch.setattr(bm, "run_method", fails_on_seed_1)
    out = tmp_path / "b"
    assert _bench(fx, "--methods", "ga", "--out", str(out), "--seeds", "3") == 1
    captured = capsys.readouterr()
    assert "ga (seed 1)" in captured.err
    assert "ga: FAILED on seed 1 (RuntimeError: out of luck); aggregated over the other 2" in captured.out
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1, 2] and res["failed"] == {"ga": {"1": "RuntimeError: out of luck"}}
    row, per_seed = res["table"]["ga"], res["per_seed"]["ga"]
    assert [r["seed"] for r in per_seed] == [0, 1, 2] and "error" in per_seed[1]
    assert row["n"] == 2 and row["n_seeds"] == 3 and "error" not in row
    np.testing.assert_allclose(row["forget_probability"],
                               (per_seed[0]["forget_probability"] + per_seed[2]["forget_probability"]) / 2)
    assert res["forget_truth_ratios"]["ga"][1] is None and len(res["forget_truth_ratios"]["ga"][0]) > 0


def test_repeated_method_name_is_refused(fx, tmp_path, capsys):
    assert _bench(fx, "--methods", "ga", "ga", "--out", str(tmp_path / "b")) == 2
    assert "'ga' is named twice" in _err(capsys)


def test_bench_records_a_diverging_method_and_goes_on(fx, tmp_path, capsys):
    out = tmp_path / "bench"
    assert _bench(fx, "--methods", "diverge", "ga", "--out", str(out)) == 1
    captured = capsys.readouterr()
    assert "diverge" in captured.err and "failed" in captured.err
    assert "diverge: FAILED" in captured.out
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and set(res["failed"]) == {"diverge"}
    assert "NaN" in res["table"]["diverge"]["error"] or "Inf" in res["table"]["diverge"]["error"]
    assert np.isfinite(res["table"]["ga"]["forget_probability"])  # the method after it still ran


def test_partial_results_are_written_as_methods_finish(fx, tmp_path, monkeypatch):
    import jaxunlearn.benchmark as bm

    seen = []
    real = bm.compare_methods

    def spy(*a, on_update=None, **kw):
        def upd(partial):
            on_update(partial)
            staged = [p for p in tmp_path.iterdir() if p.name.startswith(".b.partial-")]
            seen.append(json.loads((staged[0] / "results.json").read_text()))
        return real(*a, on_update=upd, **kw)

    monkeypatch.setattr("jaxunlearn.benchmark.compare_methods", spy)
    assert _bench(fx, "--methods", "ga", "diverge", "--out", str(tmp_path / "b")) == 1
    assert [list(s["table"]) for s in seen] == [["target"], ["target", "ga"], ["target", "ga", "diverge"]]
    assert not any(s["complete"] for s in seen)


@pytest.mark.parametrize("command", ["bench", "eval", "unlearn", "train"])
def test_unwritable_out_is_refused_before_work(fx, capsys, command):
    if command == "bench":
        rc = _bench(fx, "--methods", "ga", "--out", READ_ONLY)
    elif command == "eval":
        rc = main(["eval", "--model", str(fx / "model"), "--data", str(fx / "data"), "--forget", "forget10",
                   "--out", READ_ONLY + ".json"])
    elif command == "unlearn":
        rc = _unlearn(fx, "--out", READ_ONLY)
    else:
        rc = _train(fx, "--out", READ_ONLY)
    assert rc == 2
    assert "cannot write in '/proc/jaxunlearn-no-such-dir'" in _err(capsys)


def test_eval_out_that_is_a_directory_is_refused_before_work(fx, tmp_path, capsys):
    assert main(["eval", "--model", str(fx / "model"), "--data", str(fx / "data"), "--forget", "forget10",
                 "--out", str(tmp_path)]) == 2
    assert f"--out '{tmp_path}' is a directory" in _err(capsys)


@pytest.mark.parametrize("command", ["unlearn", "train"])
@pytest.mark.parametrize("where", ["same", "inside", "model"])
def test_resume_dir_overlapping_out_or_model_is_refused(fx, tmp_path, capsys, command, where):
    out = tmp_path / "out"
    resume = {"same": out, "inside": out / "run", "model": fx / "model" / "run"}[where]
    run = _unlearn if command == "unlearn" else _train
    assert run(fx, "--out", str(out), "--resume-dir", str(resume)) == 2
    err = _err(capsys)
    assert "--resume-dir" in err and "overlap" in err
    assert not out.exists() and not (fx / "model" / "run").exists()


@pytest.mark.parametrize("command", ["unlearn", "train"])
def test_checkpoint_out_over_a_foreign_directory_is_refused_before_work(fx, tmp_path, capsys, command):
    out = _foreign_dir(tmp_path / "papers")
    run = _unlearn if command == "unlearn" else _train
    assert run(fx, "--out", str(out), "--overwrite") == 2
    assert "no config.json" in _err(capsys)
    assert (out / "thesis.tex").is_file()


def test_resume_dir_that_is_a_file_is_refused(fx, tmp_path, capsys):
    f = tmp_path / "state"
    f.write_text("x")
    assert _unlearn(fx, "--out", str(tmp_path / "o"), "--resume-dir", str(f)) == 2
    assert f"--resume-dir '{f}' is a file" in _err(capsys)


def test_resume_dir_with_a_one_shot_method_is_refused(fx, tmp_path, capsys):
    cfg = tmp_path / "ssd.json"
    cfg.write_text(json.dumps({"kind": "ssd"}))
    assert _unlearn(fx, "--out", str(tmp_path / "o"), "--config", str(cfg), "--resume-dir", str(tmp_path / "r")) == 2
    assert "kind 'ssd'" in _err(capsys)


# ------------------------------------------------------------------ wrong results with exit 0


@pytest.mark.parametrize("flag,value,field", [
    ("--learning-rate", "nan", "learning_rate"), ("--learning-rate", "-1", "learning_rate"),
    ("--learning-rate", "inf", "learning_rate"), ("--warmup-steps", "-5", "warmup_steps"),
    ("--weight-decay", "nan", "weight_decay"), ("--grad-clip", "-1", "grad_clip"),
    ("--batch-size", "0", "batch_size"), ("--steps", "0", "steps"),
])
def test_train_hyperparameters_are_checked_before_loading(fx, tmp_path, capsys, flag, value, field):
    # the model path does not exist: the flag must be refused first
    assert _train(fx, "--out", str(tmp_path / "o"), flag, value, model="no-such-model") == 2
    err = _err(capsys)
    assert f"{flag}: TrainConfig.{field}" in err and value.lstrip("-") in err
    assert not (tmp_path / "o").exists()


BAD_CONFIGS = [
    ({"kind": "gradient", "batchsize": 8, "unlearn": {"method": "ga"}}, ValueError, "unknown key 'batchsize'.*did you mean 'batch_size'"),
    ({"kind": "gradient", "unlearn": {"method": "ga", "learning_rate": -1}}, ValueError, r"key 'unlearn\.learning_rate'"),
    ({"kind": "gradient", "unlearn": {"method": "ga", "learning_rate": float("nan")}}, ValueError, r"unlearn\.learning_rate.*nan"),
    ({"kind": "gradient", "unlearn": {"method": "ga", "steps": 2.5}}, TypeError, r"unlearn\.steps.*must be an int"),
    ({"kind": "gradient", "unlearn": {"method": "ga", "steps": "10"}}, TypeError, r"unlearn\.steps"),
    ({"kind": "gradient", "unlearn": {"method": "npo", "gamma": float("nan")}}, ValueError, r"unlearn\.gamma"),
    ({"kind": "gradient", "unlearn": {"method": "npo", "beta": -0.1}}, ValueError, r"unlearn\.beta"),
    ({"kind": "gradient", "unlearn": {"method": "npo", "warmup_steps": -5}}, ValueError, r"unlearn\.warmup_steps"),
    ({"kind": "gradient", "unlearn": {"method": "npo", "lr": 1e-3}}, ValueError, "unknown key 'unlearn.lr'"),
    ({"kind": "gradient", "unlearn": {"method": "rmu"}}, ValueError, r"unlearn\.method"),
    ({"kind": "gradient", "unlearn": [1, 2]}, TypeError, "key 'unlearn' must be a JSON object"),
    ({"kind": "gradient"}, ValueError, "missing key 'unlearn'"),
    ({"kind": "gradient", "salun_fraction": 1.5, "unlearn": {}}, ValueError, "salun_fraction"),
    ({"kind": "gradient", "batch_size": True, "unlearn": {}}, TypeError, "key 'batch_size'"),
    ({"kind": "perta", "strength": float("nan"), "finetune": {"steps": 1, "learning_rate": 1e-3}}, ValueError, "key 'strength'"),
    ({"kind": "perta", "strength": -3.5, "finetune": {"steps": 1, "learning_rate": 1e-3}}, ValueError, "key 'strength'"),
    ({"kind": "perta", "strength": 1.0, "finetune": {"steps": 1}}, ValueError, "missing key 'finetune.learning_rate'"),
    ({"kind": "perta", "strength": 1.0, "importance": "hessian", "finetune": {"steps": 1, "learning_rate": 1}}, ValueError, "key 'importance'"),
    ({"kind": "task_vector", "scale": -1.0, "finetune": {"steps": 1, "learning_rate": 1e-3}}, ValueError, "key 'scale'"),
    ({"kind": "task_vector", "alpha": 1.0, "finetune": {"steps": 1, "learning_rate": 1e-3}}, ValueError, "unknown key 'alpha'.*called 'scale' now"),
    ({"kind": "ssd", "alpha": 5.0}, ValueError, "unknown key 'alpha'.*called 'threshold' now"),
    ({"kind": "task_vector", "scale": 1.0, "finetune": {"steps": 1, "learning_rate": 1e-3, "batch_size": 0}}, ValueError, r"key 'finetune\.batch_size'"),
    ({"kind": "ssd", "threshold": "10"}, TypeError, "key 'threshold'"),
    ({"kind": "ssd", "max_importance_examples": 0}, ValueError, "key 'max_importance_examples'"),
    ({"kind": "no_such_kind"}, ValueError, "key 'kind' must be one of"),
    ([{"kind": "ssd"}], TypeError, "must be a JSON object"),
]


@pytest.mark.parametrize("cfg,exc,pattern", BAD_CONFIGS, ids=[str(i) for i in range(len(BAD_CONFIGS))])
def test_method_config_is_validated_before_the_model_loads(fx, tmp_path, capsys, cfg, exc, pattern):
    from jaxunlearn.method_configs import load_method_config

    f = tmp_path / "m.json"
    f.write_text(json.dumps(cfg))
    with pytest.raises(exc, match=pattern) as info:
        load_method_config(f)
    assert str(f) in str(info.value)
    # the CLI: same message, exit 2, before the (missing) model is looked at
    assert _unlearn(fx, "--out", str(tmp_path / "o"), "--config", str(f), model="no-such-model") == 2
    err = _err(capsys)
    assert str(f) in err and "no-such-model" not in err


@pytest.mark.parametrize("content,pattern", [(b"{not json", "not valid JSON"), (b"\xff\xfe{}", "not UTF-8"),
                                             (None, "is a directory")])
def test_unreadable_config_file_is_named(fx, tmp_path, capsys, content, pattern):
    f = tmp_path / "m.json"
    if content is None:
        f.mkdir()
    else:
        f.write_bytes(content)
    assert _unlearn(fx, "--out", str(tmp_path / "o"), "--config", str(f)) == 2
    err = _err(capsys)
    assert str(f) in err and pattern in err


def test_bench_configs_dir_with_a_typo_is_refused_before_loading(fx, tmp_path, capsys):
    d = tmp_path / "configs"
    d.mkdir()
    (d / "ga.json").write_text(json.dumps({**GA, "batchsize": 8}))
    assert main(["bench", "--model", str(tmp_path / "no-such-model"), "--data", str(fx / "data"), *SPLITS,
                 "--configs", str(d), "--methods", "ga", "--out", str(tmp_path / "b")]) == 2
    err = _err(capsys)
    assert str(d / "ga.json") in err and "batchsize" in err
    assert not (tmp_path / "b").exists()


def test_rouge_examples_must_be_non_negative(fx, tmp_path, capsys):
    assert _bench(fx, "--methods", "ga", "--out", str(tmp_path / "b"), "--rouge-examples", "-1") == 2
    assert "--rouge-examples" in _err(capsys)


def test_diverging_unlearning_writes_nothing(fx, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["unlearn", "--model", str(fx / "model"), "--data", str(fx / "data"), *SPLITS, "--method", "diverge",
                 "--configs", str(fx / "configs"), "--out", str(out)]) == 2
    err = _err(capsys)
    assert "'diverge' returned" in err and ("NaN" in err or "Inf" in err)
    assert not out.exists()


def test_nan_weight_in_the_input_checkpoint_is_named(fx, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (fx / "model").iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert main(["unlearn", "--model", str(bad), "--data", str(fx / "data"), *SPLITS, "--method", "ga",
                 "--configs", str(fx / "configs"), "--out", str(tmp_path / "o")]) == 2
    assert "model.layers.0.mlp.up_proj.weight" in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_unlearn_resume_dir_of_another_model_with_the_same_shapes_is_refused(fx, tmp_path, capsys):
    rd = tmp_path / "run"
    assert _unlearn(fx, "--out", str(tmp_path / "a"), "--resume-dir", str(rd)) == 0
    record = json.loads((rd / RUN_RECORD_FILE).read_text())
    assert record["kind"] == "unlearn" and len(record["params"]) == 16
    assert _unlearn(fx, "--out", str(tmp_path / "b"), "--resume-dir", str(rd), model="other") == 2
    err = _err(capsys)
    assert "belongs to another run" in err and "'params'" in err
    assert not (tmp_path / "b").exists()
    # the same model resumes (finished run: nothing to do) and writes the same weights
    assert _unlearn(fx, "--out", str(tmp_path / "c"), "--resume-dir", str(rd)) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "c" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("change,field", [
    (("--learning-rate", "3e-3"), "config.learning_rate"), (("--seed", "1"), "config.seed"),
    (("--steps", "3"), "config.steps"), (("--splits", "retain90"), "data"), ((), "params"),
])
def test_train_resume_dir_of_another_run_is_refused(fx, tmp_path, capsys, change, field):
    rd = tmp_path / "run"
    assert _train(fx, "--out", str(tmp_path / "a"), "--resume-dir", str(rd), "--learning-rate", "1e-3") == 0
    assert json.loads((rd / RUN_RECORD_FILE).read_text())["kind"] == "train"
    args = ["--out", str(tmp_path / "b"), "--resume-dir", str(rd)]
    if change:
        rc = _train(fx, *args, "--learning-rate", "1e-3", *change) if change[0] != "--learning-rate" \
            else _train(fx, *args, *change)
    else:
        rc = _train(fx, *args, "--learning-rate", "1e-3", model="other")
    assert rc == 2
    err = _err(capsys)
    assert "belongs to another run" in err and f"'{field}'" in err
    assert not (tmp_path / "b").exists()


def test_train_resume_dir_of_an_unlearning_run_is_refused(fx, tmp_path, capsys):
    rd = tmp_path / "run"
    assert _unlearn(fx, "--out", str(tmp_path / "a"), "--resume-dir", str(rd)) == 0
    assert _train(fx, "--out", str(tmp_path / "b"), "--resume-dir", str(rd)) == 2
    assert "'kind' is 'unlearn' there but 'train' now" in _err(capsys)


# ------------------------------------------------------------------ security / files


def test_outputs_follow_the_umask(fx, tmp_path):
    old = os.umask(0o022)
    try:
        assert _bench(fx, "--methods", "ga", "--out", str(tmp_path / "b")) == 0
        assert _unlearn(fx, "--out", str(tmp_path / "u")) == 0
    finally:
        os.umask(old)
    for d in (tmp_path / "b", tmp_path / "u"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
        for f in d.iterdir():
            if f.is_file():
                assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_demo_refuses_before_any_work(tmp_path, capsys):
    # a bad method name and an existing own directory without --overwrite: both before data generation
    own = tmp_path / "own"
    own.mkdir()
    (own / MARKER).write_text("{}")
    (own / "results.json").write_text("{}")
    assert main(["demo", "--out", str(own), "--methods"]) == 2
    assert "--overwrite" in _err(capsys)
    assert main(["demo", "--out", str(tmp_path / "x"), "--methods", "no_such_method"]) == 2
    assert "unknown method 'no_such_method'" in _err(capsys) and not (tmp_path / "x").exists()
