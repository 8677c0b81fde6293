"""Shared helpers for the Pallas kernels: dispatch, dtype checks, block sizes.

Dispatch rule used by every kernel module (``impl`` argument):

* ``"reference"``: plain ``jnp`` in float32 at ``Precision.HIGHEST``; the
  specification the other paths are tested against.
* ``"xla"``: a non-Pallas XLA formulation chosen for speed on CPU.
* ``"pallas"``: the Pallas kernel. On CPU it only runs with ``interpret=True``
  (``interpret=None`` means "interpret on CPU, compile on TPU/GPU").
* ``"auto"``: Pallas on TPU and GPU, XLA on CPU. The environment variable
  ``JAXUNLEARN_KERNEL_IMPL`` (``auto`` | ``pallas`` | ``xla``, read when a computation is
  traced) replaces ``"auto"`` everywhere, e.g. ``xla`` to keep every kernel off a chip
  (:func:`resolve_impl`). On the accelerator the process runs on, the first use of each
  kernel configuration under ``"auto"`` compiles it ahead of time; if the compiler refuses
  it (a block that does not fit the chip's memory, a Triton or Mosaic version that rejects
  an op), the XLA path is used instead and one ``RuntimeWarning`` names the kernel, the
  shapes and the compiler's message (:func:`with_fallback`).

Platform choice happens at *lowering*, not at trace time: every path that depends on
the platform (``"auto"``, ``interpret=None``, block defaults, compiler parameters) is
built once per platform and staged with ``lax.platform_dependent`` (:func:`per_platform`),
which keeps the branch of the platform the computation is lowered for. A traced
function (and its jit cache entry) is therefore valid everywhere, and
``jax.export(..., platforms=["tpu"])`` or ``["cuda"]`` from a CPU host lowers the
compiled Mosaic / Triton kernels (one platform per export: a multi-platform export
that lists ``"cpu"`` fails, as JAX then lowers the Pallas branches for every listed
platform). A configuration that is invalid on one platform
(a block size Triton or Mosaic refuses) raises its ``ValueError`` when, and only
when, the computation is lowered for that platform.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

Impl = Literal["auto", "pallas", "xla", "reference"]
IMPLS = ("auto", "pallas", "xla", "reference")
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

__all__ = [
    "Impl",
    "IMPLS",
    "SUPPORTED_DTYPES",
    "PLATFORMS",
    "platform",
    "per_platform",
    "check_impl",
    "resolve_impl",
    "IMPL_ENV",
    "compile_probe",
    "with_fallback",
    "check_pallas_platform",
    "resolve_interpret",
    "check_float_dtype",
    "compute_dtype",
    "dot_precision",
    "round_up",
    "next_power_of_2",
    "check_block",
    "out_struct",
]


PLATFORMS = ("cpu", "gpu", "tpu")
_LOWERING_NAMES = {"cpu": ("cpu",), "gpu": ("cuda", "rocm"), "tpu": ("tpu",)}


def platform() -> str:
    """``"cpu"``, ``"gpu"`` or ``"tpu"``: the default backend (where a jit call runs by default)."""
    p = jax.default_backend()
    return "gpu" if p in ("cuda", "rocm", "gpu") else p


def check_impl(impl: str) -> str:
    """Return ``impl`` if it names a path (``IMPLS``), else raise ``ValueError``."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    return impl


IMPL_ENV = "JAXUNLEARN_KERNEL_IMPL"


def resolve_impl(impl: str) -> str:
    """``impl``, with ``"auto"`` replaced by ``$JAXUNLEARN_KERNEL_IMPL`` when that is set.

    Raises:
      ValueError: the variable is set to something other than ``auto``, ``pallas`` or ``xla``.
    """
    if impl != "auto":
        return impl
    env = os.environ.get(IMPL_ENV, "").strip() or "auto"
    if env not in ("auto", "pallas", "xla"):
        raise ValueError(f"{IMPL_ENV}={env!r}: expected 'auto', 'pallas' or 'xla'")
    return env


def compile_probe(fn: Callable[..., Any], args: tuple) -> None:
    """Compile ``fn`` for the default backend on the shapes and dtypes of ``args`` (tracers or
    arrays), running nothing; raises whatever the compiler raises."""
    structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), args)
    jax.jit(fn).lower(*structs).compile()


_PROBED: dict[tuple, bool] = {}


def with_fallback(name: str, plat: str, pallas_branch: Callable[..., Any],
                  xla_branch: Callable[..., Any]) -> Callable[..., Any]:
    """The branch of ``plat`` for ``impl="auto"``: Pallas where it compiles, else XLA.

    Only on the accelerator this process runs on (``plat == platform()``, not CPU): when the
    branch is traced, the Pallas branch is compiled ahead of time for its argument shapes
    (:func:`compile_probe`; once per kernel, platform, shapes and configuration in this
    process). If that fails, the XLA branch is traced instead and one ``RuntimeWarning``
    names the kernel, the shapes and the compiler's first message line. For a platform
    that is not attached (``jax.export`` for TPU from a CPU host) there is no compiler to
    ask and the Pallas branch is kept.
    """
    if plat == "cpu" or plat != platform():
        return pallas_branch

    def branch(*args):
        shapes = tuple((tuple(jnp.shape(x)), str(jnp.result_type(x))) for x in jax.tree.leaves(args))
        config = pallas_branch.args if isinstance(pallas_branch, functools.partial) else id(pallas_branch)
        key = (name, plat, shapes, repr(config))
        if key not in _PROBED:
            try:
                compile_probe(pallas_branch, args)
                _PROBED[key] = True
            except Exception as e:  # any refusal of the compiler: the XLA path still computes the same
                _PROBED[key] = False
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                warnings.warn(f"jaxunlearn.kernels: the Pallas kernel {name} did not compile on {plat} for "
                              f"inputs {[f'{d}{list(s)}' for s, d in shapes]} ({type(e).__name__}: {first}); "
                              f"using its XLA path instead", RuntimeWarning, stacklevel=2)
        return (pallas_branch if _PROBED[key] else xla_branch)(*args)

    return branch


def resolve_interpret(interpret: bool | None, plat: str) -> bool:
    """``interpret=None`` -> True on CPU, False on TPU/GPU (for the platform ``plat``)."""
    return plat == "cpu" if interpret is None else bool(interpret)


def check_pallas_platform(plat: str, interpret: bool) -> None:
    """Raise ``ValueError`` for compiled Pallas on CPU (there is no compiled CPU backend)."""
    if plat == "cpu" and not interpret:
        raise ValueError(
            "impl='pallas' on CPU needs interpret=True (or None): Pallas has no compiled CPU backend"
        )


# A marker that raises, with its message, when it is lowered (or run eagerly): the
# branch of a platform on which the requested configuration is invalid.
_invalid_p = Primitive("jaxunlearn_invalid_for_platform")
_invalid_p.def_abstract_eval(lambda x, *, message: x)


def _raise_invalid(*_, message: str, **__):
    raise ValueError(message)


_invalid_p.def_impl(lambda x, *, message: _raise_invalid(message=message))
mlir.register_lowering(_invalid_p, lambda ctx, x, *, message: _raise_invalid(message=message))
batching.primitive_batchers[_invalid_p] = lambda args, dims, *, message: (
    _invalid_p.bind(args[0], message=message), dims[0])


def _invalid_branch(fn: Callable[..., Any], message: str) -> Callable[..., Any]:
    """``fn`` with its array arguments routed through the raising marker (same output types)."""

    def branch(*args):
        args = jax.tree.map(lambda x: _invalid_p.bind(x, message=message), args)
        return fn(*args)

    return branch


def per_platform(build: Callable[[str], Callable[..., Any]], *args: Any) -> Any:
    """``build(plat)(*args)`` for the platform ``plat`` the computation is lowered for.

    ``build`` is called for each of ``PLATFORMS``; it validates the configuration for
    that platform (raising ``ValueError`` if it is invalid there) and returns the
    branch, a function of ``args`` with the same output types on every platform. The
    branches are staged with ``lax.platform_dependent`` (``"gpu"`` serves ``cuda`` and
    ``rocm``), so the choice is made at lowering (module docstring). A platform whose
    ``build`` raised gets a branch that raises that error if it is ever lowered.

    Raises:
      ValueError: the configuration is invalid on every platform (the error of the
        default backend's platform).
    """
    branches, errors = {}, {}
    for plat in PLATFORMS:
        try:
            branches[plat] = build(plat)
        except ValueError as e:
            errors[plat] = e
    if not branches:
        raise errors[platform()]
    valid = next(iter(branches.values()))
    for plat, err in errors.items():
        branches[plat] = _invalid_branch(valid, str(err))
    kw = {name: branches[plat] for plat, names in _LOWERING_NAMES.items() for name in names}
    return lax.platform_dependent(*args, **kw)


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
