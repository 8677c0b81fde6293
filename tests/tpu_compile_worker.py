"""Compile every Pallas kernel and the library steps on them for unattached TPU topologies.

Run by ``tests/kernels/test_tpu_compile.py`` in a subprocess whose ``PYTHONPATH`` holds libtpu
(installed by ``make`` into ``.venv/libtpu``, outside the environment ordinary runs use, so a
CPU run never starts looking for a TPU) and with ``JAX_PLATFORMS=cpu``:
``jax.experimental.topologies.get_topology_desc`` gives the devices of a TPU slice that is not
attached, and ``jax.jit(f).lower(ShapeDtypeStructs on those devices).compile()`` runs the real
XLA:TPU compiler, Mosaic included. On an 8-chip slice the sharded steps compile too: kernels
where they run per shard, their XLA path where XLA partitions the program. One JSON object per case goes to the file named by argv[1]:
``{"case", "topology", "dtype", "expected", "ok", "calls", "temp_bytes", "seconds", "error"}``
(``calls``: Mosaic kernel calls in the compiled program). The library and sharded cases are
shared with the GPU worker (``compile_cases.py``).
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

TOPOLOGIES = ("v5e:2x2", "v5p:2x2x1")
SHARDED_TOPOLOGY = "v5e:2x4"
DTYPES = ("float32", "bfloat16")
RETAIN_K = 4
MOSAIC_CALL = 'custom_call_target="tpu_custom_call"'


def _cases(dtype):
    """(name, fn, [(shape, dtype), ...], expected Mosaic calls) for one dtype."""
    dt = jnp.dtype(dtype)
    f32 = jnp.dtype(jnp.float32)
    yield from fisher_kernel_cases(dtype)
    for k in (1, 16):  # the smallest and largest k; the odd P pads
        for P in (3 * 8192, 20001):
            yield (f"gram_and_dots k={k} P={P}", lambda R, g: kp.gram_and_dots(R, g), [((k, P), dt), ((P,), dt)], 1)
            yield (f"subtract k={k} P={P}", lambda g, R, c: kp.subtract(g, R, c), [((P,), dt), ((k, P), dt), ((k,), f32)], 1)


def _row(name, topology, dtype, fn, args, expected):
    return compile_case({"case": name, "topology": topology, "dtype": dtype, "expected": expected}, fn, args,
                        MOSAIC_CALL)


def main(out: str) -> None:
    rows = []
    for topology in TOPOLOGIES:
        sharding = SingleDeviceSharding(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0])
        for dtype in DTYPES:
            for name, fn, specs, expected in _cases(dtype):
                args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in specs]
                rows.append(_row(name, topology, dtype, fn, args, expected))
            for name, fn, args, expected in library_cases(dtype, RETAIN_K):
                rows.append(_row(name, topology, dtype, fn, place(args, sharding), expected))
    devices = topologies.get_topology_desc(platform="tpu", topology_name=SHARDED_TOPOLOGY).devices
    for name, fn, args, expected in sharded_cases(devices, RETAIN_K):
        rows.append(_row(name, SHARDED_TOPOLOGY, "bfloat16", fn, args, expected))
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
