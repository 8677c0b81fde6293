# Each target builds .venv on a fresh machine by itself (only python3 and pip needed).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# libtpu, for compiling (not running) TPU programs in the tests, in its own directory: importable
# from site-packages it would make every CPU run of JAX try to start a TPU backend. The version is
# the one jax's own "tpu" extra names.
LIBTPU := $(VENV)/libtpu
export LIBTPU_PIN := import importlib.metadata as m; print(next(r.split(";")[0] for r in m.requires("jax") if r.startswith("libtpu")))
# The CUDA PJRT plugin (the version of jax's "cuda12" extra) and ptxas, for compiling (not running)
# GPU programs without a GPU, in their own directory for the same reason as libtpu. No other CUDA
# library is needed to compile (223 MB of wheels, 573 MB installed).
CUDA := $(VENV)/cuda
export CUDA_PINS := import importlib.metadata as m; v = m.version("jaxlib"); print(f"jax-cuda12-plugin=={v} jax-cuda12-pjrt=={v} nvidia-cuda-nvcc-cu12>=12.6.85")

export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: test test-fast demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --upgrade --target $(LIBTPU) "$$($(PY) -c "$$LIBTPU_PIN")"
	$(PY) -m pip install --quiet --upgrade --no-deps --target $(CUDA) $$($(PY) -c "$$CUDA_PINS")
	touch $(STAMP)

# The whole suite, docstring examples included (tests/test_doctests.py runs every >>> of jaxunlearn
# and jaxunlearn.kernels as a doctest).
test: $(STAMP)
	$(PY) -m pytest -q tests

# The inner loop: everything but the end-to-end tier (tests/conftest.py SLOW_MODULES), under 3 minutes.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(PY) -m jaxunlearn.cli demo --overwrite

bench: $(STAMP)
	$(PY) experiments/bench.py

clean:
	rm -rf $(VENV) results build *.egg-info
