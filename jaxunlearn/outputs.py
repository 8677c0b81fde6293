"""Where results go: checked before any work, written whole or not at all, never over a user's files.

Every command that writes a results directory (``demo``, ``bench``) or a file (``eval``)
goes through this module:

- :func:`check_output_dir` / :func:`check_output_file` run *before* any work: a path that
  is a file where a directory is wanted (or the reverse), a parent that cannot be written
  (checked by creating and removing a probe, so it also holds for root and read-only
  mounts), and an existing non-empty directory that this tool did not write are refused
  with the path named. A directory counts as the tool's own when it holds the marker file
  :data:`MARKER` (written by :func:`staged_dir`).
- :func:`staged_dir` yields a fresh temporary sibling of the target; the caller writes
  into it; on success the marker is added and the sibling is swapped into place with two
  renames (an existing own directory is moved aside first and deleted last). A run that
  fails or is killed leaves the target as it was; what it wrote stays in the sibling
  (``.<name>.partial-*``), whose path the error names.
- :func:`write_json_atomic`: a JSON file through a temporary name and a rename.

Files and directories get the modes the user's umask gives (``tempfile`` would make
them 0600 / 0700).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

__all__ = ["MARKER", "check_output_dir", "check_output_file", "check_disjoint", "staged_dir",
           "write_json_atomic", "umask_mode"]

MARKER = ".jaxunlearn-output.json"
"""File that marks a results directory written by jaxunlearn (safe to replace with ``--overwrite``)."""


def _current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: the classic set-and-restore (not thread-safe)
    os.umask(mask)
    return mask


def umask_mode(is_dir: bool) -> int:
    """The mode ``os.makedirs`` (``0o777``) or ``open`` (``0o666``) gives under the current umask."""
    return (0o777 if is_dir else 0o666) & ~_current_umask()


def _probe_writable(parent: Path, what: str) -> None:
    """Create and remove a probe directory in ``parent`` (created if missing); raise naming ``what``."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=".jaxunlearn-probe-", dir=parent))
        probe.rmdir()
    except OSError as e:
        raise PermissionError(f"{what}: cannot write in '{parent}' ({e.strerror or e})") from None


def check_output_dir(path: str | os.PathLike, *, overwrite: bool, what: str = "results directory",
                     marker: str = MARKER) -> Path:
    """Check, before any work, that a results directory can be written at ``path``.

    Args:
      path: the target directory.
      overwrite: whether an existing directory written by jaxunlearn may be replaced.
      what: how messages name the path (e.g. ``"--out"``).
      marker: the file that shows a directory is replaceable output (:data:`MARKER`;
        ``"config.json"`` for a model checkpoint, which ``save_pretrained`` replaces whole).

    Returns:
      ``path`` as an absolute ``Path``.

    Raises:
      NotADirectoryError: ``path`` is a file.
      FileExistsError: ``path`` is a non-empty directory and ``overwrite`` is False, or it
        lacks :data:`MARKER` (the tool did not write it: never replaced).
      PermissionError: the parent directory cannot be written.
    """
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} '{path}' is a file, not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not (path / marker).is_file():
            raise FileExistsError(f"{what} '{path}' is not empty and was not written by jaxunlearn (no {marker}): "
                                  "refusing to replace it; choose another directory")
        if not overwrite:
            raise FileExistsError(f"{what} '{path}' exists (pass --overwrite to replace it)")
    _probe_writable(path.parent, what)
    return path


def check_output_file(path: str | os.PathLike, *, overwrite: bool, what: str = "output file") -> Path:
    """Check, before any work, that a file can be written at ``path``.

    Raises:
      IsADirectoryError: ``path`` is a directory.
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      PermissionError: its directory cannot be written.
    """
    path = Path(path).absolute()
    if path.is_dir():
        raise IsADirectoryError(f"{what} '{path}' is a directory; give a file name (e.g. {path / 'eval.json'})")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{what} '{path}' exists (pass --overwrite to replace it)")
    _probe_writable(path.parent, what)
    return path


def check_disjoint(**paths: str | os.PathLike | None) -> None:
    """Raise ``ValueError`` when two of the named paths are the same or one lies inside the other.

    Example: ``check_disjoint(**{"--out": out, "--resume-dir": resume})`` (replacing ``--out``
    at the end of a run would delete a resume directory inside it).
    """
    items = [(k, Path(v).absolute()) for k, v in paths.items() if v is not None]
    for i, (ka, a) in enumerate(items):
        for kb, b in items[i + 1:]:
            if a == b or a in b.parents or b in a.parents:
                raise ValueError(f"{ka} '{a}' and {kb} '{b}' overlap: they must be separate directories")


def _chmod_tree(root: Path) -> None:
    dmode, fmode = umask_mode(True), umask_mode(False)
    os.chmod(root, dmode)
    for d, dirs, files in os.walk(root):
        for n in dirs:
            os.chmod(os.path.join(d, n), dmode)
        for n in files:
            os.chmod(os.path.join(d, n), fmode)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, *, overwrite: bool, command: str,
               what: str = "results directory") -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write into; swap it into place on success.

    :func:`check_output_dir` runs first (so call this before the work, or call that
    function up front and this one when writing). On success :data:`MARKER` is written
    (``{"command": ..., "created": ...}``), modes follow the umask, an existing own
    directory at ``path`` is renamed aside, the sibling renamed to ``path``, and the old
    one deleted. On an exception ``path`` is untouched; the sibling, holding whatever was
    written, is kept if non-empty (the exception gets a note naming it) and removed if empty.

    Args:
      path: the final directory.
      overwrite: replace an existing directory written by jaxunlearn.
      command: recorded in the marker (e.g. ``"bench"``).
      what: how messages name the path.
    """
    path = check_output_dir(path, overwrite=overwrite, what=what)
    tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        if any(tmp.iterdir()):
            e.add_note(f"partial output kept in '{tmp}'")
        else:
            tmp.rmdir()
        raise
    marker = {"format": "jaxunlearn-output", "command": command,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (tmp / MARKER).write_text(json.dumps(marker) + "\n")
    _chmod_tree(tmp)
    check_output_dir(path, overwrite=overwrite, what=what)  # nothing appeared there meanwhile
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> str:
    """Write ``obj`` as JSON to ``path`` through a temporary file in the same directory, then rename.

    The directory is created if missing; the file gets the umask's mode. Returns ``path``.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.chmod(tmp, umask_mode(False))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
