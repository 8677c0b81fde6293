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
import numpy as np
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
        _check_against_stored(abstract, stored, path)
        return ckptr.restore(path, abstract)
    finally:
        ckptr.close()


def _check_against_stored(abstract: Any, stored: Any, path: str) -> None:
    """Compare a target with a checkpoint's metadata by leaf path (``jaxunlearn.tree.path_str``) and shape.

    Paths, not containers: orbax stores every dict key as a string, so the integer layer keys of
    an nnx pure dict (``layers/0/...``) come back as ``'0'`` and would fail a treedef comparison.
    Raises ``ValueError`` naming the first missing, unexpected or differently shaped leaf (e.g. a
    checkpoint from a different model).
    """
    want = {p: tuple(np.shape(x)) for p, x in jt.leaves_with_paths(abstract)}
    have = {p: tuple(getattr(x, "shape", None) or np.shape(x)) for p, x in jt.leaves_with_paths(stored)}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise ValueError(f"checkpoint '{path}' does not match the target: leaves only in the target "
                         f"{missing[:5]}, only in the checkpoint {extra[:5]}")
    for p, shape in want.items():
        if have[p] != shape:
            raise ValueError(f"checkpoint '{path}' does not match the target: shape mismatch at '{p}': "
                             f"target {shape} vs checkpoint {have[p]}")


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
