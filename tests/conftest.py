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


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def key():
    return jax.random.key(0)
