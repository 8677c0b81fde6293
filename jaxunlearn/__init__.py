"""jaxunlearn: machine-unlearning transforms for language models, in JAX.

The public API is re-exported here, as in ``optax/__init__.py``.
"""

from jaxunlearn import tree

__version__ = "0.1.0"

__all__ = ["tree"]
