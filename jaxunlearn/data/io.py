"""Saving/loading the benchmark with its tokenizer, and reading TOFU-format files.

Nothing here reaches the network: benchmarks go through ``save_to_disk`` /
``load_from_disk`` and ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` on local
paths; TOFU files are parsed with ``json`` / ``pyarrow`` directly (no ``load_dataset``
builder, no cache directory).

A saved benchmark is a directory::

    <path>/benchmark.json    {"format": "jaxunlearn-benchmark", "version": 1, "splits": {...}}
    <path>/data/             DatasetDict.save_to_disk
    <path>/tokenizer/        tokenizer.save_pretrained

written into a temporary sibling directory and renamed into place, so an interrupted
save never leaves a half-written benchmark at ``path``.

TOFU (Maini et al., 2024) ships each split as ``<split>.json`` (JSON lines) or parquet:
``forget01.json``, ``retain99.json``, ``forget01_perturbed.json``,
``retain_perturbed.json``, ``real_authors_perturbed.json``, ... ; the ``*_perturbed``
splits carry the ``paraphrased_answer`` and ``perturbed_answer`` columns evaluation needs.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import transformers

__all__ = ["save_benchmark", "load_benchmark", "load_tofu", "TOFU_EVAL_COLUMNS"]

_FORMAT = "jaxunlearn-benchmark"
_VERSION = 1
_META = "benchmark.json"
_SUFFIXES = (".json", ".jsonl", ".parquet")
TOFU_EVAL_COLUMNS = ("paraphrased_answer", "perturbed_answer")


def save_benchmark(
    path: str | os.PathLike,
    dataset_dict: datasets.DatasetDict | Mapping[str, datasets.Dataset],
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    overwrite: bool = False,
) -> Path:
    """Saves a benchmark and its tokenizer to the directory ``path``, atomically.

    Args:
      path: target directory (its parent is created if needed).
      dataset_dict: split name -> ``datasets.Dataset`` (at least one split).
      tokenizer: a Hugging Face tokenizer (anything with ``save_pretrained``).
      overwrite: replace an existing directory at ``path``; otherwise that is an error.

    Returns:
      ``path`` as a ``Path``.
    """
    path = Path(path)
    if not isinstance(dataset_dict, Mapping) or not dataset_dict:
        raise ValueError("dataset_dict must be a non-empty mapping of split name -> Dataset")
    for name, ds in dataset_dict.items():
        if not isinstance(ds, datasets.Dataset):
            raise TypeError(f"split {name!r} is {type(ds).__name__}, expected datasets.Dataset")
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no save_pretrained")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        datasets.DatasetDict(dict(dataset_dict)).save_to_disk(str(tmp / "data"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {"format": _FORMAT, "version": _VERSION,
                "splits": {name: len(ds) for name, ds in dataset_dict.items()}}
        (tmp / _META).write_text(json.dumps(meta, indent=2) + "\n")
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_benchmark(path: str | os.PathLike) -> tuple[datasets.DatasetDict, transformers.PreTrainedTokenizerBase]:
    """Loads a benchmark written by ``save_benchmark``.

    Args:
      path: the directory given to ``save_benchmark``.

    Returns:
      ``(dataset_dict, tokenizer)``; the tokenizer comes back through ``AutoTokenizer``
      (class ``TokenizersBackend`` in transformers 5) with the same vocabulary and
      special-token ids.
    """
    path = Path(path)
    meta_file = path / _META
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved benchmark (no {_META})")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise ValueError(f"{meta_file}: unsupported format {meta.get('format')!r} version {meta.get('version')!r}")
    dd = datasets.load_from_disk(str(path / "data"))
    if not isinstance(dd, datasets.DatasetDict):
        raise ValueError(f"{path / 'data'} holds a single Dataset, expected a DatasetDict")
    sizes = {name: len(ds) for name, ds in dd.items()}
    if sizes != meta["splits"]:
        raise ValueError(f"{path}: splits on disk {sizes} differ from {_META} {meta['splits']}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    return dd, tokenizer


# --- TOFU ------------------------------------------------------------------------------------


def _read_json_rows(file: Path) -> list:
    text = file.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: invalid JSON ({e})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{lineno}: invalid JSON line ({e})") from None
    return rows


def _read_rows(file: Path) -> list:
    if file.suffix == ".parquet":
        return pq.read_table(file).to_pylist()
    return _read_json_rows(file)


def _validate(rows: list, source: str, required: Sequence[str]) -> None:
    if not rows:
        raise ValueError(f"{source}: the split is empty")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {i} is {type(row).__name__}, expected an object")
        for col in required:
            if col not in row or row[col] is None:
                raise ValueError(f"{source}: missing column {col!r} (row {i}; it has {sorted(row)})")
            value = row[col]
            if col == "perturbed_answer":
                ok = (isinstance(value, list) and value and all(isinstance(v, str) for v in value)) or (
                    isinstance(value, str))
            else:
                ok = isinstance(value, str)
            if not ok:
                raise ValueError(f"{source}: row {i} column {col!r} has {type(value).__name__} {value!r}")


def _split_files(directory: Path, split: str) -> list[Path]:
    for suffix in _SUFFIXES:
        f = directory / f"{split}{suffix}"
        if f.is_file():
            return [f]
    sub = directory / split
    if sub.is_dir():  # Hub parquet-conversion layout: <split>/train-00000-of-00001.parquet
        files = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix in _SUFFIXES)
        if files:
            return files
    return []


def _available_splits(directory: Path) -> list[str]:
    names = {p.stem for p in directory.iterdir() if p.is_file() and p.suffix in _SUFFIXES}
    names |= {p.name for p in directory.iterdir() if p.is_dir() and _split_files(directory, p.name)}
    return sorted(names)


def _load_split(files: list[Path], split: str, require_perturbed: bool | None) -> datasets.Dataset:
    rows = [r for f in files for r in _read_rows(f)]
    source = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
    need_eval = ("perturbed" in split) if require_perturbed is None else require_perturbed
    _validate(rows, source, ("question", "answer") + (TOFU_EVAL_COLUMNS if need_eval else ()))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return datasets.Dataset.from_dict({c: [r.get(c) for r in rows] for c in columns})


def load_tofu(
    path: str | os.PathLike,
    split: str | None = None,
    *,
    require_perturbed: bool | None = None,
) -> datasets.Dataset | datasets.DatasetDict:
    """Reads TOFU-format splits from local files and validates their columns.

    A split is ``<split>.json`` (JSON lines, or one JSON array), ``<split>.jsonl``,
    ``<split>.parquet``, or a directory ``<split>/`` of such files (concatenated in name
    order). Every row needs string ``question`` and ``answer``; splits that evaluation
    reads also need ``paraphrased_answer`` (string) and ``perturbed_answer`` (list of
    strings, or a string).

    Args:
      path: a split file, or a directory holding split files.
      split: with a directory, the split to read; ``None`` reads every split found.
        Ignored (must be None or the file's stem) when ``path`` is a file.
      require_perturbed: demand the evaluation columns; ``None`` = only for splits whose
        name contains ``"perturbed"`` (TOFU's convention).

    Returns:
      A ``datasets.Dataset`` for one split, or a ``datasets.DatasetDict`` of all splits
      when ``path`` is a directory and ``split`` is None.

    Raises:
      FileNotFoundError: no such file, or no file for ``split`` (the error lists the splits
        found). ValueError: an empty split, a missing column (named), a malformed row.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix not in _SUFFIXES:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected one of {_SUFFIXES}")
        if split is not None and split != path.stem:
            raise ValueError(f"split={split!r} does not match the file {path.name}")
        return _load_split([path], path.stem, require_perturbed)
    if not path.is_dir():
        raise FileNotFoundError(f"no TOFU file or directory at {path}")
    if split is not None:
        files = _split_files(path, split)
        if not files:
            tried = ", ".join(f"{split}{s}" for s in _SUFFIXES) + f", {split}/"
            raise FileNotFoundError(f"no split {split!r} in {path} (tried {tried}); "
                                    f"splits found: {_available_splits(path)}")
        return _load_split(files, split, require_perturbed)
    names = _available_splits(path)
    if not names:
        raise FileNotFoundError(f"no TOFU split files ({', '.join(_SUFFIXES)}) in {path}")
    return datasets.DatasetDict({n: _load_split(_split_files(path, n), n, require_perturbed) for n in names})
