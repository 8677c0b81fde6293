"""``jaxunlearn durability --quick`` end to end: the schema of results.json, certificates that agree
with :func:`jaxunlearn.eval.durability.certificate`, the Pareto plot, the target cache, and bad input
refused before any training. One quick run is shared by the module (a tiny target, 2 methods x 2 seeds,
10 steps, a 2-point sweep)."""

import argparse
import json
import math

import pytest

from jaxunlearn.durability_bench import (QUICK_METHODS, TARGET_RECORD, DurabilityConfig, quick_config,
                                         run_durability)
from jaxunlearn.durability_cli import add_durability_parser, run_durability_cli
from jaxunlearn.eval.durability import PRECISIONS, certificate
from jaxunlearn.pipeline import DemoConfig

def _args(*argv):
    p = argparse.ArgumentParser()
    add_durability_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["durability", *argv])


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("durability") / "run"
    rc = run_durability_cli(_args("--quick", "--no-progress", "--out", str(out)))
    return rc, out, json.loads((out / "results.json").read_text())


@pytest.mark.slow  # the shared quick run trains a model (end-to-end tier)
def test_quick_run_writes_the_schema(quick):
    rc, out, res = quick
    assert rc == 0 and res["complete"] is True and res["failed"] == []
    assert {"config", "target", "runs", "certificates", "summary", "sweep", "table"} <= set(res)
    cfg = res["config"]
    assert cfg["methods"] == list(QUICK_METHODS) and cfg["seeds"] == [0, 1]
    assert cfg["epsilon"] == 0.047 and cfg["precisions"] == ["bf16", "int8", "int4"]
    assert cfg["demo"]["muse"] is False and cfg["max_steps"] == 10
    assert all(c["unlearn"]["steps"] == 10 and c["adapter"]["base"] == "nf4" for c in cfg["method_configs"].values())
    # the target first, at every precision, and it memorised the forget set (at int4 too)
    t = res["target"]
    assert list(t["precisions"]) == list(PRECISIONS)
    assert t["precisions"]["bf16"]["fa"] > 0.8 and abs(t["q_int4"] - t["precisions"]["bf16"]["fa"]) < 0.05
    assert 0.0 <= t["holdout_fa"] < t["precisions"]["bf16"]["fa"] and t["reused"] is False
    assert 0.0 <= t["holdout_fact_acc"] <= 1.0
    assert (out / "models" / "target" / "config.json").is_file() and (out / "models" / "target" / TARGET_RECORD).is_file()
    # one run per (method, seed), each in adapter space, evaluated at P
    assert [(r["method"], r["seed"]) for r in res["runs"]] == [(m, s) for m in QUICK_METHODS for s in (0, 1)]
    for r in res["runs"]:
        assert r["adapter"]["rank"] == 8 and r["adapter"]["base"] == "nf4"
        assert list(r["precisions"]) == ["bf16", "int8", "int4"]
        assert all(0.0 <= v["fa"] <= 1.0 and 0.0 <= v["ra"] <= 1.0 for v in r["precisions"].values())
        assert r["q_int4"] == r["precisions"]["int4"]["fa"]
        assert math.isclose(r["recovery_delta"], r["q_int4"] - r["precisions"]["bf16"]["fa"])
    text = (out / "table.md").read_text()
    assert all(f"| {m} |" in text for m in QUICK_METHODS) and "target (before unlearning)" in text


@pytest.mark.slow  # the shared quick run trains a model (end-to-end tier)
def test_certificates_agree_with_certificate_of_the_runs(quick):
    _, _, res = quick
    cfg = res["config"]
    assert res["certificates"] == certificate(res["runs"], epsilon=cfg["epsilon"], precisions=cfg["precisions"])
    for m, c in res["certificates"].items():
        assert c["seeds"] == [0, 1] and 0.0 <= c["cert_rate"] <= 1.0
        assert c["worst_fa"] == [max(r["precisions"][p]["fa"] for p in cfg["precisions"])
                                 for r in res["runs"] if r["method"] == m]
        assert res["summary"][m]["certificate"] == c


@pytest.mark.slow  # the shared quick run trains a model (end-to-end tier)
def test_sweep_scales_each_methods_knob_and_plots(quick):
    _, out, res = quick
    sw = res["sweep"]
    assert sw["seed"] == 0 and sw["factors"] == [0.3, 1.0] and set(sw["methods"]) == set(QUICK_METHODS)
    for m, entry in sw["methods"].items():
        assert entry["knob"] == "unlearn.learning_rate"
        assert entry["base"] == res["config"]["method_configs"][m]["unlearn"]["learning_rate"]
        assert [p["value"] for p in entry["points"]] == pytest.approx([0.3 * entry["base"], entry["base"]])
        for p in entry["points"]:
            assert set(p["precisions"]) == {"bf16", "int8", "int4"} and p["q_int4"] == p["precisions"]["int4"]["fa"]
        # the configured point at seed 0 is the main run's
        run0 = next(r for r in res["runs"] if r["method"] == m and r["seed"] == 0)
        assert entry["points"][1]["from_run"] and entry["points"][1]["precisions"] == run0["precisions"]
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.slow  # the shared quick run trains a model (end-to-end tier)
def test_rerun_refuses_without_overwrite(quick):
    _, out, res = quick
    before = (out / "results.json").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_durability_cli(_args("--quick", "--no-progress", "--out", str(out)))
    assert (out / "results.json").read_text() == before


@pytest.mark.slow  # the shared quick run trains a model (end-to-end tier)
def test_cached_target_is_reused(quick, tmp_path):
    _, out, res = quick
    cfg = quick_config(methods=("npo",), seeds=1, sweep=False)
    new = run_durability(tmp_path / "again", cfg, progress=False, reuse_from=out)
    assert new["target"]["reused"] is True and new["target"]["train_seconds"] is None
    assert new["target"]["precisions"] == res["target"]["precisions"]
    assert new["runs"][0]["precisions"] == res["runs"][0]["precisions"]  # same target, config and seed
    assert new["sweep"] == {} and not (tmp_path / "again" / "pareto.png").exists()
    assert (tmp_path / "again" / "models" / "target" / TARGET_RECORD).is_file()


def _no_adapter_configs(tmp_path):
    d = tmp_path / "configs"
    d.mkdir()
    (d / "npo_full.json").write_text(json.dumps(
        {"kind": "gradient", "unlearn": {"method": "npo", "steps": 5, "learning_rate": 1e-3}}))
    return d


@pytest.mark.parametrize("argv, error, match", [
    (["--methods", "npo", "nope"], ValueError, "unknown method 'nope'"),
    (["--epsilon", "-0.1"], ValueError, "--epsilon must be >= 0"),
    (["--epsilon", "nan"], ValueError, "--epsilon must be >= 0"),
    (["--seeds", "0"], ValueError, "--seeds must be >= 1"),
    (["--methods", "npo", "npo"], ValueError, "twice"),
    ("no-adapter", ValueError, "no \"adapter\" block"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, argv, error, match):
    out = tmp_path / "out"
    if argv == "no-adapter":
        argv = ["--configs", str(_no_adapter_configs(tmp_path)), "--methods", "npo_full"]
    with pytest.raises(error, match=match):
        run_durability_cli(_args("--quick", "--no-progress", "--out", str(out), *argv))
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_config_validation():
    with pytest.raises(ValueError, match="epsilon"):
        DurabilityConfig(epsilon=-1.0)
    with pytest.raises(ValueError, match="seeds"):
        DurabilityConfig(seeds=0)
    with pytest.raises(ValueError, match="muse"):
        quick_config(demo=DemoConfig(muse=True))
    with pytest.raises(ValueError, match="precisions"):
        DurabilityConfig(precisions=("bf16", "int3"))
    with pytest.raises(ValueError, match="repeated"):
        DurabilityConfig(extra_precisions=("int4",))
    with pytest.raises(ValueError, match="sweep_factors"):
        DurabilityConfig(sweep_factors=(0.0,))
    with pytest.raises(TypeError, match="DurabilityConfig"):
        run_durability("unused", {"seeds": 1})


def test_the_shipped_durable_configs_are_all_adapter_configs():
    from jaxunlearn.durability_bench import DEFAULT_METHODS, default_configs_dir, load_durable_configs

    configs = load_durable_configs(DEFAULT_METHODS)
    assert all(c.adapter.base == "nf4" for c in configs.values())
    assert configs["saf"].unlearn.saf and configs["saf"].unlearn.method == "npo"
    assert configs["salun"].salun_fraction is not None
    assert default_configs_dir().name == "durable"
