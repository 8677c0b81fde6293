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
                        rouge_examples=4, trained=tiny_pair.trained, data=tiny_pair.data)
    saved = json.loads((out / "results.json").read_text())
    assert (out / "forget_vs_utility.png").stat().st_size > 1000
    table = saved["table"]
    assert list(table) == ["reference", "target", "npo", "ga_proj"]
    assert table["reference"]["forget_quality"] == 1.0
    for m in ("npo", "ga_proj"):
        assert table[m]["forget_probability"] < table["target"]["forget_probability"]
        assert saved["method_configs"][m]["unlearn"]["steps"] == 8
        # forget quality is recomputable from the stored per-example truth ratios
        tr = saved["forget_truth_ratios"]
        np.testing.assert_allclose(table[m]["forget_quality"], ks_2samp(tr[m], tr["reference"]).pvalue)
    assert "int4_recovery" in table["npo"] and np.isfinite(table["npo"]["int4_recovery"])
    text = format_results_table(res["table"])
    assert text.splitlines()[0].split()[:3] == ["method", "forget_q", "utility"]
    with pytest.raises(FileExistsError):
        run_benchmark(out, cfg=tiny_pair.cfg, methods=["npo"], configs_dir=configs_dir, progress=False)


def test_unknown_method_and_bad_config(tmp_path, configs_dir):
    with pytest.raises(ValueError, match="unknown method 'rmu'.*available: ga_proj, npo"):
        load_method_configs(["rmu"], configs_dir)
    (configs_dir / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_method_configs(["broken"], configs_dir)
    with pytest.raises(FileNotFoundError):
        load_method_configs(["npo"], tmp_path / "nowhere")


def test_shipped_configs_are_all_loadable():
    from jaxunlearn.benchmark import DEFAULT_METHODS
    from jaxunlearn.methods import KINDS
    from jaxunlearn.unlearn import UnlearnConfig

    cfgs = load_method_configs(DEFAULT_METHODS)  # parsed and validated (unknown keys, types, ranges)
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
