"""The ``>>>`` examples in every docstring of ``jaxunlearn`` (and ``jaxunlearn.kernels``) run and hold.

Modules are imported by their installed names (``jaxunlearn.kernels.fisher``, never a
top-level ``kernels``), one test per module, with ``ELLIPSIS`` and
``NORMALIZE_WHITESPACE``; the names ``jax``, ``jnp``, ``np``, ``optax`` and ``ju``
(``import jaxunlearn as ju``) are available to every example, besides the module's own names
(as ``doctest.testmod`` does).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxunlearn


def _modules() -> list[str]:
    import jaxunlearn.kernels as kernels  # installed from kernels/ (package-dir mapping): walked on its own

    names = {"jaxunlearn", "jaxunlearn.kernels"}
    for pkg in (jaxunlearn, kernels):
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
            if not info.name.endswith("__main__"):
                names.add(info.name)
    return sorted(names)


MODULES = _modules()


def test_every_package_is_walked():
    assert {"jaxunlearn.kernels.fisher", "jaxunlearn.kernels.projection", "jaxunlearn.models.decoder",
            "jaxunlearn.eval.tofu", "jaxunlearn.data.io"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    globs = {**vars(module), "jax": jax, "jnp": jnp, "np": np, "optax": optax, "ju": jaxunlearn}
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures = []
    for test in finder.find(module, name, globs=dict(globs)):
        if test.examples and getattr(test, "filename", None) and test.name.startswith(name):
            result = runner.run(test, out=failures.append)
            del result
    assert not failures, "".join(failures)
