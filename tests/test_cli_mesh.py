"""``--mesh`` on the command line: sharded runs give the unsharded results; bad specs are named.

References: the same command without ``--mesh`` (one device). Tolerances: unlearned
weights atol 1e-5 (three SGD steps of NPO with projection; shards change the reduction
order only), evaluation probabilities rtol 1e-5.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxunlearn import sharding as sh
from jaxunlearn.checkpoint import latest_step
from jaxunlearn.cli import main
from jaxunlearn.data import save_benchmark
from jaxunlearn.models import Decoder, save_pretrained
from jaxunlearn.pipeline import DemoConfig, model_config_for, prepare_data, train_pair, training_sets
from jaxunlearn.train import Stream, TrainConfig, train

# tests/test_cli.py's TINY with one block and a few training steps: the weights need not memorise
# anything to compare a sharded run with an unsharded one, and compiles dominate the test time.
TINY = DemoConfig(num_people=10, num_general=10, vocab_size=200, hidden_size=32, intermediate_size=64,
                  num_layers=1, num_heads=2, num_kv_heads=1,
                  train=TrainConfig(steps=3, batch_size=16, learning_rate=1e-2, warmup_steps=1))
NPO_PROJ = {"kind": "gradient", "batch_size": 8, "retain_batch_size": 8,
            "unlearn": {"method": "npo", "steps": 3, "optimizer": "sgd", "learning_rate": 0.05, "project": True,
                        "retain_k": 2}}


@pytest.fixture(scope="module")
def prepared():
    return prepare_data(TINY)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, prepared):
    """The layout `jaxunlearn demo` writes (data, target model); the target is left at its random
    initialisation: comparing sharded with unsharded runs needs no trained weights."""
    out = tmp_path_factory.mktemp("cli_mesh") / "demo"
    save_benchmark(out / "data", prepared.dataset, prepared.tokenizer)
    model = Decoder(model_config_for(TINY, prepared.tokenizer, prepared.max_length), rngs=nnx.Rngs(0))
    save_pretrained(model, out / "models" / "target", tokenizer=prepared.tokenizer)
    return out


def _unlearn_args(demo_dir, cfg_path, out, *extra):
    return ["unlearn", "--model", str(demo_dir / "models" / "target"), "--data", str(demo_dir / "data"),
            "--forget", "forget10", "--retain", "retain90", "--method", "npo_proj", "--config", str(cfg_path),
            "--out", str(out), *extra]


def test_unlearn_on_a_mesh_matches_one_device(demo_dir, tmp_path, capsys):
    cfg = tmp_path / "npo_proj.json"
    cfg.write_text(json.dumps(NPO_PROJ))
    assert main(_unlearn_args(demo_dir, cfg, tmp_path / "single")) == 0
    run = tmp_path / "run"
    assert main(_unlearn_args(demo_dir, cfg, tmp_path / "mesh", "--mesh", "fsdp=4,tp=2", "--resume-dir", str(run),
                              "--checkpoint-every", "2")) == 0
    assert "on mesh {'fsdp': 4, 'tp': 2}" in capsys.readouterr().out
    assert latest_step(run) == 3
    single = load_file(tmp_path / "single" / "model.safetensors")
    mesh = load_file(tmp_path / "mesh" / "model.safetensors")
    target = load_file(demo_dir / "models" / "target" / "model.safetensors")
    assert sorted(single) == sorted(mesh)
    for k in single:
        assert mesh[k].dtype == single[k].dtype, k
        np.testing.assert_allclose(mesh[k], single[k], atol=1e-5, rtol=0, err_msg=k)
    assert max(float(np.max(np.abs(single[k] - target[k]))) for k in single) > 1e-3  # the run changed weights
    # the finished run resumes from its last checkpoint to the same weights
    assert main(_unlearn_args(demo_dir, cfg, tmp_path / "mesh", "--mesh", "fsdp=2,tp=4", "--resume-dir", str(run),
                              "--overwrite")) == 0
    again = load_file(tmp_path / "mesh" / "model.safetensors")
    for k in single:
        np.testing.assert_allclose(again[k], single[k], atol=1e-5, rtol=0, err_msg=k)
    # the run directory belongs to this config: another learning rate is refused, naming the key
    cfg.write_text(json.dumps({**NPO_PROJ, "unlearn": {**NPO_PROJ["unlearn"], "learning_rate": 0.1}}))
    capsys.readouterr()
    assert main(_unlearn_args(demo_dir, cfg, tmp_path / "other", "--resume-dir", str(run))) == 2
    assert "'method.unlearn.learning_rate' is 0.05 there but 0.1 now" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_eval_on_a_mesh_matches_one_device(demo_dir, tmp_path):
    args = ["eval", "--model", str(demo_dir / "models" / "target"), "--data", str(demo_dir / "data"),
            "--forget", "forget10", "--rouge-examples", "0"]
    assert main([*args, "--out", str(tmp_path / "a.json")]) == 0
    assert main([*args, "--mesh", "fsdp=-1", "--out", str(tmp_path / "b.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    for key in ("probability", "truth_ratio"):
        np.testing.assert_allclose(b["aggregates"]["forget"][key], a["aggregates"]["forget"][key], rtol=1e-5,
                                   err_msg=key)
        np.testing.assert_allclose(b["splits"]["forget10"][key], a["splits"]["forget10"][key], rtol=1e-5,
                                   err_msg=key)  # per example


def test_demo_models_are_sharded_under_the_mesh(prepared):
    cfg = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, steps=2))
    mesh = sh.make_mesh("fsdp=4,tp=2")
    with jax.set_mesh(mesh):  # what `jaxunlearn demo --mesh` does around the demo
        got = train_pair(cfg, prepared, progress=False)
    # reference: the target trained on one device (the same init, data -- QA rows and passages -- and steps)
    qa, passages = training_sets(prepared)["target"]
    ref, _ = train(Decoder(model_config_for(cfg, prepared.tokenizer, prepared.max_length), rngs=nnx.Rngs(cfg.seed)),
                   qa, cfg.train, progress=False,
                   streams=[Stream(passages, min(cfg.passage_batch_size, len(passages["input_ids"])))])
    ref = jax.tree.leaves(nnx.state(ref, nnx.Param))
    for name in ("target", "reference"):
        p = nnx.state(got[name][0], nnx.Param)
        want = jax.tree.leaves(sh.param_shardings(p, mesh))
        for i, ((path, x), s) in enumerate(zip(jax.tree_util.tree_leaves_with_path(p), want)):
            assert x.sharding.is_equivalent_to(s, x.ndim), (name, path, x.sharding, s)
            if name == "target":
                np.testing.assert_allclose(np.asarray(x), np.asarray(ref[i]), atol=1e-5, rtol=0, err_msg=str(path))


def test_bad_mesh_and_batch_are_named(demo_dir, tmp_path, capsys):
    cfg = tmp_path / "npo_proj.json"
    cfg.write_text(json.dumps(NPO_PROJ))
    n = len(jax.devices())
    assert main(_unlearn_args(demo_dir, cfg, tmp_path / "x", "--mesh", "fsdp=3")) == 2
    err = capsys.readouterr().err
    assert "jaxunlearn unlearn: error: mesh spec 'fsdp=3'" in err and f"{n} devices" in err
    assert main(["eval", "--model", "m", "--data", "d", "--forget", "f", "--out", str(tmp_path / "e.json"),
                 "--mesh", "fsdp=2,tp=2"]) == 2
    assert "mesh spec 'fsdp=2,tp=2' has 4 devices in all" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "d"), "--mesh", "pp=8"]) == 2
    assert "unknown axis 'pp'" in capsys.readouterr().err
    cfg.write_text(json.dumps({**NPO_PROJ, "batch_size": 6}))
    assert main(_unlearn_args(demo_dir, cfg, tmp_path / "x", "--mesh", "fsdp=4,tp=2")) == 2
    assert "forget batch size 6 is not divisible by the mesh's data-parallel size 4" in capsys.readouterr().err
    assert main(_unlearn_args(demo_dir, cfg, tmp_path / "x", "--checkpoint-every", "2")) == 2
    assert "--checkpoint-every needs --resume-dir" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "d").exists()


def test_train_on_a_mesh_matches_one_device(demo_dir, tmp_path, capsys):
    args = ["train", "--model", str(demo_dir / "models" / "target"), "--data", str(demo_dir / "data"),
            "--splits", "retain90", "general", "--steps", "3", "--batch-size", "8", "--learning-rate", "1e-2",
            "--warmup-steps", "1", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    assert main([*args, "--out", str(tmp_path / "mesh"), "--mesh", "fsdp=4,tp=2"]) == 0
    assert "trained on retain90+general" in capsys.readouterr().out
    single = load_file(tmp_path / "single" / "model.safetensors")
    mesh = load_file(tmp_path / "mesh" / "model.safetensors")
    target = load_file(demo_dir / "models" / "target" / "model.safetensors")
    for k in single:
        np.testing.assert_allclose(mesh[k], single[k], atol=1e-5, rtol=0, err_msg=k)
    assert max(float(np.max(np.abs(single[k] - target[k]))) for k in single) > 1e-3  # training moved the weights
