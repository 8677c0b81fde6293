"""``jaxunlearn plan``: the command-line face of :func:`jaxunlearn.plan.plan`.

``jaxunlearn plan MODEL --target v5e:8x8 (or h100:8) --mesh fsdp=16,tp=4 --batch 32 --seq 512 --method npo_proj``
compiles the unlearning step, the fused-Fisher pass and the evaluation forward for the target from
abstract shapes (no weights) and prints per-device memory, FLOPs, collectives and which chips the
run fits; ``--json FILE`` writes the same as a dict. Exit status 1 when a pass did not compile or
the run does not fit the chip named by a TPU or GPU ``--target``.
"""

from __future__ import annotations

import argparse

from jaxunlearn.outputs import check_output_file, write_json_atomic

__all__ = ["add_plan_parser", "run_plan"]


def add_plan_parser(sub) -> argparse.ArgumentParser:
    """Add the ``plan`` sub-command to ``sub`` (an ``argparse`` sub-parsers object)."""
    from jaxunlearn.plan import PASSES

    p = sub.add_parser(
        "plan", help="compile a run for a TPU slice or CPU virtual devices and print per-device memory",
        description=__doc__.split("\n\n")[1])
    p.add_argument("model", help="a preset (llama-2-7b, llama-3-8b, llama-3-70b, qwen2-7b), a config.json "
                   "or a checkpoint directory")
    p.add_argument("--target", default="v5e:8x8", help="a TPU topology libtpu accepts (v5e:8x8, v5p:4x4x4, ...), "
                   "NVIDIA GPUs h100:N / a100:N (compiled by XLA:GPU with no GPU attached), or cpu:N (N forced "
                   "host devices; an estimate)")
    p.add_argument("--mesh", default="fsdp=16,tp=4", help="mesh axes, their product = the target's devices")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--method", default="npo_proj", help="ga | grad_diff | npo | simnpo, '_proj' for the projection")
    p.add_argument("--retain-k", type=int, default=4)
    p.add_argument("--param-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--passes", default=",".join(PASSES), help=f"comma-separated subset of {','.join(PASSES)}")
    p.add_argument("--kernels", default="auto", choices=["auto", "pallas", "xla"])
    p.add_argument("--remat", default="none", choices=["none", "full", "dots_saveable"])
    p.add_argument("--libtpu", default=None, help="directory holding libtpu (default: .venv/libtpu)")
    p.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds before the compile subprocess is stopped (a 70B model compiles for tens of minutes)")
    return p


def run_plan(args) -> int:
    """Run the ``plan`` sub-command; returns the exit status."""
    from jaxunlearn.plan import plan

    if args.json:
        check_output_file(args.json, overwrite=True, what="--json file")
    result = plan(args.model, target=args.target, mesh=args.mesh, batch=args.batch, seq=args.seq,
                  method=args.method, retain_k=args.retain_k, param_dtype=args.param_dtype,
                  passes=tuple(x.strip() for x in args.passes.split(",") if x.strip()), kernels=args.kernels,
                  remat=args.remat, libtpu=args.libtpu, timeout=args.timeout)
    print(result.format())
    if args.json:
        write_json_atomic(args.json, result.to_dict())
    failed = any(p.error is not None for p in result.passes.values())
    chip = args.target.split(":")[0]
    return 1 if failed or (chip in result.fits and not result.fits[chip]) else 0
