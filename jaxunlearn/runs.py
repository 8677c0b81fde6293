"""Resumable runs: a run record that identifies the run, and the orbax save/restore loop around it.

Training (:func:`jaxunlearn.train.train`) and gradient unlearning
(:func:`jaxunlearn.methods.run_method`) keep their state in a checkpoint directory::

    <dir>/run_record.json    what identifies the run (kind, hyperparameters, digests)
    <dir>/<step>/            orbax checkpoints of the run state (the newest two)

The record holds SHA-256 digests of the *values* of the starting parameters and of the
data arrays, so a directory written by another run -- another model with the same
shapes, another split, another learning rate or seed -- is refused with the first
differing field named, instead of being resumed as if it were this run. Batches are a
pure function of ``(seed, step)``, so a run resumed on the same mesh ends bit-identical
to an uninterrupted one (on another mesh shape: equal to float tolerance, since the
reductions run in another order).

A corrupt newest step is reported and the previous intact one is used
(:func:`jaxunlearn.checkpoint.restore_latest`); a state with NaN/Inf is never saved
(:func:`jaxunlearn.checkpoint.save_step`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from jaxunlearn import checkpoint as ckpt
from jaxunlearn import tree as jt
from jaxunlearn.outputs import write_json_atomic
from jaxunlearn.multihost import gather_to_host, is_main_process

__all__ = ["RUN_RECORD_FILE", "array_digest", "params_digest", "check_run_record", "ResumableRun"]

RUN_RECORD_FILE = "run_record.json"
"""Name of the run record written beside the checkpoints of a resumable run."""


def array_digest(arrays: Mapping[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the keys, dtypes, shapes and bytes of host arrays.

    Args:
      arrays: name -> array-like (numpy or addressable ``jax.Array``).

    Returns:
      16 hex digits; equal iff (with overwhelming probability) keys, dtypes, shapes and values are.
    """
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[k]))
        h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def params_digest(params: Any) -> str:
    """:func:`array_digest` of a parameter pytree's leaves, keyed by their paths (values, not just shapes).

    Leaves spread over several processes are all-gathered first (a collective: every process
    of a multi-process run must call it).
    """
    leaves = jt.leaves_with_paths(gather_to_host(params))
    return array_digest({p: jax.device_get(x) for p, x in leaves})


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_run_record(directory: str | os.PathLike, record: Mapping[str, Any], *, has_checkpoints: bool) -> None:
    """Compare ``record`` with the one stored in ``directory``; write it when there is none.

    Args:
      directory: the run's checkpoint directory.
      record: JSON-compatible description of the run (nested dicts of scalars).
      has_checkpoints: whether ``directory`` already holds checkpoints.

    Raises:
      ValueError: the stored record differs (naming the first differing key, both values);
        checkpoints exist without a record; the stored record is not valid JSON (naming the file).
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, RUN_RECORD_FILE)
    try:
        record = json.loads(json.dumps(record, sort_keys=True))
    except TypeError as e:
        raise ValueError(f"the run record must be JSON-serialisable to be resumable: {e}") from None
    if not os.path.exists(path):
        if has_checkpoints:
            raise ValueError(f"checkpoint directory '{directory}' holds checkpoints but no {RUN_RECORD_FILE}: "
                             "it was not written by a jaxunlearn run; use another directory")
        if is_main_process():
            write_json_atomic(path, record)
        return
    try:
        with open(path) as f:
            stored = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"run record '{path}' is corrupt (not valid JSON: {e})") from None
    want, have = _flatten(record), _flatten(stored)
    first = [k for k in ("kind",) if k in want or k in have]  # another kind of run: say that, not a detail
    for key in first + sorted((set(want) | set(have)) - set(first)):
        if want.get(key, "<absent>") != have.get(key, "<absent>"):
            raise ValueError(f"checkpoint directory '{directory}' belongs to another run: "
                             f"'{key}' is {have.get(key, '<absent>')!r} there but {want.get(key, '<absent>')!r} "
                             "now; use another directory (or delete it) to start afresh")


class ResumableRun:
    """The orbax loop of a resumable run: restore, save every ``checkpoint_every`` steps and at the end.

    With ``directory=None`` every method is a no-op and :attr:`state` is the fresh state, so
    a loop is written once for both cases::

        with ResumableRun(ckpt_dir, record, fresh_state, checkpoint_every=k) as run:
            state = run.state
            for s in range(int(state.step), steps):
                state = step(state, batch_at(s))
                run.after_step(s + 1, state)
            run.finish(state)

    Args:
      directory: checkpoint directory (created), or None.
      record: the run record (:func:`check_run_record`).
      fresh_state: the initial state; restores take its structure, dtypes and shardings.
      checkpoint_every: steps between saves (0: only at :meth:`finish`).
    """

    def __init__(self, directory: str | os.PathLike | None, record: Mapping[str, Any], fresh_state: Any, *,
                 checkpoint_every: int = 0):
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
        self.every = int(checkpoint_every)
        self.state = fresh_state
        self.manager = None
        if directory is None:
            return
        directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise NotADirectoryError(f"checkpoint directory '{directory}' is a file")
        check_run_record(directory, record, has_checkpoints=ckpt.latest_step(directory) is not None)
        self.manager = ckpt.run_manager(directory)
        restored = ckpt.restore_latest(self.manager, ckpt.abstract_like(fresh_state))
        if restored is not None:
            self.state = restored[1]

    def after_step(self, step: int, state: Any) -> None:
        """Save ``state`` as ``step`` when it is a multiple of ``checkpoint_every``."""
        if self.manager is not None and self.every and step % self.every == 0:
            ckpt.save_step(self.manager, step, state)

    def finish(self, state: Any) -> None:
        """Save the final state (unless that step is already saved)."""
        if self.manager is not None and self.manager.latest_step() != int(state.step):
            ckpt.save_step(self.manager, int(state.step), state)

    def __enter__(self) -> "ResumableRun":
        return self

    def __exit__(self, *exc) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
