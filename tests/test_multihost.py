"""Two processes on loopback, 4 CPU devices each, one global 8-device mesh == one process.

Each process runs tests/multihost_worker.py: ``jaxunlearn.multihost.initialize`` on
``127.0.0.1:<free port>`` (CPU cross-process collectives: gloo, JAX 0.10's default
``jax_cpu_collectives_implementation``), a ``fsdp=4,tp=2`` mesh spanning both processes,
process-local rows of the forget / retain batches, the diagonal Fisher and one NPO +
projection AdamW step; process 0 alone writes the gathered results. This test compares
them with the same computation in this (single) process on one device.
Tolerances: Fisher rtol 1e-4; the Adam step moves each parameter by about
``lr * sign(g)``, so parameters agree to atol 1e-5 (lr = 1e-2) and losses to rtol 1e-5.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import socket
import sys

import jax
import numpy as np

import suite_background as background

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 600  # from their start, generous: they start at collection beside the other tests; alone ~30-60 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_worker():
    spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _launch(workdir):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    return [([sys.executable, str(WORKER), str(i), "2", str(port), str(workdir / "result.npz")], env)
            for i in range(2)]


BACKGROUND = {"multihost": _launch}  # started at collection (tests/suite_background.py)


def test_two_processes_match_one():
    done = background.wait("multihost", _launch, timeout=TIMEOUT_S)
    tails = "\n".join(f"--- worker {i}:\n" + "\n".join(
        line for line in log.splitlines() if not line.startswith(("[Gloo]", "W1", "I1")))[-3000:]
        for i, log in enumerate(done.logs))
    assert None not in done.codes, f"workers did not finish within {TIMEOUT_S} s of their start\n{tails}"
    assert done.codes == [0, 0], f"worker exit codes {done.codes}\n{tails}"
    out = done.workdir / "result.npz"
    got = dict(np.load(out))

    worker = _load_worker()
    _, _, forget, retain, _, _ = worker.build()
    want = worker.run(forget, retain, mesh=None)  # one process, one device
    assert jax.process_count() == 1
    assert sorted(got) == sorted(want)
    assert any(k.startswith("fisher/") for k in want) and any(k.startswith("params/") for k in want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        if k.startswith("fisher/"):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-10, err_msg=k)
        elif k.startswith("params/"):
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5, err_msg=k)
        else:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
    # the step did move the parameters (lr 1e-2 Adam: about 1e-2 per entry)
    _, params, *_ = worker.build()
    from jaxunlearn import tree as jt

    before = dict(jt.leaves_with_paths(params))
    moved = max(float(np.max(np.abs(got["params/" + p] - np.asarray(x)))) for p, x in before.items())
    assert moved > 1e-3
