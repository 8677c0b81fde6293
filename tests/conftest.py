"""Suite-wide set-up: 8 forced CPU devices, strict dtype promotion, fixed seeds, offline.

Forcing several devices for every test makes sharding bugs surface everywhere.
Dtype promotion stays "standard": optax's Adam bias correction (``b1 ** count`` with
an int32 count) fails under "strict", so dtype discipline is checked by tests that
assert output dtypes (bfloat16 in -> bfloat16 out, float32 accumulation) instead.
"""

import os
import random

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "standard")


# The end-to-end tier (models trained or loaded from disk, whole commands, several processes, compiler
# lowering for every platform): `make test` runs it, `make test-fast` (pytest -m "not slow") leaves it out.
SLOW_MODULES = {
    "test_cli.py", "test_cli_mesh.py", "test_demo.py", "test_benchmark.py", "test_multihost.py",
    "bad_inputs/test_cli.py", "models/test_hf_parity.py", "kernels/test_lowering.py",
}


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if os.path.relpath(str(item.path), here) in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def key():
    return jax.random.key(0)
