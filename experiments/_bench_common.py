"""What every throughput benchmark records about the machine."""

from __future__ import annotations

import os
import platform as pyplatform
from typing import Any

import jax


def machine_info(**extra: Any) -> dict[str, Any]:
    """Backend, device kind, CPU count, jax and Python versions (plus ``extra`` entries)."""
    return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "python": pyplatform.python_version(), **extra}

