"""Capacity planning: will an unlearning run fit a slice, before renting it?

:func:`plan` compiles, ahead of time and from abstract shapes only (no weights are created or
read), the three passes of a TOFU-style run on the devices of a target:

- ``"unlearn"``: one unlearning step (:class:`jaxunlearn.unlearn.UnlearnConfig` with
  ``method``, e.g. NPO with the orthogonal projection over ``retain_k`` retain gradients),
  AdamW state and the frozen reference included, state donated;
- ``"fisher"``: one batch of the fused diagonal-Fisher accumulation
  (:func:`jaxunlearn.reduction.accumulate` with the decoder's fused local sums);
- ``"eval"``: the teacher-forced evaluation forward pass (logits and per-example answer
  statistics, :func:`jaxunlearn.eval.metrics.answer_stats`).

Each pass is a ``jax.jit`` with the in/out shardings of :mod:`jaxunlearn.sharding`'s partition
rules over the mesh, lowered with ``jax.ShapeDtypeStruct`` s and compiled. Per device, it reports
the argument, output, aliased and temporary bytes of ``compiled.memory_analysis()`` (the peak is
``argument + output - alias + temp``), the FLOPs and bytes accessed of
``compiled.cost_analysis()``, and the bytes each collective of the compiled HLO moves
(:func:`parse_collectives`); whether the peak fits the HBM of each chip of :data:`CHIPS`; and, for
TPU targets, a roofline lower bound on the step time, ``max(flops / peak bf16 FLOP/s,
bytes accessed / HBM bandwidth)``: a bound, not a measurement (it ignores collectives, latency
and imperfect overlap; a real step is slower).

Targets:

- ``"v5e:8x8"``, ``"v5p:4x4x4"``, ``"v6e:4x4"``: TPU slices, compiled by the real XLA:TPU
  compiler (libtpu) for an unattached topology
  (``jax.experimental.topologies.get_topology_desc``). libtpu is never imported by ordinary
  runs (an importable libtpu makes every JAX start look for a TPU): it lives in its own
  directory (``libtpu_dir=``, else ``$JAXUNLEARN_LIBTPU_DIR``, else ``.venv/libtpu`` of this
  repository, where ``make`` installs it), put on ``PYTHONPATH`` of a subprocess only. The
  numbers are XLA:TPU's own.
- ``"h100:8"``, ``"a100:16"``: NVIDIA GPUs, compiled by the real XLA:GPU compiler (Triton,
  ptxas) with no GPU attached (``get_topology_desc(platform="cuda", target_config=...)``), the
  CUDA PJRT plugin likewise off the import path (:func:`jaxunlearn.plan_targets.cuda_dir`).
  No autotuning runs, so the chosen kernels (and their temporaries) may differ a little, and
  XLA:GPU has no cost analysis without a device: no FLOPs and no time bound.
- ``"cpu:N"``: ``N`` host CPU devices (``--xla_force_host_platform_device_count=N``, also in a
  subprocess, since the flag must be set before JAX starts): the CPU compiler's buffer
  assignment and fusion differ from the accelerators', so its numbers are an estimate, and no
  time bound is given.

Example (8 CPU devices; a TPU slice the same way with ``target="v5e:8x8"``):
  >>> result = plan("llama-2-7b", target="cpu:64", mesh="fsdp=16,tp=4")   # doctest: +SKIP
  >>> print(result.format())                                              # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxunlearn.models.config import ModelConfig
from jaxunlearn.plan_targets import (CHIPS, GPU_TARGET_CONFIGS, TPU_TOPOLOGIES, Chip, GiB, Target, cuda_dir, libtpu_dir,
                                     parse_target)

__all__ = [
    "PRESETS",
    "CHIPS",
    "TPU_TOPOLOGIES",
    "PASSES",
    "Chip",
    "Target",
    "PassPlan",
    "PlanResult",
    "model_config",
    "parse_target",
    "parse_collectives",
    "libtpu_dir",
    "cuda_dir",
    "GPU_TARGET_CONFIGS",
    "plan",
    "smallest_slice",
]


# ---------------------------------------------------------------- models

PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-2-7b-hf config.json
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                       num_kv_heads=32, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
                       tie_word_embeddings=False, architecture="llama"),
    # meta-llama/Meta-Llama-3-8B config.json
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                       num_kv_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                       tie_word_embeddings=False, architecture="llama"),
    # meta-llama/Meta-Llama-3-70B config.json
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                        num_kv_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                        tie_word_embeddings=False, architecture="llama"),
    # Qwen/Qwen2-7B config.json (q/k/v biases; use_sliding_window false)
    "qwen2-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                     num_kv_heads=4, rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=131072,
                     tie_word_embeddings=False, architecture="qwen2"),
}
"""Hyperparameters of named models, from their public Hugging Face ``config.json`` files."""


def model_config(model: str | os.PathLike | ModelConfig, param_dtype: str = "bfloat16") -> ModelConfig:
    """The :class:`ModelConfig` of a preset name, a ``config.json`` file or directory, or a config.

    Args:
      model: a key of :data:`PRESETS`, a path to a Hugging Face ``config.json`` (or to the
        directory holding it, read by :func:`jaxunlearn.models.load_config`), or a ModelConfig.
      param_dtype: the parameters' storage and compute dtype.

    Raises:
      ValueError: an unknown preset (the message lists them), an unsupported config.
      FileNotFoundError: a path that does not exist.
    """
    if isinstance(model, ModelConfig):
        return model.replace(dtype=param_dtype, param_dtype=param_dtype)
    name = str(model)
    if name in PRESETS:
        return ModelConfig(**PRESETS[name], dtype=param_dtype, param_dtype=param_dtype)
    path = Path(name)
    if path.is_dir():
        from jaxunlearn.models.hf import load_config

        return load_config(path, dtype=param_dtype, param_dtype=param_dtype)
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a JSON config ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} is not a JSON object")
        return ModelConfig.from_hf(raw, dtype=param_dtype, param_dtype=param_dtype)
    if os.sep in name or name.endswith(".json"):
        raise FileNotFoundError(f"model config not found: {name}")
    raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)} (or pass a config.json path)")


# ---------------------------------------------------------------- HLO collectives

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
                "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1}
_SHAPE = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")


def _shapes(text: str) -> list[int]:
    return [int(_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d))
            for dt, dims in _SHAPE.findall(text)]


def _operands(line: str, start: int) -> str:
    """The text between the parenthesis opening at ``start - 1`` and its match (layouts nest parens)."""
    depth, i = 1, start
    while i < len(line) and depth:
        depth += {"(": 1, ")": -1}.get(line[i], 0)
        i += 1
    return line[start:i - 1]


def _group_size(line: str, num_devices: int) -> int:
    g = _GROUPS_LIST.search(line)
    if g is not None:
        return max(1, len([x for x in g.group(1).split(",") if x]))
    g = _GROUPS_IOTA.search(line)
    if g is not None:
        return int(g.group(2))
    g = _GROUPS_MESH.search(line)
    if g is not None:  # mesh['axis_0'=4,'axis_1'=2] {'axis_0'}: the product of the named axes
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", g.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", g.group(2)) if a in sizes)
    return num_devices


def parse_collectives(hlo_text: str, num_devices: int) -> dict[str, dict[str, int]]:
    """The collectives of a compiled (per-device, SPMD) HLO module and the bytes they move.

    Every instruction ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all`` and
    ``collective-permute`` (or its ``-start`` half; ``-done`` is not counted twice) is read with
    its group size ``n`` (``replica_groups`` as an explicit list, an iota ``[G,n]<=[...]`` or
    mesh axes; none means all ``num_devices``) and its operand bytes ``b``: the operand shapes
    when the HLO prints them, else derived from the result shape (all-gather ``result / n``,
    reduce-scatter ``result * n``, others ``result``; a ``-start`` tuple's first element for
    all-gather and collective-permute). The bytes one device sends (ring algorithms):
    all-gather ``b (n - 1)``, reduce-scatter and all-to-all ``b (n - 1) / n``, all-reduce
    ``2 b (n - 1) / n``, collective-permute ``b``. A collective inside a loop body is counted
    once (the decoder's layers are unrolled, so the passes of :func:`plan` have no such loop).

    Args:
      hlo_text: ``compiled.as_text()``.
      num_devices: the devices of the program (for collectives without replica groups).

    Returns:
      ``{kind: {"count", "operand_bytes", "wire_bytes"}}`` for the kinds present.

    >>> text = "%ag = bf16[64,128]{1,0} all-gather(bf16[16,128]{1,0} %p), replica_groups={{0,1,2,3}}"
    >>> parse_collectives(text, 4)["all-gather"]
    {'count': 1, 'operand_bytes': 4096, 'wire_bytes': 12288}
    """
    out: dict[str, dict[str, int]] = {}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if m is None:
            continue
        result, kind, start = m.group(1), m.group(2), m.group(3)
        n = max(1, _group_size(line, num_devices))
        operands = _shapes(_operands(line, m.end()))
        res = _shapes(result)
        if operands:
            b = sum(operands)
        elif start and kind in ("all-gather", "collective-permute"):
            b = res[0] if res else 0
        else:
            b = sum(res) // n if kind == "all-gather" else sum(res) * n if kind == "reduce-scatter" else sum(res)
        factor = {"all-gather": n - 1, "reduce-scatter": (n - 1) / n, "all-to-all": (n - 1) / n,
                  "all-reduce": 2 * (n - 1) / n, "collective-permute": 1}[kind]
        row = out.setdefault(kind, {"count": 0, "operand_bytes": 0, "wire_bytes": 0})
        row["count"] += 1
        row["operand_bytes"] += int(b)
        row["wire_bytes"] += int(round(b * factor))
    return out


# ---------------------------------------------------------------- results

PASSES = ("unlearn", "fisher", "eval")


@dataclasses.dataclass(frozen=True)
class PassPlan:
    """One compiled pass, per device.

    Attributes:
      name: ``"unlearn"``, ``"fisher"`` or ``"eval"``.
      argument_bytes, output_bytes, alias_bytes, temp_bytes: ``compiled.memory_analysis()``.
      peak_bytes: ``argument + output - alias + temp``, the memory the pass needs on a device.
      flops, bytes_accessed: ``compiled.cost_analysis()`` (per device).
      collectives: :func:`parse_collectives` of the compiled HLO.
      compile_seconds: wall time of lowering and compiling.
      roofline_seconds: TPU targets only: ``max(flops / peak, bytes_accessed / HBM bandwidth)``
        of the target's chip, a lower bound on the step time (not a measurement).
      error: the compiler's message when it refused the pass (the numbers are then 0).
    """

    name: str
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    peak_bytes: int = 0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    collectives: dict = dataclasses.field(default_factory=dict)
    compile_seconds: float = 0.0
    roofline_seconds: float | None = None
    error: str | None = None

    def fits(self, chip: str) -> bool:
        """Whether the pass compiled and ``peak_bytes`` fits the HBM of ``chip`` (a key of :data:`CHIPS`)."""
        return self.error is None and self.peak_bytes <= CHIPS[chip].hbm_bytes


@dataclasses.dataclass(frozen=True)
class PlanResult:
    """The plan of a run: what was compiled where, and a :class:`PassPlan` per pass.

    ``fits`` maps every chip of :data:`CHIPS` to whether every pass's peak fits its HBM;
    ``note`` says whose numbers these are (XLA:TPU's own, or the CPU compiler's estimate).
    """

    model: str
    num_params: int
    target: str
    platform: str
    mesh: dict
    batch: int
    seq: int
    method: str
    retain_k: int
    param_dtype: str
    kernels: str
    passes: dict
    note: str

    @property
    def peak_bytes(self) -> int:
        """The largest per-device peak over the passes."""
        return max(p.peak_bytes for p in self.passes.values())

    @property
    def fits(self) -> dict[str, bool]:
        """``{chip: every pass compiled and its peak fits the chip's HBM}`` over :data:`CHIPS`."""
        return {chip: all(p.fits(chip) for p in self.passes.values()) for chip in CHIPS}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``fits`` included)."""
        d = dataclasses.asdict(self)
        d["fits"] = self.fits
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PlanResult":
        """The inverse of :meth:`to_dict` (e.g. a ``plan --json`` file read back); ``fits`` is recomputed."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields - {"fits"}
        if unknown or not fields <= set(d):
            raise ValueError(f"PlanResult.from_dict: unknown keys {sorted(unknown)}, missing {sorted(fields - set(d))}")
        passes = {name: PassPlan(**p) for name, p in d["passes"].items()}
        return cls(**{k: v for k, v in d.items() if k in fields and k != "passes"}, passes=passes)

    def format(self) -> str:
        """A plain-text table: one row per pass, GiB per device, GFLOP, collective MiB, fits."""
        lines = [f"{self.model} ({self.num_params / 1e9:.2f}B params, {self.param_dtype}) on {self.target}, "
                 f"mesh {self.mesh}, batch {self.batch} x {self.seq}, {self.method} (retain_k={self.retain_k}), "
                 f"kernels={self.kernels}",
                 f"{'pass':8} {'args':>8} {'out':>8} {'temp':>8} {'peak':>8} {'TFLOP':>8} {'GB acc':>8} "
                 f"{'coll MiB':>9} {'bound ms':>9} {'compile s':>9}   (GiB per device)"]
        for p in self.passes.values():
            if p.error is not None:
                lines.append(f"{p.name:8} compile failed: {p.error.splitlines()[0][:160]}")
                continue
            coll = sum(c["wire_bytes"] for c in p.collectives.values()) / 2**20
            bound = "-" if p.roofline_seconds is None else f"{p.roofline_seconds * 1e3:.1f}"
            lines.append(f"{p.name:8} {p.argument_bytes / GiB:8.2f} {p.output_bytes / GiB:8.2f} "
                         f"{p.temp_bytes / GiB:8.2f} {p.peak_bytes / GiB:8.2f} {p.flops / 1e12:8.2f} "
                         f"{p.bytes_accessed / 1e9:8.2f} {coll:9.1f} {bound:>9} {p.compile_seconds:9.1f}")
        lines.append("fits: " + ", ".join(f"{c} {'yes' if ok else 'no'} ({CHIPS[c].hbm_bytes / GiB:.0f} GiB)"
                                          for c, ok in self.fits.items()))
        lines.append(self.note)
        return "\n".join(lines)


TPU_NOTE = ("Memory, FLOPs and collectives are XLA:TPU's own for this slice; 'bound' is a roofline lower bound "
            "on the step time (max of FLOPs / peak bf16 FLOP/s and bytes accessed / HBM bandwidth), not a "
            "measurement.")
GPU_NOTE = ("Memory and collectives are XLA:GPU's own for these GPUs (compiled without a GPU: no autotuning). "
            "XLA:GPU gives no cost analysis without a device, so no FLOPs and no time bound (plan on a TPU or "
            "cpu:N target for the FLOP count).")
CPU_NOTE = ("Compiled by XLA:CPU on forced host devices: for a GPU slice these numbers are an estimate (XLA:GPU "
            "fuses and assigns buffers differently); no time bound is given.")


# ---------------------------------------------------------------- planning


def _spec(cfg: ModelConfig, target: Target, mesh: str | Mapping[str, int], *, batch: int, seq: int, method: str,
          retain_k: int, passes: Sequence[str]) -> dict[str, Any]:
    """Validate everything the worker will need, before any compile; the worker's JSON spec."""
    from jaxunlearn.sharding import parse_mesh_spec
    from jaxunlearn.unlearn import METHODS

    sizes = parse_mesh_spec(mesh, target.num_devices)
    dp = sizes.get("data", 1) * sizes.get("fsdp", 1)
    for name, v in (("batch", batch), ("seq", seq), ("retain_k", retain_k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"plan: {name} must be a positive int, got {v!r}")
    if batch % dp:
        raise ValueError(f"plan: batch {batch} is not divisible by the mesh's data-parallel size {dp} ({sizes})")
    if method not in METHODS:
        raise ValueError(f"plan: unknown method {method!r}; methods: {METHODS} (add '_proj' for the projection)")
    bad = [p for p in passes if p not in PASSES]
    if bad or not passes:
        raise ValueError(f"plan: unknown passes {bad or list(passes)}; choose from {PASSES}")
    return {"config": cfg.to_dict(), "mesh": sizes, "batch": batch, "seq": seq, "method": method,
            "retain_k": retain_k, "passes": list(passes), "platform": target.platform,
            "chip": target.chip, "topology": target.topology, "num_devices": target.num_devices}


def _run_worker(spec: dict[str, Any], target: Target, libtpu: str | os.PathLike | None, timeout: float,
                kernels: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXUNLEARN_KERNEL_IMPL": kernels}
    root = str(Path(__file__).resolve().parents[1])
    paths = [root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    if target.platform == "cuda":  # the plugin registers without a driver only with JAX_PLATFORMS=cpu
        paths.insert(0, str(cuda_dir()))
        env.pop("XLA_FLAGS", None)
    elif target.platform == "tpu":
        paths.insert(0, str(libtpu_dir(libtpu)))
        env.pop("XLA_FLAGS", None)
        # compiling attaches no chip: skip libtpu's one-process-per-host lock, so a plan runs beside
        # another plan or beside a job that holds the host's TPU
        env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    else:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={target.num_devices}".strip()
    env["PYTHONPATH"] = os.pathsep.join(paths)
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "jaxunlearn.plan_worker", str(spec_file), str(out_file)],
                              env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out_file.is_file():
            how = (f"the compile process was killed by signal {-proc.returncode}"
                   + (" (SIGKILL: most often the host ran out of memory; a 70B compile needs more than 24 GB)"
                      if proc.returncode == -9 else "") if proc.returncode < 0
                   else f"the compile process exited with status {proc.returncode}")
            raise RuntimeError(f"plan: compiling for {target.name} failed: {how}:\n{proc.stderr[-4000:]}")
        return json.loads(out_file.read_text())


def plan(
    model: str | os.PathLike | ModelConfig,
    *,
    target: str = "v5e:8x8",
    mesh: str | Mapping[str, int] = "fsdp=16,tp=4",
    batch: int = 32,
    seq: int = 512,
    method: str = "npo_proj",
    retain_k: int = 4,
    param_dtype: str = "bfloat16",
    passes: Sequence[str] = PASSES,
    kernels: str = "auto",
    remat: str = "none",
    libtpu: str | os.PathLike | None = None,
    timeout: float = 1800.0,
) -> PlanResult:
    """Compile a run's passes for a target from abstract shapes and report what each device needs.

    Every argument is checked before anything is compiled. The compile runs in a subprocess
    (``python -m jaxunlearn.plan_worker``): for a TPU target with libtpu's directory on its
    ``PYTHONPATH``, for ``cpu:N`` with ``N`` forced host devices.

    Args:
      model: a preset name (:data:`PRESETS`), a ``config.json`` path (file or directory), or a
        :class:`ModelConfig`.
      target: ``"v5e:8x8"``-style TPU slice or ``"cpu:N"`` (see the module docstring).
      mesh: the mesh spec (:func:`jaxunlearn.sharding.parse_mesh_spec`); its product must be the
        target's device count, and the data-parallel size must divide ``batch``.
      batch: rows of the forget batch (and of the retain batch, and of the Fisher and eval batches).
      seq: tokens per row.
      method: a method of :data:`jaxunlearn.unlearn.METHODS`, with ``"_proj"`` appended for the
        orthogonal projection (``"npo_proj"``: NPO + projection over ``retain_k`` retain gradients).
      retain_k: retain gradients spanning the projection's subspace (with ``_proj``).
      param_dtype: the parameters' storage and compute dtype (AdamW moments follow it).
      passes: a subset of :data:`PASSES`.
      kernels: the Pallas kernels' path in the compiled passes (``$JAXUNLEARN_KERNEL_IMPL`` of the
        subprocess): ``"auto"`` (what a run does: Pallas on TPU) or ``"xla"`` (no kernels).
      remat: the decoder blocks' activation rematerialisation (:attr:`ModelConfig.remat`:
        ``"none"``, ``"full"``, ``"dots_saveable"``); it lowers the unlearning step's temporaries.
      libtpu: the libtpu directory for TPU targets (see :func:`libtpu_dir`).
      timeout: seconds before the compile subprocess is stopped.

    Returns:
      A :class:`PlanResult` (``.format()`` prints a table, ``.fits`` says which chips hold it).

    Raises:
      ValueError: an unknown preset, target, method or pass; a mesh whose product is not the
        target's device count; a batch the data-parallel size does not divide.
      FileNotFoundError: a missing config path, or no libtpu for a TPU target.
      RuntimeError: the compiler failed (its message is included).
    """
    t = parse_target(target)
    cfg = model_config(model, param_dtype).replace(remat=remat)
    if cfg.scan_layers:
        raise ValueError("plan: ModelConfig.scan_layers=True is not supported: XLA's cost analysis and "
                         "the collective count see the layer scan's body once, not num_layers times")
    base, project = (method[:-5], True) if str(method).endswith("_proj") else (method, False)
    spec = _spec(cfg, t, mesh, batch=batch, seq=seq, method=base, retain_k=retain_k, passes=tuple(passes))
    spec["project"] = project
    if t.platform == "tpu":
        libtpu_dir(libtpu)  # a missing libtpu (or CUDA plugin) is named before the subprocess starts
    elif t.platform == "cuda":
        cuda_dir()
    if kernels not in ("auto", "xla", "pallas"):
        raise ValueError(f"plan: kernels must be 'auto', 'xla' or 'pallas', got {kernels!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"plan: timeout must be a number of seconds > 0, got {timeout!r}")
    raw = _run_worker(spec, t, libtpu, timeout, kernels)
    chip = CHIPS.get(t.chip) if t.chip else None
    out = {}
    for name in passes:
        r = raw["passes"][name]
        bound = (max(r["flops"] / chip.peak_bf16_flops, r["bytes_accessed"] / chip.hbm_bandwidth)
                 if chip is not None and "error" not in r and (r["flops"] or r["bytes_accessed"]) else None)
        out[name] = PassPlan(name=name, roofline_seconds=bound, **r)
    name = str(model) if not isinstance(model, ModelConfig) else f"{cfg.architecture} d={cfg.hidden_size}"
    return PlanResult(model=name, num_params=raw["num_params"], target=t.name, platform=t.platform,
                      mesh=spec["mesh"], batch=batch, seq=seq, method=method, retain_k=retain_k if project else 0,
                      param_dtype=param_dtype, kernels=kernels, passes=out,
                      note={"tpu": TPU_NOTE, "cuda": GPU_NOTE}.get(t.platform, CPU_NOTE))


def _fsdp_size(shape: str, n: int, tp: int, batch: int) -> int:
    """``min(n // tp, batch)``; on a 3-D slice the largest product of some of its physical dimensions
    within that bound, as ``jax.make_mesh`` lays each axis onto whole torus dimensions there (a
    ``4x4x4`` v5p slice holds ``fsdp=16,tp=4`` but not ``fsdp=32,tp=2``)."""
    bound = max(1, min(n // tp, batch))
    dims = [int(d) for d in shape.split("x")]
    if len(dims) < 3:
        return bound
    products = {math.prod(c) for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)}
    return max(p for p in products if p <= bound)


def smallest_slice(model: str | os.PathLike | ModelConfig, chip: str, *, passes: Sequence[str] = ("unlearn",),
                   batch: int = 32, tp: int = 1, on_plan: Callable[[PlanResult], None] | None = None,
                   **kwargs: Any) -> PlanResult | None:
    """The smallest slice of :data:`TPU_TOPOLOGIES` ``[chip]`` whose plan fits the chip's HBM.

    Each slice of ``n`` chips is planned with mesh ``fsdp = max(1, min(n // tp, batch))``,
    ``tp = n // fsdp``: ``fsdp`` takes as many devices as the batch allows, the rest go to
    ``tp`` (at least ``tp``); on a 3-D slice (v5p) ``fsdp`` is the largest product of its
    physical dimensions within that bound (``jax.make_mesh`` cannot split a torus dimension). A slice too small for the arguments alone (parameters, reference
    and Adam moments spread evenly) is skipped without compiling. The remaining slices are
    searched by bisection (a 7B compile takes minutes): this assumes that a plan which fits on
    ``n`` chips also fits on every larger listed slice, which holds when each added chip only
    takes a share of the parameters, state and batch.

    Args:
      model, passes, batch, **kwargs: as :func:`plan` (``target`` and ``mesh`` are chosen here).
      chip: a key of :data:`TPU_TOPOLOGIES`.
      tp: the least tensor-parallel size of every mesh.
      on_plan: called with every compiled :class:`PlanResult` (fitting or not), e.g. to log it.

    Returns:
      The fitting slice's :class:`PlanResult`, or None when none of the listed slices fits.
    """
    if chip not in TPU_TOPOLOGIES:
        raise ValueError(f"smallest_slice: chip must be one of {tuple(TPU_TOPOLOGIES)}, got {chip!r}")
    import jax
    from flax import nnx

    from jaxunlearn.models.decoder import Decoder, count_params

    cfg = model_config(model, kwargs.get("param_dtype", "bfloat16"))
    weights = count_params(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))) * jax.numpy.dtype(
        cfg.param_dtype).itemsize
    # lower bounds on one device's arguments, by pass: params, reference and two Adam moments;
    # params and a float32 accumulator; params
    floor = max({"unlearn": 4 * weights, "fisher": weights * (1 + 4 // jax.numpy.dtype(cfg.param_dtype).itemsize),
                 "eval": weights}[p] for p in passes)
    shapes = [s for s in TPU_TOPOLOGIES[chip]
              if floor / parse_target(f"{chip}:{s}").num_devices <= CHIPS[chip].hbm_bytes]
    best, lo, hi = None, 0, len(shapes) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        n = parse_target(f"{chip}:{shapes[mid]}").num_devices
        fsdp = _fsdp_size(shapes[mid], n, tp, batch)
        mesh = {"fsdp": fsdp, "tp": n // fsdp} if n // fsdp > 1 else {"fsdp": fsdp}
        result = plan(model, target=f"{chip}:{shapes[mid]}", mesh=mesh, batch=batch, passes=passes, **kwargs)
        if on_plan is not None:
            on_plan(result)
        if result.fits[chip]:
            best, hi = result, mid - 1
        else:
            lo = mid + 1
    return best
