"""Pallas kernels with their ``jnp`` references (installed as ``jaxunlearn.kernels``).

* :mod:`jaxunlearn.kernels.fisher`: fused diagonal Fisher of a dense layer,
  ``F = sum_b (a_b^T g_b)**2``, without per-example gradients.
* :mod:`jaxunlearn.kernels.projection`: one-pass Gram / dots / subtract over long
  vectors, the array passes of the projection ``g - R^T (R R^T)^+ R g`` (the pytree
  projection built on them is :func:`jaxunlearn.projection.project_tree`).
* :mod:`jaxunlearn.kernels.solve`: the ``k x k`` pseudo-inverse solve of that projection
  (angle-based rank rule) and the power-of-two row scaling applied before its Gram.

Every kernel takes ``impl="auto" | "pallas" | "xla" | "reference"``; ``"auto"``
runs Pallas on TPU/GPU and XLA on CPU (Pallas on CPU only in interpret mode), chosen
when the computation is lowered, so ``jax.export`` for TPU/GPU from a CPU host carries
the compiled kernels (:mod:`jaxunlearn.kernels.dispatch`). This package imports nothing
from the rest of ``jaxunlearn``: it works on arrays, never on pytrees.
"""

from jaxunlearn.kernels.fisher import (
    dense_fisher,
    dense_fisher_pallas,
    dense_fisher_reference,
    dense_fisher_xla,
)
from jaxunlearn.kernels.projection import (
    dots,
    gram,
    gram_and_dots,
    gram_and_dots_reference,
    gram_and_dots_xla,
    subtract,
    subtract_reference,
    subtract_xla,
)
from jaxunlearn.kernels.solve import DEFAULT_RCOND, pinv_solve, pow2_row_scales, row_absmax

__all__ = [
    "DEFAULT_RCOND",
    "dense_fisher",
    "dense_fisher_pallas",
    "dense_fisher_reference",
    "dense_fisher_xla",
    "dots",
    "gram",
    "gram_and_dots",
    "gram_and_dots_reference",
    "gram_and_dots_xla",
    "pinv_solve",
    "pow2_row_scales",
    "row_absmax",
    "subtract",
    "subtract_reference",
    "subtract_xla",
]
