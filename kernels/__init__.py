"""Pallas kernels with their ``jnp`` references (installed as ``jaxunlearn.kernels``).

* :mod:`jaxunlearn.kernels.fisher`: fused diagonal Fisher of a dense layer,
  ``F = sum_b (a_b^T g_b)**2``, without per-example gradients.
* :mod:`jaxunlearn.kernels.projection`: one-pass Gram / dots / subtract over long
  vectors and the pytree projection ``g - R^T (R R^T)^+ R g``.

Every function takes ``impl="auto" | "pallas" | "xla" | "reference"``; ``"auto"``
runs Pallas on TPU/GPU and XLA on CPU (Pallas on CPU only in interpret mode), chosen
when the computation is lowered, so ``jax.export`` for TPU/GPU from a CPU host carries
the compiled kernels (:mod:`jaxunlearn.kernels._common`).
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
    pinv_solve,
    project_tree,
    subtract,
    subtract_reference,
    tree_gram_and_dots,
    tree_subtract,
)

__all__ = [
    "dense_fisher",
    "dense_fisher_pallas",
    "dense_fisher_reference",
    "dense_fisher_xla",
    "dots",
    "gram",
    "gram_and_dots",
    "gram_and_dots_reference",
    "pinv_solve",
    "project_tree",
    "subtract",
    "subtract_reference",
    "tree_gram_and_dots",
    "tree_subtract",
]
