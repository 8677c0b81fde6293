"""Run every throughput benchmark (``make bench``): the kernels, the fused Fisher, then device scaling.

* ``experiments/bench_kernels.py``: ``dense_fisher`` paths and the projection passes at
  k = 1, 4, 8, 16 (as multiples of the machine's measured read / copy / matmul floors)
  -> ``results/bench/kernels.json``.
* ``experiments/bench_fisher.py``: fused vs chunked-vmap diagonal Fisher on the demo
  decoder and a ~100M-parameter Llama-shaped decoder (time per example, XLA temp
  memory, ratios to one gradient) -> ``results/bench/fisher.json`` and ``fisher.md``.
* ``experiments/bench_scaling.py``: NPO+projection unlearning-step and vmap-Fisher throughput
  on 1, 2, 4 and 8 devices (mesh ``fsdp=n``; 8 forced CPU devices when there is no
  accelerator) -> ``results/bench/scaling.json``. It runs in its own process: the forced
  device count (``XLA_FLAGS``) must be set before JAX starts and must not change the others.
* ``experiments/bench_vs_torch.py``: the same Hugging Face checkpoint through jaxunlearn and
  transformers' PyTorch model (gradient and its fraction of the matmul rate, diagonal Fisher
  fused / vmap vs ``torch.func``, an NPO + GradDiff AdamW step) -> ``results/bench/vs_torch.json``.

By default the sizes fit a small CPU machine (a few minutes on 2 cores); ``--full``
runs the larger sizes (kernel shapes of a real layer, the whole batch 8/32/128 x
sequence 128/512 Fisher grid), meant for a TPU/GPU or a big CPU host.

Usage: ``python experiments/bench.py [--full]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_fisher  # noqa: E402
import bench_kernels  # noqa: E402
import bench_vs_torch  # noqa: E402

HERE = Path(__file__).resolve().parent


def run_scaling(argv: list[str]) -> dict:
    """``bench_scaling.py`` in a fresh interpreter (its own ``XLA_FLAGS``); returns its JSON."""
    out = argv[argv.index("--out") + 1]
    subprocess.run([sys.executable, str(HERE / "bench_scaling.py"), *argv], check=True)
    return json.loads(Path(out).read_text())


KERNELS_FULL = ["--batch", "32", "--seq", "128", "--d-in", "1024", "--d-out", "1024", "--k", "4,8,16",
                "--p", "16000000"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="larger sizes (see the module docstring)")
    p.add_argument("--out-dir", default="results/bench")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    results = {}
    for name, fn, extra in (
        ("kernels", bench_kernels.main, KERNELS_FULL if args.full else []),
        ("fisher", bench_fisher.main, ["--full"] if args.full else []),
        ("scaling", run_scaling, ["--batch", "128", "--seq", "128"] if args.full else []),
        ("vs_torch", bench_vs_torch.main, []),
    ):
        t0 = time.perf_counter()
        print(f"=== {name} ===", flush=True)
        results[name] = fn([*extra, "--out", str(out / f"{name}.json")])
        print(f"=== {name}: {time.perf_counter() - t0:.0f}s ===\n", flush=True)
    return results


if __name__ == "__main__":
    main()
