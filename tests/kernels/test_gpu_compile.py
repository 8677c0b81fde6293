"""Every Pallas kernel and the library steps on them compile with the real XLA:GPU / Triton
compiler and ptxas for H100 (sm_90a) and A100 (sm_80), on this CPU host with no GPU attached.

``make`` installs the CUDA PJRT plugin (``jax-cuda12-plugin`` and ``jax-cuda12-pjrt``, the
version of jax's own ``cuda12`` extra) and ptxas (``nvidia-cuda-nvcc-cu12``) into ``.venv/cuda``,
outside the environment's site-packages, so ordinary CPU runs never see it (JAX would otherwise
register a CUDA backend, look for a driver and log an error at every start). None of the other
CUDA libraries (cuBLAS, cuDNN, NCCL, ...) is needed to compile. ``tests/gpu_compile_worker.py``
runs in a subprocess with that directory on ``PYTHONPATH`` and ``JAX_PLATFORMS=cpu`` (with which
the plugin registers without a driver), compiles each case for compile-only devices described by
a ``GpuTargetConfigProto`` (``jaxunlearn/gpu_targets``) and reports the compiler's result per case; a
configuration the compiler rejects fails here with its message. The kernels compile for both targets in both
dtypes, the library steps (fused Fisher, projection, NPO step) for H100 in bfloat16 (the TPU test compiles
them in both dtypes). On 8 H100s the sharded steps
compile with the kernels per shard where a ``shard_map`` is manual over every mesh axis, and
with their XLA path where XLA partitions. Compiling is not running: numerics on a GPU are
checked only where one is attached.
"""

import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

import suite_background as background

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = Path(os.environ.get("JAXUNLEARN_CUDA_PLUGIN_DIR", ROOT / ".venv" / "cuda"))
WORKER = ROOT / "tests" / "gpu_compile_worker.py"
TARGETS = ("h100", "a100")


def _launch(workdir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(CUDA_DIR), str(ROOT), str(ROOT / "tests")])}
    return [([sys.executable, str(WORKER), str(workdir / "rows.json")], env)]


BACKGROUND = {"gpu_compile": _launch}  # started at collection (tests/suite_background.py)


@pytest.fixture(scope="module")
def compiled():
    assert (CUDA_DIR / "jax_plugins").is_dir() and (CUDA_DIR / "nvidia" / "cuda_nvcc" / "bin" / "ptxas").is_file(), (
        f"the CUDA plugin and ptxas are not installed in {CUDA_DIR}: make test installs them there "
        "(or set JAXUNLEARN_CUDA_PLUGIN_DIR)")
    done = background.wait("gpu_compile", _launch, timeout=900)
    assert done.codes == [0], f"the GPU compile worker failed ({done.codes}):\n{done.logs[0][-4000:]}"
    return json.loads((done.workdir / "rows.json").read_text())


def test_the_cuda_plugin_is_not_on_the_ordinary_path():
    # a visible CUDA plugin makes every CPU run of JAX register a CUDA backend and look for a driver
    assert importlib.util.find_spec("jax_cuda12_plugin") is None
    assert not [e.name for e in importlib.metadata.entry_points(group="jax_plugins") if "cuda" in e.name]


def test_every_case_compiles_for_h100_and_a100_in_both_dtypes(compiled):
    rejected = [f"{r['target']} {r['dtype']} {r['case']}: {r['error']}" for r in compiled
                if not r["ok"] and "refusal" not in r]
    assert not rejected, "the GPU compiler rejected:\n" + "\n".join(rejected)
    assert {(r["target"], r["dtype"]) for r in compiled} == {
        (t, d) for t in TARGETS for d in ("float32", "bfloat16")} | {("h100x8", "bfloat16")}


def test_sharded_steps_use_kernels_per_shard_and_xla_where_xla_partitions(compiled):
    # a Triton call in a program XLA partitions would be replicated (every input gathered onto
    # every GPU): there the XLA path is lowered, and the kernels run per shard under shard_map
    rows = [r for r in compiled if r["target"] == "h100x8"]
    assert len(rows) == 6, [r["case"] for r in rows]
    for r in rows:  # the expected calls of compile_cases.sharded_cases: 0 where XLA partitions
        assert r["ok"] and (r["calls"] == r["expected"] if r["expected"] is not None else r["calls"] >= 2), r


def test_a_kernel_over_the_targets_shared_memory_is_refused(compiled):
    # the compiler checks each Triton kernel's shared memory against the target config, with no
    # device: the kind of failure the first H200 run had (256 KiB asked, 227 KiB there) fails here
    refused = [r for r in compiled if "refusal" in r]
    assert {r["target"] for r in refused} == set(TARGETS)
    for r in refused:
        assert not r["ok"] and r["refusal"] in r["error"], f"{r['target']} {r['case']}: {r.get('error')}"


def test_auto_dispatch_compiles_to_triton_kernels(compiled):
    for r in compiled:
        if "refusal" in r:
            continue
        where = f"{r['target']} {r['dtype']} {r['case']}"
        if r["expected"] is not None:  # one call per kernel (0 where k does not suit tl.dot); one per dense layer
            assert r["calls"] == r["expected"], where
        else:  # project_tree and the unlearning step: a Gram and a subtract call per large leaf
            assert r["calls"] >= 2, where
