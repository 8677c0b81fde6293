"""Shared helpers for the Pallas kernels: dispatch, dtype checks, block sizes.

Dispatch rule used by every kernel module (``impl`` argument):

* ``"reference"``: plain ``jnp`` in float32 at ``Precision.HIGHEST``; the
  specification the other paths are tested against.
* ``"xla"``: a non-Pallas XLA formulation chosen for speed on CPU.
* ``"pallas"``: the Pallas kernel. On CPU it only runs with ``interpret=True``
  (``interpret=None`` means "interpret on CPU, compile on TPU/GPU").
* ``"auto"``: Pallas on TPU and GPU, XLA on CPU.

The platform is read from ``jax.default_backend()`` when the function is traced.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

Impl = Literal["auto", "pallas", "xla", "reference"]
IMPLS = ("auto", "pallas", "xla", "reference")
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

__all__ = [
    "Impl",
    "IMPLS",
    "SUPPORTED_DTYPES",
    "platform",
    "resolve_impl",
    "resolve_interpret",
    "check_float_dtype",
    "compute_dtype",
    "dot_precision",
    "round_up",
    "next_power_of_2",
    "check_block",
    "out_struct",
]


def platform() -> str:
    """``"cpu"``, ``"gpu"`` or ``"tpu"``: the default backend at trace time."""
    p = jax.default_backend()
    return "gpu" if p in ("cuda", "rocm", "gpu") else p


def resolve_impl(impl: str, interpret: bool | None) -> str:
    """Map ``impl`` (``"auto"`` included) to one of pallas / xla / reference.

    Raises:
      ValueError: unknown ``impl``, or ``impl="pallas"`` with ``interpret=False``
        on CPU (Pallas has no compiled CPU backend).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    plat = platform()
    if impl == "auto":
        return "pallas" if plat in ("tpu", "gpu") else "xla"
    if impl == "pallas" and plat == "cpu" and interpret is False:
        raise ValueError(
            "impl='pallas' on CPU needs interpret=True (or None): Pallas has no compiled CPU backend"
        )
    return impl


def resolve_interpret(interpret: bool | None) -> bool:
    """``interpret=None`` -> True on CPU, False on TPU/GPU."""
    return platform() == "cpu" if interpret is None else bool(interpret)


def check_float_dtype(x: jax.Array, name: str) -> jnp.dtype:
    """Return ``x.dtype`` if it is float32 or bfloat16, else raise ``TypeError``."""
    dt = jnp.dtype(x.dtype)
    if dt not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {dt}; only float32 and bfloat16 are supported")
    return dt


def compute_dtype(*dtypes) -> jnp.dtype:
    """The dtype fed to the matmul units: the common dtype, float32 if they differ."""
    ds = {jnp.dtype(d) for d in dtypes}
    return ds.pop() if len(ds) == 1 else jnp.dtype(jnp.float32)


def dot_precision(dtype) -> lax.Precision:
    """``HIGHEST`` for float32 operands (no silent bf16 passes on TPU), ``DEFAULT`` for bf16."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def round_up(n: int, m: int) -> int:
    """Smallest multiple of ``m`` that is ``>= n``."""
    return -(-n // m) * m


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` (``n >= 1``)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def check_block(value: int | None, name: str) -> None:
    """Raise ``ValueError`` unless ``value`` is None or a positive int."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def out_struct(shape: tuple[int, ...], dtype, *operands: jax.Array) -> jax.ShapeDtypeStruct:
    """``jax.ShapeDtypeStruct`` for a ``pallas_call`` output, valid inside ``jax.shard_map``.

    Under ``shard_map`` (``check_vma=True``) Pallas needs to know along which mesh
    axes an output varies; it is taken as the union of the operands' varying axes
    (empty outside ``shard_map``).
    """
    varying: frozenset = frozenset()
    for x in operands:
        mat = getattr(jax.typeof(x), "manual_axis_type", None)
        if mat is not None:
            varying |= mat.varying
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying))
