"""Where a run's arrays go: the one mesh a run uses, its batches split over it, its state on it.

Every run (training, unlearning methods, Fisher / importance estimation, the demo) resolves
its mesh the same way, :func:`resolve_mesh`: the mesh passed explicitly, else the mesh the
given arrays are already sharded on, else the one set by ``jax.set_mesh``, else None (one
device, nothing placed). Then

- :func:`place_batch` splits a host batch's rows over the mesh's data-parallel axes
  (:func:`jaxunlearn.sharding.shard_batch`) after checking that the batch size divides,
  naming the batch;
- :func:`replicate_unplaced` leaves arrays already on a mesh where they are and replicates
  the others (a fresh optimizer count, a mask built on the host) over the mesh.

>>> resolve_mesh(None, {"w": jnp.ones(3)}) is None        # no mesh anywhere: unsharded
True
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxunlearn.sharding import data_axes, data_parallel_size, shard_batch

__all__ = ["mesh_of", "placed_specs", "resolve_mesh", "check_batch_size", "place_batch", "replicate_unplaced"]


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh of the first leaf of ``tree`` that is a concrete array with a ``NamedSharding``, or None."""
    for x in jax.tree.leaves(tree):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and not isinstance(x, jax.core.Tracer) and isinstance(s.mesh, Mesh):
            return s.mesh
    return None


def placed_specs(tree: Any) -> Any:
    """The ``PartitionSpec`` of each leaf of ``tree``: its ``NamedSharding`` 's spec, ``P()``
    (replicated) for a leaf not on a mesh.

    >>> placed_specs({"w": jnp.ones(3)})
    {'w': P()}
    """
    return jax.tree.map(lambda x: x.sharding.spec if isinstance(getattr(x, "sharding", None), NamedSharding)
                        else P(), tree)


def resolve_mesh(mesh: Mesh | None, *trees: Any, ambient: bool = True) -> Mesh | None:
    """The mesh a run uses: ``mesh`` if given, else that of the first sharded leaf of ``trees``,
    else (``ambient``) the one set by ``jax.set_mesh``, else None.

    Raises:
      TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
    """
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jaxunlearn.sharding.make_mesh('fsdp=8')), "
                            f"got {type(mesh).__name__}")
        return mesh
    for tree in trees:
        found = mesh_of(tree)
        if found is not None:
            return found
    if ambient:
        current = jax.sharding.get_mesh()
        if not current.empty:
            return current
    return None


def check_batch_size(rows: int, mesh: Mesh | None, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` when ``rows`` is not a multiple of the mesh's data-parallel size."""
    if mesh is None:
        return
    dp = data_parallel_size(mesh)
    if rows % dp:
        raise ValueError(f"{what} {rows} is not divisible by the mesh's data-parallel size {dp} (axes "
                         f"{data_axes(mesh)} of mesh {dict(mesh.shape)}): choose a multiple of {dp}")


def place_batch(batch: Mapping[str, Any], mesh: Mesh | None, what: str = "batch size") -> Any:
    """``batch`` with its rows split over ``mesh``'s data-parallel axes (unchanged when ``mesh`` is None).

    Args:
      batch: dict of host arrays with a leading batch axis.
      mesh: the mesh, or None.
      what: how the error names the batch size.

    Returns:
      The batch as sharded ``jax.Array`` s (:func:`jaxunlearn.sharding.shard_batch`), or ``batch``.

    Raises:
      ValueError: the batch size is not a multiple of the data-parallel size (naming both).
    """
    if mesh is None:
        return batch
    check_batch_size(int(np.shape(next(iter(batch.values())))[0]), mesh, what)
    return shard_batch(batch, mesh)


def replicate_unplaced(tree: Any, mesh: Mesh | None) -> Any:
    """``tree`` with leaves already on a mesh kept as they are and the others replicated over ``mesh``."""
    if mesh is None:
        return tree
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: x if isinstance(getattr(x, "sharding", None), NamedSharding)
                        else jax.device_put(x, rep), tree)
