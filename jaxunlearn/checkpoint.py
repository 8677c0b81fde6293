"""Orbax checkpoints of parameter pytrees and resumable run state.

Orbax writes every checkpoint into a temporary directory and renames it when
complete, so an interrupted save never leaves a half-written checkpoint under
the final name. Restores take an *abstract* target (``jax.ShapeDtypeStruct``
leaves, optionally with shardings) so arrays land on the intended devices.

Nothing with NaN or Inf is ever saved (:func:`check_saveable`): a diverged run
must not overwrite a good checkpoint. Run loops save through :func:`save_step`
and resume through :func:`restore_latest`, which steps back past a corrupt or
truncated newest step (moving it aside as ``<step>.corrupt``) instead of
failing with TensorStore's multi-page error.
"""

from __future__ import annotations

import itertools
import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxunlearn import tree as jt
from jaxunlearn.errors import reason

__all__ = [
    "save_pytree",
    "restore_pytree",
    "abstract_like",
    "run_manager",
    "latest_step",
    "check_saveable",
    "save_step",
    "restore_latest",
]

_CORRUPT_SUFFIX = ".corrupt"
_BARRIER_IDS = itertools.count()  # orbax barrier names must never repeat within a process


def abstract_like(target: Any) -> Any:
    """``ShapeDtypeStruct`` leaves (with the arrays' shardings) for a restore target."""

    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, target)


def check_saveable(tree: Any, what: str) -> None:
    """Refuse to save a pytree with NaN or Inf (a diverged state must never replace a good one).

    Args:
      tree: the pytree about to be saved (concrete arrays; non-float leaves are skipped).
      what: how to call it in the message, e.g. ``"checkpoint '/runs/a'"``.

    Raises:
      ValueError: naming ``what`` and the path of the first leaf with NaN or Inf.
    """
    try:
        jt.check_finite(tree, what)
    except FloatingPointError as e:
        raise ValueError(f"refusing to save: {e}") from None


def save_pytree(path: str | os.PathLike, tree: Any, *, overwrite: bool = False) -> str:
    """Save a pytree of arrays to ``path`` (an absolute directory is created).

    Args:
      path: target directory.
      tree: a non-empty pytree of finite arrays.
      overwrite: replace an existing checkpoint at ``path``.

    Returns:
      The absolute path.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      ValueError: the tree is empty or holds NaN/Inf (the first bad leaf is named); nothing is
        written and an existing checkpoint at ``path`` is left as it was.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"checkpoint '{path}' already exists (pass overwrite=True to replace it)")
    jt.check_nonempty(tree, "checkpoint state")
    check_saveable(tree, f"checkpoint '{path}'")
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

    Raises:
      FileNotFoundError: no directory at ``path``.
      ValueError: the tree does not match ``target``; the checkpoint's metadata or array files
        are corrupt, truncated or missing (``path`` and the first line of the reason are named).
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at '{path}'")
    ckptr = ocp.StandardCheckpointer()
    try:
        if target is None:
            try:
                return ckptr.restore(path)
            except Exception as e:
                why = reason(e, innermost=True)
                raise ValueError(f"checkpoint '{path}' is corrupt or incomplete ({why})") from None
        abstract = abstract_like(target)
        try:
            meta = ckptr.metadata(path)
        except Exception as e:
            raise ValueError(f"checkpoint '{path}' is corrupt or not an orbax checkpoint: cannot read its "
                             f"metadata ({reason(e, innermost=True)})") from None
        stored = getattr(meta, "item_metadata", meta)
        stored = getattr(stored, "tree", stored)
        if stored is None or not jt.leaves_with_paths(stored):
            # orbax logs a warning and returns no metadata when its files are unreadable
            raise ValueError(f"checkpoint '{path}' is corrupt or not an orbax checkpoint: its metadata "
                             "lists no arrays")
        _check_against_stored(abstract, stored, path)
        try:
            return ckptr.restore(path, abstract)
        except Exception as e:
            raise ValueError(f"checkpoint '{path}' is corrupt or incomplete ({reason(e, innermost=True)})") from None
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


def save_step(manager: ocp.CheckpointManager, step: int, state: Any) -> bool:
    """Save a run-loop ``state`` as ``step`` of ``manager``, refusing NaN/Inf.

    Call it where a loop would call ``manager.save(step, args=ocp.args.StandardSave(state))``: a
    diverged state raises instead of becoming the checkpoint the run resumes from.

    Args:
      manager: a ``CheckpointManager`` (e.g. from :func:`run_manager`).
      step: the step number to save under.
      state: the pytree of arrays (a train or unlearn state).

    Returns:
      What ``manager.save`` returns: True if a checkpoint was started (orbax skips steps not
      newer than its latest).

    Raises:
      ValueError: ``state`` holds NaN or Inf; the message names the step and the first bad
        leaf's path. Nothing is written.
    """
    check_saveable(state, f"run state at step {int(step)} (checkpoint directory '{manager.directory}')")
    return manager.save(step, args=ocp.args.StandardSave(state))


def _set_aside(directory: Any, step: int) -> str:
    """Rename ``directory/<step>`` to a free ``<step>.corrupt[-k]`` name (not a step name for orbax)."""
    src = os.path.join(os.fspath(directory), str(step))
    if not os.path.isdir(src):  # a manager with a custom step_name_format: leave its layout alone
        return f"(not moved: no directory {src})"
    dst = src + _CORRUPT_SUFFIX
    k = 1
    while os.path.exists(dst):
        dst = f"{src}{_CORRUPT_SUFFIX}-{k}"
        k += 1
    os.replace(src, dst)
    return dst


def restore_latest(manager: ocp.CheckpointManager, abstract_target: Any) -> tuple[int, Any] | None:
    """Restore the newest step of ``manager`` that reads back; step past corrupt ones.

    Resumable runs call ``restore_latest(mngr, abstract_like(state))``. If the newest step's
    files are corrupt or truncated (a crash mid-copy, a full disk, bit rot), one
    ``RuntimeWarning`` names the step directories that failed with the first line of each
    reason, the run resumes from the next older intact step, and the corrupt step directories
    are renamed ``<step>.corrupt`` so the manager saves those step numbers afresh (orbax
    silently skips saving a step that is not newer than its latest). If no step restores,
    nothing is renamed.

    Args:
      manager: a ``CheckpointManager`` (e.g. from :func:`run_manager`).
      abstract_target: the restore target, ``ShapeDtypeStruct`` leaves with shardings
        (:func:`abstract_like` of a fresh state).

    Returns:
      ``(step, state)`` for the newest step that restores, or None when there are no steps.

    Raises:
      ValueError: steps exist but none restores; the message names the checkpoint directory
        and each step with its reason (e.g. a target from a different model).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    failed: list[tuple[int, str]] = []
    for step in steps:
        try:
            state = manager.restore(step, args=ocp.args.StandardRestore(abstract_target))
        except Exception as e:  # TensorStore raises bare Exception subclasses
            failed.append((step, reason(e, innermost=True)))
            continue
        if failed:
            directory = os.fspath(manager.directory)
            if ocp.multihost.is_primary_host(0):
                moved = [_set_aside(directory, s) for s, _ in failed]
            else:
                moved = [os.path.join(directory, f"{s}{_CORRUPT_SUFFIX}") for s, _ in failed]
            ocp.multihost.sync_global_processes(f"jaxunlearn_restore_latest_{next(_BARRIER_IDS)}")
            manager.reload()
            lines = "; ".join(f"'{os.path.join(directory, str(s))}': {why}" for s, why in failed)
            warnings.warn(
                f"corrupt checkpoint step(s) {[s for s, _ in failed]} skipped ({lines}); resuming from "
                f"step {step}; the corrupt step(s) were moved to {moved}",
                RuntimeWarning,
                stacklevel=2,
            )
        return step, state
    detail = "; ".join(f"step {s} ('{os.path.join(os.fspath(manager.directory), str(s))}'): {why}"
                       for s, why in failed)
    raise ValueError(f"no checkpoint in '{manager.directory}' restores: {detail}")
