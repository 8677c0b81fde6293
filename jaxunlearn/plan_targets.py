"""Targets of :func:`jaxunlearn.plan.plan`: chips, slices, and where their compilers live.

- ``"v5e:8x8"``, ``"v5p:4x4x4"``, ``"v6e:4x4"``: TPU slices, compiled by libtpu's XLA:TPU for an
  unattached topology; libtpu lives off the import path (:func:`libtpu_dir`).
- ``"h100:8"``, ``"a100:16"``: NVIDIA GPUs (up to 8 per host: ``n`` <= 8 or a multiple of 8),
  compiled by XLA:GPU (Triton, ptxas) with no GPU attached, through the CUDA PJRT plugin kept
  off the import path (:func:`cuda_dir`) and the chip's ``GpuTargetConfigProto``
  (``jaxunlearn/gpu_targets``, from XLA's specs).
- ``"cpu:N"``: ``N`` forced host CPU devices, an estimate for other accelerators.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

__all__ = ["GiB", "Chip", "CHIPS", "TPU_TOPOLOGIES", "GPU_TARGET_CONFIGS", "Target", "parse_target", "libtpu_dir",
           "cuda_dir", "gpu_target_config"]

GiB = 1024**3



@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's datasheet numbers: HBM bytes, peak dense bf16 FLOP/s, HBM bytes/s, source."""

    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bandwidth: float
    source: str


CHIPS: dict[str, Chip] = {
    "v5e": Chip(16 * GiB, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e (16 GiB HBM2, 197 TFLOP/s bf16, 819 GB/s)"),
    "v5p": Chip(95 * GiB, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p (95 GiB HBM2e, 459 TFLOP/s bf16, 2765 GB/s)"),
    "v6e": Chip(32 * GiB, 918e12, 1640e9, "https://cloud.google.com/tpu/docs/v6e (32 GiB HBM, 918 TFLOP/s bf16, 1640 GB/s)"),
    "h100": Chip(80 * GiB, 989e12, 3.35e12,
                 "https://www.nvidia.com/en-us/data-center/h100/ (SXM: 80 GB HBM3, 989 TFLOP/s dense bf16, 3.35 TB/s)"),
    "a100": Chip(80 * GiB, 312e12, 2.039e12,
                 "https://www.nvidia.com/en-us/data-center/a100/ (SXM 80 GB: HBM2e, 312 TFLOP/s dense bf16, 2.039 TB/s)"),
    "h200": Chip(141 * GiB, 989e12, 4.8e12,
                 "https://www.nvidia.com/en-us/data-center/h200/ (SXM: 141 GB HBM3e, 989 TFLOP/s dense bf16, 4.8 TB/s)"),
}
"""Datasheet numbers per chip (dense, not sparse, bf16 FLOP/s). GPU memory is taken as GiB (an
"80 GB" H100 reports 79.6 GiB to nvidia-smi): leave a few percent for the runtime."""

TPU_TOPOLOGIES: dict[str, tuple[str, ...]] = {
    "v5e": ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "v5p": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"),
    "v6e": ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
}
"""Slice shapes :func:`smallest_slice` tries, smallest first (chips = the product, v5p counts chips)."""

GPU_TARGET_CONFIGS: dict[str, str] = {"h100": "h100_sxm.txtpb", "a100": "a100_sxm_80.txtpb"}
"""GPU chips the planner compiles for: their ``GpuTargetConfigProto`` files in ``jaxunlearn/gpu_targets``."""
GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed target: ``platform`` ``"tpu"``, ``"cuda"`` or ``"cpu"``, ``num_devices``, ``chip`` and
    ``topology`` (TPU: ``"8x8"``; GPU: ``"1x<hosts>x<per host>"``)."""

    name: str
    platform: str
    num_devices: int
    chip: str | None = None
    topology: str | None = None


def parse_target(target: str) -> Target:
    """``"v5e:8x8"`` / ``"v5p:2x2x4"`` / ``"v6e:4x4"`` (TPU chip and slice shape), ``"h100:8"`` /
    ``"a100:16"`` (GPU chip and count) or ``"cpu:N"``.

    Raises:
      ValueError: an unknown chip, a malformed shape or count (the message lists the forms).
    """
    forms = (f"'cpu:N', '<tpu>:<shape>' with <tpu> in {tuple(TPU_TOPOLOGIES)} (e.g. 'v5e:8x8', 'v5p:2x2x4') or "
             f"'<gpu>:N' with <gpu> in {tuple(GPU_TARGET_CONFIGS)} (e.g. 'h100:8')")
    if not isinstance(target, str) or ":" not in target:
        raise ValueError(f"unknown target {target!r}; use {forms}")
    kind, _, shape = target.strip().partition(":")
    kind = kind.lower()
    if kind == "cpu":
        if not shape.isdigit() or int(shape) < 1:
            raise ValueError(f"target {target!r}: the CPU device count must be a positive integer ('cpu:64')")
        return Target(target, "cpu", int(shape))
    if kind in GPU_TARGET_CONFIGS:
        n = int(shape) if shape.isdigit() else 0
        if n < 1 or (n > GPUS_PER_HOST and n % GPUS_PER_HOST):
            raise ValueError(f"target {target!r}: the GPU count must be 1-{GPUS_PER_HOST} or a multiple of "
                             f"{GPUS_PER_HOST} (hosts of {GPUS_PER_HOST})")
        hosts, per = (1, n) if n <= GPUS_PER_HOST else (n // GPUS_PER_HOST, GPUS_PER_HOST)
        return Target(f"{kind}:{n}", "cuda", n, kind, f"1x{hosts}x{per}")
    if kind not in TPU_TOPOLOGIES:
        raise ValueError(f"unknown target {target!r}; use {forms}")
    if not re.fullmatch(r"\d+(x\d+){1,2}", shape):
        raise ValueError(f"target {target!r}: the slice shape must look like 8x8 or 2x2x4")
    dims = [int(d) for d in shape.split("x")]
    want = 3 if kind == "v5p" else 2
    if len(dims) != want or min(dims) < 1:
        raise ValueError(f"target {target!r}: a {kind} slice shape has {want} dimensions (e.g. "
                         f"{TPU_TOPOLOGIES[kind][2]})")
    return Target(f"{kind}:{shape}", "tpu", math.prod(dims), kind, shape)


def libtpu_dir(path: str | os.PathLike | None = None) -> Path:
    """The directory holding the ``libtpu`` package for TPU compiles (never on the import path).

    ``path``, else ``$JAXUNLEARN_LIBTPU_DIR``, else ``.venv/libtpu`` of this repository.

    Raises:
      FileNotFoundError: no ``libtpu`` package there; the message gives the pip command.
    """
    if path is None:
        path = os.environ.get("JAXUNLEARN_LIBTPU_DIR") or Path(__file__).resolve().parents[1] / ".venv" / "libtpu"
    path = Path(path)
    if not (path / "libtpu").is_dir():
        try:
            import importlib.metadata as md

            pin = next(r.split(";")[0] for r in md.requires("jax") or () if r.startswith("libtpu"))
        except Exception:  # no metadata: name the package only
            pin = "libtpu"
        raise FileNotFoundError(
            f"no libtpu in {path}: TPU targets are compiled with libtpu kept off the import path; install it "
            f"with `pip install --target {path} '{pin}'` (jax's tpu extra pin) or set JAXUNLEARN_LIBTPU_DIR")
    return path


def cuda_dir(path: str | os.PathLike | None = None) -> Path:
    """The directory holding the CUDA PJRT plugin and ptxas for GPU compiles (never on the import path).

    ``path``, else ``$JAXUNLEARN_CUDA_PLUGIN_DIR``, else ``.venv/cuda`` of this repository (where
    ``make`` installs ``jax-cuda12-plugin``, ``jax-cuda12-pjrt`` and ``nvidia-cuda-nvcc-cu12``).

    Raises:
      FileNotFoundError: no plugin there; the message gives the pip command.
    """
    if path is None:
        path = os.environ.get("JAXUNLEARN_CUDA_PLUGIN_DIR") or Path(__file__).resolve().parents[1] / ".venv" / "cuda"
    path = Path(path)
    if not (path / "jax_plugins").is_dir():
        raise FileNotFoundError(
            f"no CUDA plugin in {path}: GPU targets are compiled with the plugin kept off the import path; "
            f"install it with `pip install --no-deps --target {path} jax-cuda12-plugin==<jaxlib version> "
            "jax-cuda12-pjrt==<jaxlib version> nvidia-cuda-nvcc-cu12` or set JAXUNLEARN_CUDA_PLUGIN_DIR")
    return path


def gpu_target_config(chip: str) -> str:
    """The ``GpuTargetConfigProto`` text of ``chip`` (a key of :data:`GPU_TARGET_CONFIGS`)."""
    return (Path(__file__).resolve().parent / "gpu_targets" / GPU_TARGET_CONFIGS[chip]).read_text()
