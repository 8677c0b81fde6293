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

Under ``"auto"`` a kernel is used only where it runs whole on each device: on one device,
or inside a ``jax.shard_map`` manual over every mesh axis. In a ``jit`` whose arrays are
sharded over several devices (or a ``shard_map`` leaving some axes to XLA) the XLA path is
lowered instead, since XLA cannot partition a kernel call (Mosaic refuses it, a Triton call
would be replicated): :func:`kernel_unless_partitioned`. Run the kernels per shard under
``shard_map`` to have them on a mesh (as :func:`jaxunlearn.sharding.sharded_orthogonal_projection`
and the data-parallel Fisher of :mod:`jaxunlearn.reduction` do).

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
    "automatically_partitioned",
    "kernel_unless_partitioned",
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
    ask and the Pallas branch is kept. On either, the kernel is lowered only where it runs
    whole on each device (:func:`kernel_unless_partitioned`): in a program that XLA partitions
    over several devices the XLA branch is lowered instead.
    """
    if plat == "cpu":
        return pallas_branch
    safe = kernel_unless_partitioned(pallas_branch, xla_branch)
    if plat != platform():
        return safe

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
        return (safe if _PROBED[key] else xla_branch)(*args)

    return branch


# ---------------------------------------------------------------- kernels under automatic partitioning
#
# A Pallas call is one opaque custom call: XLA's SPMD partitioner cannot split it. Mosaic
# refuses to lower one in a program partitioned over more than one device ("Mosaic kernels
# cannot be automatically partitioned"), Triton's would be replicated (every input gathered
# onto every device). Whether a call is in such a program is known only at lowering, from the
# lowering context's axis context: a ``jit`` over n devices (n > 1), or a ``shard_map`` that
# leaves some mesh axes automatic. ``_kernel_or_xla_p`` carries both paths and lowers the
# kernel where it can run whole on each device, else the XLA path.

_kernel_or_xla_p = Primitive("jaxunlearn_kernel_or_xla")
_kernel_or_xla_p.multiple_results = True


def _union_manual_axis_type(avals):
    varying = frozenset().union(*(getattr(getattr(a, "manual_axis_type", None), "varying", frozenset())
                                  for a in avals))
    return jax.sharding.ManualAxisType(varying=varying)


def _kernel_or_xla_abstract(*avals, kernel, fallback, out_types):
    del kernel, fallback
    mat = _union_manual_axis_type(avals)
    if not mat.varying:
        return [jax.core.ShapedArray(shape, dtype) for shape, dtype in out_types]
    mesh = jax.sharding.get_abstract_mesh()  # inside shard_map: the mesh with its manual axes
    return [jax.core.ShapedArray(shape, dtype, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                                 manual_axis_type=mat) for shape, dtype in out_types]


def automatically_partitioned(axis_context: Any) -> bool:
    """Whether a lowering context's ``axis_context`` leaves XLA to partition the program over
    more than one device: a ``jit`` over n > 1 devices, or a ``shard_map`` whose manual axes
    are not all the mesh's axes (the condition under which Mosaic refuses a kernel)."""
    manual = getattr(axis_context, "manual_axes", None)
    mesh = getattr(axis_context, "mesh", None)
    if manual is not None and mesh is not None:  # inside shard_map
        every = set(manual) | set(getattr(mesh, "manual_axes", ()))
        return bool(manual) and every != set(mesh.axis_names)
    n = getattr(axis_context, "num_devices", None)  # jit over n devices
    return n is not None and n != 1


def _kernel_or_xla_lowering(ctx, *args, kernel, fallback, out_types):
    del out_types
    fn = fallback if automatically_partitioned(ctx.module_context.axis_context) else kernel
    return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)


def _kernel_or_xla_batch(args, dims, *, kernel, fallback, out_types):
    del out_types
    axes = [d if isinstance(d, int) else None for d in dims]  # an unmapped argument: None
    kernel, fallback = jax.vmap(kernel, in_axes=axes), jax.vmap(fallback, in_axes=axes)
    structs = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in args]
    out_types = tuple((o.shape, o.dtype) for o in jax.eval_shape(fallback, *structs))
    outs = _kernel_or_xla_p.bind(*args, kernel=kernel, fallback=fallback, out_types=out_types)
    return outs, [0] * len(outs)


_kernel_or_xla_p.def_abstract_eval(_kernel_or_xla_abstract)
_kernel_or_xla_p.def_impl(lambda *args, kernel, fallback, out_types: kernel(*args))
mlir.register_lowering(_kernel_or_xla_p, _kernel_or_xla_lowering)
batching.primitive_batchers[_kernel_or_xla_p] = _kernel_or_xla_batch


def kernel_unless_partitioned(kernel: Callable[..., Any], fallback: Callable[..., Any]) -> Callable[..., Any]:
    """``kernel`` where the computation is lowered whole per device, else ``fallback``.

    Both take the same arguments (a pytree of arrays; ``None`` allowed) and return the same
    pytree of shapes and dtypes. The choice is made when the computation is *lowered*
    (:func:`automatically_partitioned` of the lowering context): the kernel on one device or
    inside a ``shard_map`` that is manual over every mesh axis; the XLA ``fallback`` in a
    ``jit`` whose arrays are sharded over several devices (the partitioner splits it like any
    XLA op), where a Mosaic kernel would be refused and a Triton one replicated. ``vmap``
    applies to both; not differentiable (the kernels act on gradients, not through them).
    """

    def call(*args):
        flat, in_tree = jax.tree.flatten(args)
        structs = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in flat]
        out_shape = jax.eval_shape(lambda *xs: fallback(*jax.tree.unflatten(in_tree, xs)), *structs)
        out_leaves, out_tree = jax.tree.flatten(out_shape)

        def flat_fn(f):
            return lambda *xs: jax.tree.leaves(f(*jax.tree.unflatten(in_tree, xs)))

        outs = _kernel_or_xla_p.bind(*flat, kernel=flat_fn(kernel), fallback=flat_fn(fallback),
                                     out_types=tuple((o.shape, o.dtype) for o in out_leaves))
        return jax.tree.unflatten(out_tree, outs)

    return call


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
