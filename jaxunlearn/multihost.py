"""Multi-process runs: joining the distributed runtime, who writes, global batches from local rows.

- :func:`initialize` wraps ``jax.distributed.initialize()`` (a no-op for a single process);
- :func:`is_main_process`: whether this process writes results, logs and plots (process 0);
- :func:`process_local_batch` assembles a global batch from each process's own rows
  (``jax.make_array_from_process_local_data``);
- :func:`gather_to_host` makes arrays spread over several processes readable on every host
  (an all-gather: every process must call it).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxunlearn.sharding import check_batch_rows, batch_sharding, data_parallel_size

PyTree = Any

__all__ = ["initialize", "is_main_process", "process_local_batch", "gather_to_host"]


def process_local_batch(local_batch: PyTree, mesh: Mesh) -> PyTree:
    """Assemble a global batch from each process's own rows (multi-host data loading).

    Process ``i`` passes the rows it loaded; the global batch is their concatenation in
    process order, sharded by :func:`batch_sharding` (``jax.make_array_from_process_local_data``).
    With one process this is :func:`shard_batch`.

    Args:
      local_batch: pytree of host arrays; leading axis = this process's rows.
      mesh: the global mesh.

    Returns:
      Global ``jax.Array`` s of ``process_count * local rows`` rows.

    Raises:
      ValueError: as :func:`shard_batch`, for the local rows against this process's
        share of the batch shards.
    """
    per = max(1, data_parallel_size(mesh) // jax.process_count())
    check_batch_rows(local_batch, per, "process_local_batch")
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, **kwargs) -> bool:
    """Start the JAX distributed runtime (``jax.distributed.initialize``) when there is one to join.

    Call it first thing in a multi-host program (before any other JAX call). It is a
    no-op returning False when already initialised (returns True then), when
    ``num_processes == 1``, or when it is called without arguments outside a cluster JAX
    can detect (no ``JAX_COORDINATOR_ADDRESS``, Slurm, Open MPI or TPU pod): a single process.
    On CPU the cross-process collectives are JAX's default, gloo
    (``jax_cpu_collectives_implementation``).

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator service.
      num_processes: number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      **kwargs: passed to ``jax.distributed.initialize`` (``local_device_ids``,
        ``initialization_timeout``, ...).

    Returns:
      Whether the distributed runtime is (now) initialised.

    Raises:
      ValueError / RuntimeError: from ``jax.distributed.initialize`` when arguments were
        given (e.g. after the backend is already in use).
    """
    if jax.distributed.is_initialized():
        return True
    if num_processes == 1:
        return False
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if not explicit and "JAX_COORDINATOR_ADDRESS" not in os.environ and _backend_started():
        return False  # this process already computes on its own: a single-process run
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    except ValueError as e:
        if explicit or "coordinator_address" not in str(e):
            raise
        return False  # nothing to join: a single process
    return True


def _backend_started() -> bool:
    """Whether the XLA backend is already in use (then ``jax.distributed`` can no longer start)."""
    from jax._src import xla_bridge  # no public equivalent in jax 0.10

    return xla_bridge.backends_are_initialized()


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes results, logs and plots."""
    return jax.process_index() == 0


def gather_to_host(tree: PyTree) -> PyTree:
    """``tree`` with every leaf readable on this host: arrays spread over several processes are
    all-gathered (``multihost_utils.process_allgather``; a collective: every process calls it);
    a tree of fully addressable arrays is returned as is."""
    if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
