"""Comparing float32/bfloat16 results with float64 numpy references (shared by the kernel tests).

Tolerances: float32 rtol 1e-5 (atol 1e-5 * max|ref|); bfloat16 rtol 2e-2 (atol 2e-2 * max|ref|),
the reference computed from the same bf16 values. On ``sys.path`` through ``pythonpath = ["tests"]``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def as_f64(x) -> np.ndarray:
    """``x`` (any float dtype, bfloat16 included) as a float64 numpy array."""
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def assert_close(out, ref, dtype) -> None:
    """``out`` equals the float64 ``ref`` within the tolerance of ``dtype`` (see :data:`TOL`)."""
    tol = TOL[dtype]
    ref = np.asarray(ref)
    np.testing.assert_allclose(as_f64(out), ref, rtol=tol, atol=tol * np.abs(ref).max())
