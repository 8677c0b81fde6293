import json

import numpy as np
import pytest
from scipy.stats import ks_2samp

from jaxunlearn.benchmark import format_results_table, load_method_configs, run_benchmark
from jaxunlearn.pipeline import DemoConfig
from jaxunlearn.train import TrainConfig

TINY = DemoConfig(num_people=20, num_general=10, vocab_size=200, hidden_size=32, intermediate_size=64,
                  num_heads=2, num_kv_heads=1,
                  train=TrainConfig(steps=150, batch_size=32, learning_rate=1e-2, warmup_steps=10))


@pytest.fixture
def configs_dir(tmp_path):
    d = tmp_path / "configs"
    d.mkdir()
    (d / "npo.json").write_text(json.dumps(
        {"kind": "gradient", "batch_size": 8,
         "unlearn": {"method": "npo", "steps": 8, "learning_rate": 3e-3, "alpha": 1.0}}))
    (d / "ga_proj.json").write_text(json.dumps(
        {"kind": "gradient", "batch_size": 8,
         "unlearn": {"method": "ga", "steps": 8, "learning_rate": 3e-3, "project": True, "retain_k": 2}}))
    return d


def test_benchmark_end_to_end_toy(tmp_path, configs_dir, tiny_pair):
    out = tmp_path / "bench"
    res = run_benchmark(out, cfg=tiny_pair.cfg, methods=["npo", "ga_proj"], configs_dir=configs_dir, progress=False,
                        rouge_examples=4, seeds=2, trained=tiny_pair.trained, data=tiny_pair.data)
    saved = json.loads((out / "results.json").read_text())
    assert (out / "forget_vs_utility.png").stat().st_size > 1000
    table, per_seed = saved["table"], saved["per_seed"]
    assert list(table) == ["reference", "target", "npo", "ga_proj"] and saved["seeds"] == [0, 1]
    assert table["reference"]["forget_quality"] == 1.0
    assert [r["seed"] for r in per_seed["target"]] == [None] and table["target"]["n"] == 1
    tr = saved["forget_truth_ratios"]
    for m in ("npo", "ga_proj"):
        assert table[m]["n"] == 2 and [r["seed"] for r in per_seed[m]] == [0, 1]
        assert table[m]["forget_probability"] < table["target"]["forget_probability"]
        assert saved["method_configs"][m]["unlearn"]["steps"] == 8
        np.testing.assert_allclose(table[m]["model_utility"], np.mean([r["model_utility"] for r in per_seed[m]]))
        for i, row in enumerate(per_seed[m]):
            # forget quality is recomputable from the stored per-example truth ratios, per seed
            np.testing.assert_allclose(row["forget_quality"], ks_2samp(tr[m][i], tr["reference"][0]).pvalue)
    assert "int4_recovery" in table["npo"] and np.isfinite(table["npo"]["int4_recovery"])
    # MUSE's columns, for every model and seed, aggregated like the others
    for name in ("reference", "target", "npo", "ga_proj"):
        for row in per_seed[name] + [table[name]]:
            for key in ("knowmem_forget", "knowmem_retain", "verbmem_forget", "muse_auc"):
                assert 0.0 <= row[key] <= 1.0, (name, key, row[key])
            assert np.isfinite(row["privleak_muse"]), name
    assert table["npo"]["n"] == 2 and "privleak_muse" in table["npo"]["ci95"]
    assert table["reference"]["privleak_muse"] == 0.0  # against itself
    # the target memorised the forget passages: it continues them better than the reference, and finds
    # them likelier than the never-seen holdout passages
    assert table["target"]["verbmem_forget"] > table["reference"]["verbmem_forget"]
    assert table["target"]["muse_auc"] > table["reference"]["muse_auc"]
    assert saved["muse_eval"] == {"knowmem_max_new_tokens": 32, "verbmem_max_new_tokens": 64}
    # the probes' columns (relearning attack, overlap splits) for every model and seed
    assert saved["probes"] == ["relearn", "overlap", "remind"] and saved["probes_not_available"] == {}
    for name in ("reference", "target", "npo", "ga_proj"):
        for row in per_seed[name]:
            for key in ("relearn_p0", "relearn_p", "mixed_forget_fa", "mixed_retain_fa", "retain_shared_fa",
                        "remind_auc"):
                assert 0.0 <= row[key] <= 1.0, (name, key, row[key])
    assert np.isnan(per_seed["target"][0]["relearn_rec"])  # the target has no gap to recover
    assert per_seed["target"][0]["relearn_p0"] > per_seed["reference"][0]["relearn_p0"]
    assert all(np.isfinite(r["relearn_rec"]) for r in per_seed["npo"])
    data = tiny_pair.data  # the methods unlearned every row about the forget people, passage windows included
    assert saved["unlearning_rows"]["forget"] > len(data.dataset["forget10"]) + len(data.knowmem["forget"]["input_ids"])
    text = format_results_table(res["table"])
    assert text.splitlines()[0].split()[:4] == ["method", "n", "forget_q", "utility"] and " ± " in text
    assert text.splitlines()[0].split()[-5:] == ["KnowMem_f", "KnowMem_r", "VerbMem_f", "PrivLeak", "time_s"]
    with pytest.raises(FileExistsError):
        run_benchmark(out, cfg=tiny_pair.cfg, methods=["npo"], configs_dir=configs_dir, progress=False)
    with pytest.raises(ValueError, match="seeds must be an int >= 1"):
        run_benchmark(tmp_path / "other", cfg=tiny_pair.cfg, methods=["npo"], configs_dir=configs_dir, seeds=0)
    assert not (tmp_path / "other").exists()


_WALL_TIMES = ("seconds", "seconds_total")


def _numbers(path) -> str:
    """results.json without its wall times, as canonical JSON text (equal text == bitwise-equal floats)."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in _WALL_TIMES}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    res = strip(json.loads(path.read_text()))
    for agg in res["table"].values():  # the wall time's interval and spread are wall times too
        for k in ("ci95", "std"):
            agg[k].pop("seconds", None)
    return json.dumps(res, sort_keys=True)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_pair):
    """The same two-seed benchmark (a gradient method, a fine-tuning one, SSD) run twice."""
    root = tmp_path_factory.mktemp("repro")
    d = root / "configs"
    d.mkdir()
    (d / "npo.json").write_text(json.dumps(
        {"kind": "gradient", "batch_size": 4,
         "unlearn": {"method": "npo", "steps": 4, "learning_rate": 3e-3, "alpha": 1.0}}))
    (d / "task_vector.json").write_text(json.dumps(
        {"kind": "task_vector", "scale": 1.0, "finetune": {"steps": 4, "learning_rate": 3e-3, "batch_size": 4}}))
    (d / "ssd.json").write_text(json.dumps(
        {"kind": "ssd", "threshold": 1.0, "lam": 1.0, "importance": "fisher", "importance_batch_size": 8,
         "max_importance_examples": 16}))
    outs = [root / "a", root / "b"]
    for out in outs:
        run_benchmark(out, cfg=tiny_pair.cfg, methods=["npo", "task_vector", "ssd"], configs_dir=d, progress=False,
                      rouge_examples=2, seeds=2, trained=tiny_pair.trained, data=tiny_pair.data)
    return outs


def test_same_seeds_give_bitwise_identical_results(two_runs):
    a, b = (_numbers(out / "results.json") for out in two_runs)
    assert a == b


def test_different_seeds_give_different_per_seed_values(two_runs):
    res = json.loads((two_runs[0] / "results.json").read_text())
    assert res["seeds"] == [0, 1]
    for m in ("npo", "task_vector", "ssd"):  # batch order (npo, fine-tuning) and importance subsets (ssd)
        first, second = res["per_seed"][m]
        assert first["seed"] == 0 and second["seed"] == 1
        assert first["forget_probability"] != second["forget_probability"], m
        assert res["forget_truth_ratios"][m][0] != res["forget_truth_ratios"][m][1], m
        assert res["table"][m]["ci95"]["forget_probability"] > 0, m


def test_train_seeds_retrain_the_pair(tiny_pair, configs_dir):
    from jaxunlearn.benchmark import benchmark_methods, load_method_configs, seeded_config

    cfg = tiny_pair.cfg
    assert seeded_config(cfg, cfg.seed) == cfg
    assert seeded_config(cfg, cfg.seed + 2).train.seed == cfg.train.seed + 2
    res = benchmark_methods(cfg, load_method_configs(["npo"], configs_dir), seeds=[0, 1], train_seeds=True,
                            progress=False, rouge_examples=0, quant_schemes=(), trained=tiny_pair.trained,
                            data=tiny_pair.data)
    assert res["seeds"] == [0, 1] and res["train_seeds"] is True
    for name in ("reference", "target", "npo"):
        rows = res["per_seed"][name]
        assert [r["seed"] for r in rows] == [0, 1] and res["table"][name]["n"] == 2, name
        assert rows[0]["forget_probability"] != rows[1]["forget_probability"], name
    assert len(res["forget_truth_ratios"]["reference"]) == 2


def test_unknown_method_and_bad_config(tmp_path, configs_dir):
    with pytest.raises(ValueError, match="unknown method 'rmu'.*available: ga_proj, npo"):
        load_method_configs(["rmu"], configs_dir)
    (configs_dir / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_method_configs(["broken"], configs_dir)
    with pytest.raises(FileNotFoundError):
        load_method_configs(["npo"], tmp_path / "nowhere")


def test_shipped_configs_are_all_loadable():
    from pathlib import Path

    from jaxunlearn.benchmark import DEFAULT_METHODS, EXTRA_METHODS, default_configs_dir
    from jaxunlearn.methods import KINDS
    from jaxunlearn.unlearn import UnlearnConfig

    shipped = sorted(p.stem for p in Path(default_configs_dir()).glob("*.json"))
    assert shipped == sorted(DEFAULT_METHODS + EXTRA_METHODS)  # every shipped config is run or listed
    cfgs = load_method_configs(shipped)  # parsed and validated (unknown keys, types, ranges)
    for name, c in cfgs.items():
        assert c.kind in KINDS, name
        if c.kind == "gradient":
            assert isinstance(c.unlearn, UnlearnConfig), name


def test_to_jsonable_handles_arrays_scalars_dataclasses():
    import jax.numpy as jnp

    from jaxunlearn.eval.runner import to_jsonable

    out = to_jsonable({"a": np.arange(3), "b": np.float32(0.5), "c": (jnp.ones(2), {1: "x"}), "d": TINY.train})
    assert out == {"a": [0, 1, 2], "b": 0.5, "c": [[1.0, 1.0], {"1": "x"}], "d": json.loads(json.dumps(out["d"]))}
    assert out["d"]["steps"] == 150
    json.dumps(out)
