"""Worker subprocesses the suite starts as soon as it is collected, so they run beside the tests.

The compile workers (XLA:TPU, XLA:GPU) and the two multihost processes each take a minute or more
and use about one core; started at collection time (``tests/conftest.py``) they overlap with the
in-process tests instead of running after them. A test module declares its jobs in a module-level
``BACKGROUND = {name: launcher}``, where ``launcher(workdir) -> [(argv, env), ...]`` gives the
processes of the job (their output files go under ``workdir``); its fixture calls
:func:`wait` (which starts the job itself when nothing started it, e.g. a module run alone).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

Launcher = Callable[[Path], list]


class Finished(NamedTuple):
    """A finished job: each process's exit code and log text, and the job's working directory."""

    codes: list
    logs: list
    workdir: Path


_jobs: dict[str, tuple[list, list, Path, float]] = {}


def start(name: str, launcher: Launcher) -> None:
    """Start job ``name`` unless it is running or done."""
    if name in _jobs:
        return
    workdir = Path(tempfile.mkdtemp(prefix=f"jaxunlearn-bg-{name}-"))
    procs, logs = [], []
    for i, (argv, env) in enumerate(launcher(workdir)):
        log = workdir / f"proc{i}.log"
        with open(log, "w") as f:
            procs.append(subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT))
        logs.append(log)
    _jobs[name] = (procs, logs, workdir, time.monotonic())


def wait(name: str, launcher: Launcher, timeout: float) -> Finished:
    """Wait for job ``name`` (started now if it was not) at most ``timeout`` seconds from its start;
    processes still running then are killed (their exit code is None)."""
    start(name, launcher)
    procs, logs, workdir, t0 = _jobs[name]
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, timeout - (time.monotonic() - t0))))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes.append(None)
    return Finished(codes, [log.read_text(errors="replace") for log in logs], workdir)


def stop_all() -> None:
    """Kill every job still running (the session ends, e.g. after ``-x``) and remove the working
    directories (a failing test has already shown the logs)."""
    for procs, _, workdir, _ in _jobs.values():
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    _jobs.clear()
