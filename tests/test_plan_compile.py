"""The capacity planner compiled: its numbers against real allocations, and on XLA:TPU.

- The argument bytes :func:`jaxunlearn.plan.plan` reports per device (compiled for ``cpu:8`` in
  its subprocess) are within 10% of the bytes the same arrays really take on each of the 8 forced
  CPU devices of this process (``sum(shard.data.nbytes)`` of its addressable shards), for the
  unlearning step, the Fisher pass and the evaluation pass.
- With libtpu in ``.venv/libtpu``, a tiny model is planned for a v5e slice by XLA:TPU.

The parsers and the refusals of bad input, which compile nothing, are in ``test_plan.py``.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import suite_background
from jaxunlearn import plan as pl
from jaxunlearn import sharding as sh
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig
from jaxunlearn.unlearn import UnlearnConfig

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2,
                  dtype="bfloat16", param_dtype="bfloat16")
MESH, B, T = "fsdp=4,tp=2", 8, 16


TINY = dict(hidden_size=128, intermediate_size=256)
# the plans this module checks, compiled in one background job started at collection
# (tests/suite_background.py): (name, config overrides, plan keyword arguments)
PLANS = [
    ("planned", {}, dict(target="cpu:8", mesh=MESH, batch=B, seq=T, method="npo_proj", retain_k=4)),
    ("v5e", TINY, dict(target="v5e:2x2", mesh="fsdp=2,tp=2", batch=4, seq=32, passes=("eval", "unlearn"),
                       kernels="xla")),
    ("h100", TINY, dict(target="h100:8", mesh="fsdp=4,tp=2", batch=8, seq=32, passes=("eval", "unlearn"))),
    ("cpu_tiny", TINY, dict(target="cpu:8", mesh="fsdp=4,tp=2", batch=8, seq=32, passes=("eval", "unlearn"))),
]
_JOB = """
import dataclasses, json, sys
from jaxunlearn import plan as pl
from jaxunlearn.models import ModelConfig
cfg, plans, out = ModelConfig(**json.loads(sys.argv[1])), json.loads(sys.argv[2]), sys.argv[3]
res = {}
for name, over, kw in plans:
    try:
        res[name] = pl.plan(cfg.replace(**over), **kw).to_dict()
    except Exception as e:  # a missing libtpu / CUDA plugin: the test names it
        res[name] = {"exception": f"{type(e).__name__}: {e}"}
json.dump(res, open(out, "w"))
"""


def _launch(workdir):
    import dataclasses
    import os
    import sys

    return [([sys.executable, "-c", _JOB, json.dumps(dataclasses.asdict(CFG)), json.dumps(PLANS),
              str(workdir / "plans.json")], dict(os.environ))]


BACKGROUND = {"plan_compile": _launch}


@pytest.fixture(scope="module")
def plans():
    done = suite_background.wait("plan_compile", _launch, timeout=900)
    assert done.codes == [0], f"the planning job failed ({done.codes}):\n{done.logs[0][-4000:]}"
    return json.loads((done.workdir / "plans.json").read_text())


def _plan(plans, name):
    d = plans[name]
    assert "exception" not in d, d.get("exception")
    return pl.PlanResult.from_dict(d)


@pytest.fixture(scope="module")
def planned(plans):
    return _plan(plans, "planned")


def _device_bytes(*trees) -> int:
    """The most bytes any one device holds of the given (sharded) arrays."""
    per: dict = {}
    for x in jax.tree.leaves(trees):
        for shard in x.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return max(per.values())


@pytest.fixture(scope="module")
def allocated():
    fn, params = DecoderFn.of(Decoder(CFG, rngs=nnx.Rngs(0)))
    mesh = sh.make_mesh(MESH)
    params = sh.shard_params(params, mesh)
    u = UnlearnConfig(method="npo", project=True, retain_k=4).build(fn)
    state = jax.jit(u.init, out_shardings=sh.shardings_like_params(jax.eval_shape(u.init, params), params, mesh))(
        params)
    rng = np.random.default_rng(0)
    batch = sh.shard_batch({"input_ids": rng.integers(0, 128, (B, T)).astype(np.int32),
                            "attention_mask": np.ones((B, T), np.int32),
                            "loss_mask": np.ones((B, T), np.float32)}, mesh)
    acc = sh.shard_like_params(jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params), params, mesh)
    weight = sh.shard_batch({"w": np.ones((B,), np.float32)}, mesh)["w"]
    total = jax.device_put(jnp.zeros((), jnp.float32), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return {"unlearn": _device_bytes(state, batch, batch, params),
            "fisher": _device_bytes(acc, total, params, batch, weight),
            "eval": _device_bytes(params, batch)}


@pytest.mark.parametrize("name", pl.PASSES)
def test_planned_argument_bytes_match_real_allocations(planned, allocated, name):
    p = planned.passes[name]
    assert p.error is None
    assert p.argument_bytes == pytest.approx(allocated[name], rel=0.10)
    assert p.peak_bytes >= p.argument_bytes - p.alias_bytes
    assert p.flops > 0 and p.bytes_accessed > 0
    assert p.roofline_seconds is None  # CPU targets give no time bound


def test_plan_reports_the_collectives_of_a_sharded_step(planned):
    coll = planned.passes["unlearn"].collectives
    assert coll.get("all-gather", {}).get("count", 0) > 0  # FSDP gathers the parameters
    assert all(c["wire_bytes"] >= 0 and c["operand_bytes"] > 0 for c in coll.values())
    assert planned.fits["v5e"] and planned.num_params == sum(
        math.prod(x.shape) for x in jax.tree.leaves(nnx.state(nnx.eval_shape(
            lambda: Decoder(CFG, rngs=nnx.Rngs(0))), nnx.Param)))
    text = planned.format()
    assert "unlearn" in text and "estimate" in text
    assert pl.PlanResult.from_dict(json.loads(json.dumps(planned.to_dict()))) == planned  # a --json file read back


# ---------------------------------------------------------------- XLA:TPU


def test_a_tiny_model_plans_on_a_v5e_slice_with_xla_tpu(plans):
    pl.libtpu_dir()  # make installs libtpu into .venv/libtpu; missing, this names how to install it
    r = _plan(plans, "v5e")
    for p in r.passes.values():
        assert p.error is None, p.error
        assert p.roofline_seconds > 0 and p.flops > 0
        assert p.collectives  # a sharded program communicates
    assert r.fits["v5e"] and "not a measurement" in r.note


# ---------------------------------------------------------------- XLA:GPU, no GPU attached


def test_gpu_targets_parse():
    t = pl.parse_target("h100:16")
    assert (t.platform, t.chip, t.num_devices, t.topology) == ("cuda", "h100", 16, "1x2x8")
    assert pl.parse_target("a100:4").topology == "1x1x4"
    for bad in ("h100:12", "h100:0", "h100:x"):
        with pytest.raises(ValueError, match="GPU count"):
            pl.parse_target(bad)


def test_a_tiny_model_plans_on_eight_h100s_with_xla_gpu(plans):
    pl.cuda_dir()  # make installs the CUDA plugin into .venv/cuda; missing, this names how to install it
    r, cpu = _plan(plans, "h100"), _plan(plans, "cpu_tiny")
    for name, p in r.passes.items():
        assert p.error is None, p.error
        assert p.collectives  # a sharded program communicates
        assert p.roofline_seconds is None and p.flops == 0  # no cost analysis without a device
        # the same arguments per device as on 8 CPU devices (the shardings are the same)
        assert p.argument_bytes == cpu.passes[name].argument_bytes
    assert r.fits["h100"] and "XLA:GPU" in r.note
