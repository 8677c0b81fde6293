#!/usr/bin/env bash
# The accelerator check: compiled-Pallas kernel tests, then every benchmark at its --full sizes.
#
# Run from the repository root on a machine with a GPU or TPU whose Python already has JAX for
# that accelerator (the project's own .venv is CPU-only).  Outputs go to $OUT (default
# results/accelerator): kernel_tests.log, bench.log and the bench JSON/markdown files.
# Each stage has its own time limit so a slow or failing stage does not cost the others.
#
# Usage: OUT=results/accelerator [QUICK=1] bash experiments/gpu_check.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-results/accelerator}
mkdir -p "$OUT/bench"
PY=${PY:-python3}
# The package maps kernels/ to jaxunlearn.kernels; without an install, a link does the same.
[ -e jaxunlearn/kernels ] || ln -s ../kernels jaxunlearn/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null
$PY -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"

# tests/conftest.py defaults JAX_PLATFORMS to cpu; name the accelerator so the compiled tests run
# (by its plugin's name: "gpu" would also ask for ROCm).
PLATFORM=$($PY -c "import jax; print(jax.devices()[0].client.platform)")
JAX_PLATFORMS=$PLATFORM timeout 150 $PY -m pytest -q -p no:cacheprovider -rs tests/kernels \
  2>&1 | tee "$OUT/kernel_tests.log"

if [ -n "${QUICK:-}" ]; then  # one lease's worth: a real layer's kernels and the 100M decoder's Fisher
  {
    timeout 100 $PY experiments/bench_kernels.py --batch 16 --seq 512 --d-in 2048 --d-out 2048 \
      --k 4,16 --p 100000000 --dtype bfloat16 --repeats 5 --out "$OUT/bench/kernels_bf16.json"
    timeout 100 $PY experiments/bench_fisher.py --cases llama100m:32:128,llama100m:8:512 \
      --out "$OUT/bench/fisher.json"
  } 2>&1 | tee "$OUT/bench.log"
  exit 0
fi
{
  timeout 120 $PY experiments/bench_kernels.py --batch 32 --seq 512 --d-in 4096 --d-out 4096 \
    --k 4,8,16 --p 200000000 --dtype bfloat16 --out "$OUT/bench/kernels_bf16.json"
  timeout 90 $PY experiments/bench_kernels.py --batch 32 --seq 128 --d-in 1024 --d-out 1024 \
    --k 4,8,16 --p 16000000 --out "$OUT/bench/kernels.json"
  timeout 150 $PY experiments/bench_fisher.py --full --out "$OUT/bench/fisher.json"
  timeout 60 $PY experiments/bench_scaling.py --batch 128 --seq 128 --devices 1 \
    --out "$OUT/bench/scaling.json"
} 2>&1 | tee "$OUT/bench.log"
