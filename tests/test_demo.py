import dataclasses
import json
import math

import pytest

from jaxunlearn.cli import main
from jaxunlearn.data.muse import load_muse
from jaxunlearn.demo import run_demo
from jaxunlearn.models import from_pretrained
from jaxunlearn.pipeline import DemoConfig
from jaxunlearn.train import TrainConfig

TINY = DemoConfig(num_people=10, num_general=10, vocab_size=200, hidden_size=32, intermediate_size=64,
                  num_heads=2, num_kv_heads=1,
                  train=TrainConfig(steps=40, batch_size=16, learning_rate=3e-3, warmup_steps=5))


def test_demo_end_to_end_writes_results_and_models(tmp_path, capsys):
    out = tmp_path / "run"
    res = run_demo(str(out), cfg=TINY, progress=False, methods=[])
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"] == res["metrics"]
    assert set(saved["metrics"]) == {"target", "reference"}
    assert set(saved["metrics"]["target"]) == {"forget10", "retain90", "general", "holdout"}
    for m in ("target", "reference"):
        for s, row in saved["metrics"][m].items():
            assert 0.0 <= row["probability"] <= 1.0 and 0.0 <= row["fact_acc"] <= 1.0
    # training helped: the target fits its training data better than the unseen holdout
    t = saved["metrics"]["target"]
    assert t["retain90"]["probability"] > t["holdout"]["probability"]
    model, tok = from_pretrained(out / "models" / "target")
    assert model.config.vocab_size == len(tok)
    assert "forget10" in capsys.readouterr().out
    # the MUSE data the models were trained on are saved beside the benchmark, in MUSE's layout
    muse = load_muse(out / "muse")
    assert len(muse.privleak_forget) == 1 and len(muse.raw["retain1"]) + len(muse.raw["retain2"]) == 9
    assert saved["passage_length"] > saved["max_length"] and saved["config"]["muse"] is True


def test_demo_refuses_to_overwrite(tmp_path, capsys):
    from jaxunlearn.outputs import MARKER

    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text("{}")  # a previous demo's output: replaced only with --overwrite
    (out / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_demo(str(out), cfg=TINY, progress=False, methods=[])
    (out / MARKER).unlink()  # not the tool's: never replaced
    with pytest.raises(FileExistsError, match="not written by jaxunlearn"):
        run_demo(str(out), cfg=TINY, progress=False, methods=[], overwrite=True)
    assert (out / "results.json").read_text() == "{}"
    with pytest.raises(ValueError, match="unknown method 'no_such_method'"):
        run_demo(str(tmp_path / "other"), cfg=TINY, progress=False, methods=["no_such_method"])
    assert not (tmp_path / "other").exists()
    assert main(["demo", "--out", str(out), "--steps", "2", "--overwrite"]) == 2
    assert "not written by jaxunlearn" in capsys.readouterr().err


def test_bad_forget_split_is_named():
    with pytest.raises(ValueError, match="forget_split"):
        from jaxunlearn.pipeline import prepare_data

        prepare_data(dataclasses.replace(TINY, forget_split="retain90"))


def test_demo_seeds_repeat_the_unlearning_and_show_intervals(tmp_path, capsys):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "npo.json").write_text(json.dumps(
        {"kind": "gradient", "batch_size": 4, "unlearn": {"method": "npo", "steps": 3, "learning_rate": 3e-3}}))
    with pytest.raises(ValueError, match="seeds must be an int >= 1, got 0"):
        run_demo(str(tmp_path / "none"), cfg=TINY, progress=False, methods=["npo"], configs_dir=str(configs), seeds=0)
    assert not (tmp_path / "none").exists()
    out = tmp_path / "run"
    res = run_demo(str(out), cfg=TINY, progress=False, methods=["npo"], configs_dir=str(configs), seeds=2,
                   rouge_examples=1)
    saved = json.loads((out / "results.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["train_seeds"] is False
    bench = saved["benchmark"]
    assert [r["seed"] for r in bench["per_seed"]["npo"]] == [0, 1] and bench["table"]["npo"]["n"] == 2
    assert [r["seed"] for r in bench["per_seed"]["target"]] == [None]  # one trained pair for every seed
    assert res["benchmark"]["table"]["npo"]["ci95"]["forget_probability"] >= 0
    printed = capsys.readouterr().out
    assert "1 methods x 2 seed(s) [0, 1]" in printed and " ± " in printed and "n = 1 (no interval)" in printed
    # MUSE's columns for the reference, the target and every seed of the method
    header = next(line for line in printed.splitlines() if line.startswith("method"))
    assert header.split()[-5:-1] == ["KnowMem_f", "KnowMem_r", "VerbMem_f", "PrivLeak"] and "MUSE: KnowMem_f" in printed
    assert "(8 QA pairs + 8 KnowMem pairs + 1 passages" in printed
    for name in ("reference", "target", "npo"):
        for row in bench["per_seed"][name]:
            assert all(0.0 <= row[k] <= 1.0 for k in ("knowmem_forget", "knowmem_retain", "verbmem_forget"))
            assert math.isfinite(row["privleak_muse"])
    # the target finds its forget passage likelier than the never-trained holdout one; the reference does not
    assert bench["table"]["target"]["muse_auc"] > bench["table"]["reference"]["muse_auc"]


def test_demo_seeds_default_is_the_documented_one():
    from jaxunlearn.cli import build_parser
    from jaxunlearn.demo import DEMO_SEEDS

    assert build_parser().parse_args(["demo"]).seeds == DEMO_SEEDS
    assert build_parser().parse_args(["demo", "--seeds", "3", "--train-seeds"]).train_seeds
    assert build_parser().parse_args(["demo", "--no-muse"]).no_muse and not build_parser().parse_args(["demo"]).no_muse


def test_demo_without_muse_has_no_muse_columns(tmp_path, capsys):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "ga.json").write_text(json.dumps(
        {"kind": "gradient", "batch_size": 4, "unlearn": {"method": "ga", "steps": 2, "learning_rate": 1e-3}}))
    cfg = dataclasses.replace(TINY, muse=False, train=dataclasses.replace(TINY.train, steps=5))
    res = run_demo(str(tmp_path / "run"), cfg=cfg, progress=False, methods=["ga"], configs_dir=str(configs),
                   rouge_examples=1)
    printed = capsys.readouterr().out
    assert "KnowMem" not in printed and "(8 QA pairs)" in printed and not (tmp_path / "run" / "muse").exists()
    assert "knowmem_forget" not in res["benchmark"]["table"]["ga"] and res["benchmark"]["muse_eval"] is None
