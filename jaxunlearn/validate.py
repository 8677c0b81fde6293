"""Argument validation shared by the configuration dataclasses and the public transforms.

Each ``check_*`` function takes the *owner* (the class or function the value belongs to,
e.g. ``"UnlearnConfig"``), the field or argument *name* and the *value*, returns the value
normalised to a plain Python type, and raises

- ``TypeError`` when the value has the wrong type (a ``bool`` where a number is expected,
  ``2.5`` or ``"3"`` where an int is expected, ...);
- ``ValueError`` when it has the right type but a bad value (out of range, NaN/Inf, not
  one of the allowed choices);

always with the message ``f"{owner}.{name} must be ..., got {value!r}"``, so a failing
configuration names the field it comes from:

>>> check_float("UnlearnConfig", "learning_rate", float("nan"), min=0.0, min_exclusive=True)
Traceback (most recent call last):
...
ValueError: UnlearnConfig.learning_rate must be a finite number > 0, got nan

These checks are for Python scalars (configuration fields, static arguments). Arguments
that may be traced under ``jax.jit`` (a strength, a radius) go through :func:`check_scalar`,
which checks concrete values and lets tracers through; pytrees of arrays through
:func:`jaxunlearn.tree.check_finite`, which raises :class:`jaxunlearn.tree.NonFiniteError`
(both a ``ValueError`` and a ``FloatingPointError``) naming the first leaf with NaN/Inf.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np


__all__ = [
    "check_int",
    "check_float",
    "check_bool",
    "check_choice",
    "check_names",
    "check_scalar",
    "is_concrete",
]


def _qual(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def _fmt_bound(x) -> str:
    # 0.0 -> "0", 1e-08 -> "1e-08": the bound as a reader would write it.
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def is_concrete(value: Any) -> bool:
    """Whether ``value`` holds a concrete value (is not a ``jax.core.Tracer``).

    Value checks (ranges, finiteness) need a concrete value; under ``jax.jit`` or
    ``jax.grad`` an argument is a tracer and its checks must be skipped.
    """
    return not isinstance(value, jax.core.Tracer)


def check_int(owner: str, name: str, value: Any, *, min: int | None = None) -> int:  # noqa: A002
    """Check that ``value`` is an integer (not a bool, not a float) ``>= min``.

    Args:
      owner: the class or function the value belongs to (``""``: none).
      name: the field or argument name.
      value: a Python or numpy integer.
      min: inclusive lower bound (``None``: none).

    Returns:
      ``int(value)``.

    Raises:
      TypeError: ``value`` is not an integer (``True``, ``2.5``, ``2.0``, ``"2"``).
      ValueError: ``value < min``.
    """
    q = _qual(owner, name)
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{q} must be an int, got {value!r}")
    value = int(value)
    if min is not None and value < min:
        raise ValueError(f"{q} must be an int >= {min}, got {value!r}")
    return value


def check_float(
    owner: str,
    name: str,
    value: Any,
    *,
    min: float | None = None,  # noqa: A002
    min_exclusive: bool = False,
    allow_none: bool = False,
) -> float | None:
    """Check that ``value`` is a finite real number, ``>= min`` (or ``> min`` if ``min_exclusive``).

    Ints are accepted (``1`` for ``1.0``); bools, strings and complex numbers are not.
    NaN and +-Inf are always refused.

    Args:
      owner: the class or function the value belongs to (``""``: none).
      name: the field or argument name.
      value: a Python or numpy real number (or ``None`` when ``allow_none``).
      min: lower bound (``None``: none).
      min_exclusive: the bound is strict (``value > min``).
      allow_none: accept ``None`` (returned as is).

    Returns:
      ``float(value)``, or ``None``.

    Raises:
      TypeError: ``value`` is not a real number (or is ``None`` without ``allow_none``).
      ValueError: ``value`` is NaN/Inf or below the bound.
    """
    q = _qual(owner, name)
    if value is None and allow_none:
        return None
    if _is_bool(value) or not isinstance(value, numbers.Real):
        what = "a number (int or float)" + (" or None" if allow_none else "")
        raise TypeError(f"{q} must be {what}, got {value!r}")
    f = float(value)
    cond = ""
    if min is not None:
        cond = f" {'>' if min_exclusive else '>='} {_fmt_bound(min)}"
    if not math.isfinite(f) or (min is not None and (f <= min if min_exclusive else f < min)):
        none = " or None" if allow_none else ""
        raise ValueError(f"{q} must be a finite number{cond}{none}, got {value!r}")
    return f


def check_bool(owner: str, name: str, value: Any) -> bool:
    """Check that ``value`` is a bool (Python or numpy), not ``0``/``1`` or a string.

    Returns:
      ``bool(value)``.

    Raises:
      TypeError: ``value`` is not a bool.
    """
    if not _is_bool(value):
        raise TypeError(f"{_qual(owner, name)} must be a bool, got {value!r}")
    return bool(value)


def check_names(owner: str, name: str, value: Any) -> tuple[str, ...]:
    """Check that ``value`` is a non-empty sequence of distinct strings (not one string).

    Returns:
      ``tuple(value)``.

    Raises:
      TypeError: ``value`` is a string, not a sequence, or holds a non-string.
      ValueError: ``value`` is empty or names something twice.
    """
    q = _qual(owner, name)
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"{q} must be a sequence of names, got {value!r}")
    names = tuple(value)
    if not all(isinstance(v, str) for v in names):
        raise TypeError(f"{q} must be a sequence of names (strings), got {value!r}")
    if not names:
        raise ValueError(f"{q} must name at least one, got {value!r}")
    twice = sorted({v for v in names if names.count(v) > 1})
    if twice:
        raise ValueError(f"{q} must name each once; {twice} named twice or more in {list(names)}")
    return names


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Check that ``value`` is one of ``choices`` (same type and equal: ``True`` is not ``1``).

    Returns:
      ``value``.

    Raises:
      TypeError: every choice is a string and ``value`` is not.
      ValueError: ``value`` is not one of ``choices``.
    """
    choices = tuple(choices)
    for c in choices:
        if type(value) is type(c) and value == c:
            return value
    q = _qual(owner, name)
    if choices and all(isinstance(c, str) for c in choices) and not isinstance(value, str):
        raise TypeError(f"{q} must be a str, one of {choices}, got {value!r}")
    raise ValueError(f"{q} must be one of {choices}, got {value!r}")


def check_scalar(
    owner: str,
    name: str,
    value: Any,
    *,
    min: float | None = None,  # noqa: A002
    min_exclusive: bool = False,
) -> Any:
    """Check a real scalar argument that may be traced: a Python/numpy number or a 0-d array.

    A concrete value must be finite and ``>= min`` (``> min`` if ``min_exclusive``); a
    ``jax.core.Tracer`` (the argument of a jitted or differentiated function) is only
    checked for being 0-d and real, its value is not inspected, so the check never
    forces a traced value to a Python bool.

    Args:
      owner: the function the argument belongs to (``""``: none).
      name: the argument name.
      value: the scalar.
      min, min_exclusive: lower bound, as in :func:`check_float`.

    Returns:
      ``value`` unchanged (a tracer stays a tracer).

    Raises:
      TypeError: not a real scalar (a bool, a string, an array with ``ndim > 0`` or of a
        bool/complex dtype).
      ValueError: a concrete value that is NaN/Inf or below the bound.
    """
    q = _qual(owner, name)
    if _is_bool(value) or isinstance(value, (str, bytes)):
        raise TypeError(f"{q} must be a real scalar, got {value!r}")
    if isinstance(value, numbers.Real):
        check_float(owner, name, value, min=min, min_exclusive=min_exclusive)
        return value
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"{q} must be a real scalar, got {value!r}")
    real = jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    if tuple(shape) != () or not real:
        raise TypeError(f"{q} must be a real scalar (0-d, real dtype), got shape {tuple(shape)} dtype {dtype}")
    if is_concrete(value):
        with jax.ensure_compile_time_eval():
            v = float(value)
        check_float(owner, name, v, min=min, min_exclusive=min_exclusive)
    return value
