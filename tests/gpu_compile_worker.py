"""Compile every Pallas kernel and the library steps on them for NVIDIA GPUs that are not attached.

Run by ``tests/kernels/test_gpu_compile.py`` in a subprocess whose ``PYTHONPATH`` holds the CUDA
PJRT plugin and ptxas (installed by ``make`` into ``.venv/cuda``, outside the environment ordinary
runs use, so a CPU run never starts looking for a GPU) and with ``JAX_PLATFORMS=cpu`` (which also
keeps the plugin from checking for a CUDA driver, which a host without a GPU lacks, and refusing
to register). ``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...,
topology="1x1x<n>")`` gives ``n`` compile-only devices of the GPU the ``GpuTargetConfigProto``
text in ``jaxunlearn/gpu_targets`` describes, and ``jax.jit(f).lower(ShapeDtypeStructs on those
devices).compile()`` runs the real XLA:GPU compiler with no device (XLA logs "Found GPU target
config and no PjRtClient. Performing a deviceless compilation."): Triton (the Pallas kernels
and XLA's own fusions) to PTX for the target's ``sm_XX``, then ptxas to a cubin; autotuning,
which needs the device, is skipped. On an 8-GPU host the sharded steps compile too: kernels
where they run per shard, their XLA path where XLA partitions the program. One JSON object per
case goes to the file named by argv[1]:
``{"case", "target", "dtype", "expected", "ok", "calls", "temp_bytes", "error", "seconds"}``
(``calls``: Triton kernel calls in the compiled program), and ``"refusal"`` (the message
expected) on a case the compiler must refuse. The library and sharded cases are shared with the
TPU worker (``compile_cases.py``).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding

from compile_cases import compile_case, fisher_kernel_cases, library_cases, place, sharded_cases
from jaxunlearn.kernels import projection as kp
from jaxunlearn.plan_targets import GPU_TARGET_CONFIGS, gpu_target_config

TARGETS = tuple(GPU_TARGET_CONFIGS)
DTYPES = ("float32", "bfloat16")
# the library steps (the same kernels inside larger XLA programs, seconds each to compile) on one
# target: what differs between GPU generations is the Triton code of the kernels, compiled for each
LIBRARY_TARGET = "h100"
TRITON_CALL = 'custom_call_target="__gpu$xla.gpu.triton"'
RETAIN_K = 16  # the smallest k whose projection passes run as Triton kernels on GPU
SHARDED_DEVICES = 8


def topology(target: str, n: int = 1):
    """``n`` compile-only devices of ``target`` on one host."""
    return topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(target), topology=f"1x1x{n}")


def _triton_k(k: int) -> int:
    """Kernel calls of one projection pass under ``impl="auto"`` on GPU: Triton's ``tl.dot`` needs
    a power of two >= 16, else the XLA path (kernels/projection.py)."""
    return int(k >= 16 and k & (k - 1) == 0)


def _cases(dtype):
    """(name, fn, [(shape, dtype), ...], expected Triton calls) for one dtype."""
    dt = jnp.dtype(dtype)
    f32 = jnp.dtype(jnp.float32)
    yield from fisher_kernel_cases(dtype)
    for k in (4, 32):  # the smallest and largest k; the odd P pads
        for P in (3 * 8192, 20001):
            n = _triton_k(k)
            yield (f"gram_and_dots k={k} P={P}", lambda R, g: kp.gram_and_dots(R, g), [((k, P), dt), ((P,), dt)], n)
            yield (f"subtract k={k} P={P}", lambda g, R, c: kp.subtract(g, R, c), [((P,), dt), ((k, P), dt), ((k,), f32)], n)


def _refused_cases():
    """A configuration the compiler must refuse: the Gram's ``tl.dot`` tiles at k = 32 and an
    explicit block of 2048 ask Triton for 256 KiB of shared memory (A100: 163 KiB per block, H100:
    227 KiB). That XLA checks it against the target config, with no device, is what makes a
    passing compile here mean something for block sizes."""
    yield ("gram_and_dots k=32 block_p=2048 (over shared memory)",
           lambda R, g: kp.gram_and_dots(R, g, impl="pallas", block_p=2048),
           [((32, 3 * 8192), jnp.float32), ((3 * 8192,), jnp.float32)], "Shared memory size limit exceeded")


def _row(name, target, dtype, fn, args, expected):
    return compile_case({"case": name, "target": target, "dtype": dtype, "expected": expected}, fn, args,
                        TRITON_CALL)


def main(out: str) -> None:
    rows = []
    for target in TARGETS:
        sharding = SingleDeviceSharding(topology(target).devices[0])
        for dtype in DTYPES:
            for name, fn, specs, expected in _cases(dtype):
                args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in specs]
                rows.append(_row(name, target, dtype, fn, args, expected))
            if dtype == "float32":
                for name, fn, specs, refusal in _refused_cases():
                    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in specs]
                    rows.append(_row(name, target, dtype, fn, args, None) | {"refusal": refusal})
            if target != LIBRARY_TARGET or dtype != "bfloat16":  # the library steps: once (the TPU worker
                continue                                          # compiles them in both dtypes)
            for name, fn, args, expected in library_cases(dtype, RETAIN_K):
                rows.append(_row(name, target, dtype, fn, place(args, sharding), expected))
    devices = topology("h100", SHARDED_DEVICES).devices
    for name, fn, args, expected in sharded_cases(devices, RETAIN_K):
        rows.append(_row(name, f"h100x{SHARDED_DEVICES}", "bfloat16", fn, args, expected))
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
