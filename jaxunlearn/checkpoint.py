"""Orbax checkpoints of parameter pytrees and resumable run state.

Orbax writes every checkpoint into a temporary directory and renames it when
complete, so an interrupted save never leaves a half-written checkpoint under
the final name. Restores take an *abstract* target (``jax.ShapeDtypeStruct``
leaves, optionally with shardings) so arrays land on the intended devices.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxunlearn import tree as jt

__all__ = ["save_pytree", "restore_pytree", "abstract_like", "run_manager", "latest_step"]


def abstract_like(target: Any) -> Any:
    """``ShapeDtypeStruct`` leaves (with the arrays' shardings) for a restore target."""

    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, target)


def save_pytree(path: str | os.PathLike, tree: Any, *, overwrite: bool = False) -> str:
    """Save a pytree of arrays to ``path`` (an absolute directory is created).

    Raises ``FileExistsError`` if ``path`` exists and ``overwrite`` is False.
    Returns the absolute path.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"checkpoint '{path}' already exists (pass overwrite=True to replace it)")
    jt.check_nonempty(tree, "checkpoint state")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, tree, force=overwrite)
    ckptr.wait_until_finished()
    ckptr.close()
    return path


def restore_pytree(path: str | os.PathLike, target: Any = None) -> Any:
    """Restore a pytree saved by :func:`save_pytree`.

    Args:
      path: the checkpoint directory.
      target: a pytree of arrays or ``ShapeDtypeStruct`` with the expected
        structure, shapes and dtypes (and shardings). A checkpoint whose tree
        does not match raises ``ValueError`` naming the first mismatching path.

    Returns:
      The restored pytree.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at '{path}'")
    ckptr = ocp.StandardCheckpointer()
    try:
        if target is None:
            return ckptr.restore(path)
        abstract = abstract_like(target)
        meta = ckptr.metadata(path)
        stored = getattr(meta, "item_metadata", meta)
        stored = getattr(stored, "tree", stored)
        try:
            jt.check_same_shapes(abstract, stored, ("target", "checkpoint"))
        except ValueError as e:
            raise ValueError(f"checkpoint '{path}' does not match the target: {e}") from None
        return ckptr.restore(path, abstract)
    finally:
        ckptr.close()


def run_manager(directory: str | os.PathLike, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` for resumable runs (steps saved as ``directory/<step>``)."""
    directory = os.path.abspath(os.fspath(directory))
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(directory, options=opts)


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest completed step under ``directory``, or None."""
    if not os.path.isdir(directory):
        return None
    mngr = run_manager(directory)
    try:
        return mngr.latest_step()
    finally:
        mngr.close()
