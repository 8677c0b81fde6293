"""Resumable gradient unlearning (``run_method(..., checkpoint_dir=...)``), unsharded and on a mesh.

The reference is the same run without interruption: batches are a pure function of
(seed, step), so a run stopped after a checkpoint and resumed must end with bitwise
identical parameters (``assert_array_equal``). Sharded vs unsharded runs compare with
atol 1e-6 (a different reduction order across shards).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxunlearn import sharding as sh
from jaxunlearn.checkpoint import latest_step, save_pytree
from jaxunlearn.method_configs import method_config_to_dict
from jaxunlearn.methods import UnlearnContext, context_mesh, run_method
from jaxunlearn.placement import place_batch
from jaxunlearn.runs import RUN_RECORD_FILE
from toy_lm import bigram_apply as apply
from toy_lm import bigram_params, lm_batch

V, D, T = 8, 4, 6
SPECS = {"E": P("fsdp", "tp"), "W": P("tp", "fsdp")}
CFG = {"kind": "gradient", "batch_size": 8, "retain_batch_size": 8,
       "unlearn": {"method": "npo", "steps": 10, "learning_rate": 0.05, "project": True, "retain_k": 2}}


def _data(n, seed):
    return lm_batch(n, seed, vocab=V, seq=T, prompt=2)


def _params():
    return bigram_params(V, D)


def _ctx(mesh=None, params=None):
    params = _params() if params is None else params
    if mesh is not None:
        params = jax.device_put(params, {k: NamedSharding(mesh, s) for k, s in SPECS.items()})
    return UnlearnContext(apply, params, _data(16, 1), _data(24, 2), seed=3, mesh=mesh)


class Interrupt(Exception):
    pass


def _interrupt_at(step):
    seen = []

    def cb(s, metrics):
        assert set(metrics) == {"forget_loss", "retain_loss", "update_norm"}
        seen.append(s)
        if s == step:
            raise Interrupt

    return cb, seen


def _assert_equal(a, b):
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.fixture(scope="module")
def uninterrupted():
    return run_method(_ctx(), CFG)


def test_interrupted_run_resumes_to_identical_params(uninterrupted, tmp_path):
    run = tmp_path / "run"
    cb, seen = _interrupt_at(5)
    with pytest.raises(Interrupt):
        run_method(_ctx(), CFG, checkpoint_dir=run, checkpoint_every=3, callback=cb)
    assert seen == [1, 2, 3, 4, 5] and latest_step(run) == 3
    assert json.loads((run / RUN_RECORD_FILE).read_text())["method"] == method_config_to_dict(CFG)
    cb, seen = _interrupt_at(-1)
    resumed = run_method(_ctx(), CFG, checkpoint_dir=run, checkpoint_every=3, callback=cb)
    assert seen == list(range(4, 11))  # continued after step 3, did not start over
    _assert_equal(resumed, uninterrupted)
    assert latest_step(run) == 10
    # the run moved the parameters (the comparison is not between two copies of the input)
    assert float(jnp.max(jnp.abs(resumed["W"] - _params()["W"]))) > 1e-2
    # a finished run resumes to its result without a step
    cb, seen = _interrupt_at(-1)
    _assert_equal(run_method(_ctx(), CFG, checkpoint_dir=run, callback=cb), uninterrupted)
    assert seen == []


def test_sharded_run_resumes_identically_and_keeps_shardings(uninterrupted, tmp_path):
    mesh = sh.make_mesh("fsdp=4,tp=2")
    full = run_method(_ctx(mesh), CFG)
    for k, s in SPECS.items():
        assert full[k].sharding.is_equivalent_to(NamedSharding(mesh, s), 2), (k, full[k].sharding)
        np.testing.assert_allclose(np.asarray(full[k]), np.asarray(uninterrupted[k]), atol=1e-6, rtol=0)
    run = tmp_path / "run"
    cb, _ = _interrupt_at(7)
    with pytest.raises(Interrupt):
        run_method(_ctx(mesh), CFG, checkpoint_dir=run, checkpoint_every=2, callback=cb)
    assert latest_step(run) == 6
    resumed = run_method(_ctx(mesh), CFG, checkpoint_dir=run, checkpoint_every=2)
    _assert_equal(resumed, full)
    for k, s in SPECS.items():  # restored onto the state's shardings, and kept through the steps
        assert resumed[k].sharding.is_equivalent_to(NamedSharding(mesh, s), 2), (k, resumed[k].sharding)
    # the finished run restored onto another mesh shape: the same values, that mesh's shardings
    mesh_b = sh.make_mesh("fsdp=2,tp=4")
    cb, seen = _interrupt_at(-1)
    moved = run_method(_ctx(mesh_b), CFG, checkpoint_dir=run, callback=cb)
    assert seen == []
    _assert_equal(moved, full)
    for k, s in SPECS.items():
        assert moved[k].sharding.is_equivalent_to(NamedSharding(mesh_b, s), 2), (k, moved[k].sharding)


def test_checkpoint_dir_of_another_run_is_refused(tmp_path):
    run = tmp_path / "run"
    short = {**CFG, "unlearn": {**CFG["unlearn"], "steps": 0}}  # writes the record and step 0, compiles nothing
    run_method(_ctx(), short, checkpoint_dir=run)
    assert latest_step(run) == 0
    other = {**short, "unlearn": {**short["unlearn"], "learning_rate": 0.1}}
    with pytest.raises(ValueError, match=r"'method\.unlearn\.learning_rate' is 0\.05 there but 0\.1 now"):
        run_method(_ctx(), other, checkpoint_dir=run)
    ctx = _ctx()
    ctx.forget = {k: v[::-1].copy() for k, v in ctx.forget.items()}
    with pytest.raises(ValueError, match="'forget' is"):
        run_method(ctx, short, checkpoint_dir=run)
    ctx = _ctx()
    ctx.seed = 4
    with pytest.raises(ValueError, match="'seed' is 3 there but 4 now"):
        run_method(ctx, short, checkpoint_dir=run)
    bigger = _ctx(params={"E": jnp.zeros((V, D + 1)), "W": jnp.zeros((D + 1, V))})
    with pytest.raises(ValueError, match="'num_params' is 64 there but 80 now"):
        run_method(bigger, short, checkpoint_dir=run)
    # checkpoints without a record: not an unlearning run's directory
    foreign = tmp_path / "foreign"
    save_pytree(foreign / "0" / "default", {"x": jnp.ones(2)})
    with pytest.raises(ValueError, match=f"no {RUN_RECORD_FILE}"):
        run_method(_ctx(), short, checkpoint_dir=foreign)
    with pytest.raises(ValueError, match="kind 'ssd' is not resumable"):
        run_method(_ctx(), {"kind": "ssd"}, checkpoint_dir=tmp_path / "ssd")


def test_batch_size_must_divide_over_the_data_axes():
    mesh = sh.make_mesh("fsdp=4,tp=2")
    bad = {**CFG, "batch_size": 6}
    with pytest.raises(ValueError, match=r"forget batch size 6 is not divisible by the mesh's data-parallel size 4"):
        run_method(_ctx(mesh), bad)
    with pytest.raises(ValueError, match="retain batch size 10 .* size 4"):
        run_method(_ctx(mesh), {**CFG, "retain_batch_size": 10})
    # a mesh set by jax.set_mesh is used when the context names none
    ctx = _ctx()
    assert context_mesh(ctx) is None
    with jax.set_mesh(mesh):
        assert context_mesh(ctx) is mesh
        b = place_batch(_data(8, 0), context_mesh(ctx))
    assert b["input_ids"].sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp")), 2)
    np.testing.assert_array_equal(np.asarray(b["input_ids"]), _data(8, 0)["input_ids"])
