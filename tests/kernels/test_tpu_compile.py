"""Every Pallas kernel and the library steps on them compile with the real XLA:TPU / Mosaic
compiler for v5e and v5p slices, on this CPU host with no TPU attached.

``make`` installs libtpu (the version jax's ``tpu`` extra names) into ``.venv/libtpu``, outside
the environment's site-packages, so ordinary CPU runs never see it (JAX would otherwise try to
start a TPU backend and log an error at every start). ``tests/tpu_compile_worker.py`` runs in a
subprocess with that directory on ``PYTHONPATH`` and ``JAX_PLATFORMS=cpu``, compiles each case
for an unattached topology (``jax.experimental.topologies.get_topology_desc``) and reports the
compiler's result per case; a configuration the compiler rejects fails here with its message.
On an 8-chip v5e slice the sharded steps compile with the kernels per shard where a
``shard_map`` is manual over every mesh axis, and with their XLA path where XLA partitions.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

import suite_background as background

ROOT = Path(__file__).resolve().parents[2]
LIBTPU_DIR = Path(os.environ.get("JAXUNLEARN_LIBTPU_DIR", ROOT / ".venv" / "libtpu"))
WORKER = ROOT / "tests" / "tpu_compile_worker.py"


def _launch(workdir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(LIBTPU_DIR), str(ROOT), str(ROOT / "tests")])}
    return [([sys.executable, str(WORKER), str(workdir / "rows.json")], env)]


BACKGROUND = {"tpu_compile": _launch}  # started at collection (tests/suite_background.py)


@pytest.fixture(scope="module")
def compiled():
    assert (LIBTPU_DIR / "libtpu").is_dir(), (
        f"libtpu is not installed in {LIBTPU_DIR}: make test installs it there (or set JAXUNLEARN_LIBTPU_DIR)")
    done = background.wait("tpu_compile", _launch, timeout=900)
    assert done.codes == [0], f"the TPU compile worker failed ({done.codes}):\n{done.logs[0][-4000:]}"
    return json.loads((done.workdir / "rows.json").read_text())


def test_libtpu_is_not_on_the_ordinary_path():
    # an importable libtpu makes every CPU run of JAX try to start a TPU backend
    assert importlib.util.find_spec("libtpu") is None


def test_every_case_compiles_for_v5e_and_v5p_in_both_dtypes(compiled):
    rejected = [f"{r['topology']} {r['dtype']} {r['case']}: {r['error']}" for r in compiled if not r["ok"]]
    assert not rejected, "the TPU compiler rejected:\n" + "\n".join(rejected)
    assert {(r["topology"], r["dtype"]) for r in compiled} == {
        (t, d) for t in ("v5e:2x2", "v5p:2x2x1") for d in ("float32", "bfloat16")} | {("v5e:2x4", "bfloat16")}


def test_sharded_steps_use_kernels_per_shard_and_xla_where_xla_partitions(compiled):
    # the bug this guards: with kernels "auto", Mosaic refused the unlearning step and the fused
    # Fisher on a sharded slice ("Mosaic kernels cannot be automatically partitioned")
    rows = [r for r in compiled if r["topology"] == "v5e:2x4"]
    assert len(rows) == 6, [r["case"] for r in rows]
    for r in rows:  # the expected calls of compile_cases.sharded_cases: 0 where XLA partitions
        assert r["ok"] and (r["calls"] == r["expected"] if r["expected"] is not None else r["calls"] >= 2), r


def test_auto_dispatch_compiles_to_mosaic_kernels(compiled):
    for r in compiled:
        where = f"{r['topology']} {r['dtype']} {r['case']}"
        if r["expected"] is not None:  # one kernel call per kernel; one per dense layer in the Fisher step
            assert r["calls"] == r["expected"], where
        else:  # project_tree and the unlearning step: a Gram and a subtract call per large leaf
            assert r["calls"] >= 2, where
