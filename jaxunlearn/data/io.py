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

Files on disk are untrusted input: tokenizers load with ``trust_remote_code=False`` (an
``auto_map`` naming Python code is never executed, nor prompted for), and a missing or
corrupt file inside a saved benchmark, a non-UTF-8 JSON file or an unreadable parquet file
raises ``ValueError`` naming that file. ``load_benchmark`` raises ``FileNotFoundError`` only
when ``benchmark.json`` itself is absent (callers use that to try the TOFU reader instead).

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
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import transformers

from jaxunlearn.errors import reason

__all__ = ["save_benchmark", "load_benchmark", "load_tofu", "load_tokenizer", "read_json", "read_rows", "TOFU_EVAL_COLUMNS"]

_FORMAT = "jaxunlearn-benchmark"
_VERSION = 1
_META = "benchmark.json"
_SUFFIXES = (".json", ".jsonl", ".parquet")
TOFU_EVAL_COLUMNS = ("paraphrased_answer", "perturbed_answer")
# JSON files of a saved tokenizer that AutoTokenizer may read (checked when loading fails)
_TOKENIZER_JSON = ("tokenizer.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "config.json")


def _decode_utf8(raw: bytes, file: Path) -> str:
    """``raw`` as text; ``ValueError`` naming the file, byte offset and line if it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{file} is not valid UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start} "
                         f"(line {line})") from None


def read_json(file: str | os.PathLike) -> Any:
    """Reads a UTF-8 JSON file, naming the file in every error.

    Args:
      file: path of the JSON file.

    Returns:
      The decoded value (any JSON type; callers check the shape they expect).

    Raises:
      FileNotFoundError: no such file.
      ValueError: ``"<file> is not valid UTF-8: byte 0x.. at offset N (line L)"`` or
        ``"<file> is corrupt (invalid JSON: ...)"``.
    """
    file = Path(file)
    text = _decode_utf8(file.read_bytes(), file)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is corrupt (invalid JSON: {e})") from None


def _json_object(file: Path) -> dict:
    value = read_json(file)
    if not isinstance(value, dict):
        raise ValueError(f"{file} is corrupt (expected a JSON object, got {type(value).__name__})")
    return value


def _tokenizer_failure(path: Path, exc: BaseException) -> ValueError:
    """The error to raise when ``AutoTokenizer`` failed on ``path``: names the first bad file found."""
    from tokenizers import Tokenizer

    for name in _TOKENIZER_JSON:
        f = path / name
        if not f.is_file():
            continue
        try:
            _json_object(f)
        except ValueError as e:
            return e
        if name == "tokenizer.json":
            try:
                Tokenizer.from_file(str(f))
            except Exception as e:  # the Rust deserialiser raises plain Exception
                return ValueError(f"{f} is corrupt ({reason(e)})")
    files = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    return ValueError(f"cannot load the tokenizer in {path} (files {files}): {type(exc).__name__}: {reason(exc)}")


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """Loads a tokenizer saved with ``save_pretrained`` from a local directory, never running its code.

    ``AutoTokenizer`` runs offline with ``trust_remote_code=False``: an ``auto_map`` in
    ``tokenizer_config.json`` is ignored when a built-in class fits, and refused otherwise;
    no prompt is ever shown.

    Args:
      path: the directory (``tokenizer.json``, ``tokenizer_config.json``, ...).

    Returns:
      The tokenizer (class ``TokenizersBackend`` for fast tokenizers in transformers 5).

    Raises:
      FileNotFoundError: ``path`` is not a directory.
      ValueError: a tokenizer file is not UTF-8, not valid JSON or not a valid tokenizer (the
        file is named); the tokenizer needs custom code (named, never run); any other
        loading failure (the directory is named).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    cfg_file = path / "tokenizer_config.json"
    tok_cfg = _json_object(cfg_file) if cfg_file.is_file() else {}
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        if isinstance(e, ValueError) and "trust_remote_code" in str(e):
            auto_map = tok_cfg.get("auto_map")
            where = cfg_file if auto_map is not None else path
            raise ValueError(
                f"{where} asks for custom tokenizer code (auto_map {auto_map!r}): code from a model or "
                "benchmark directory is never run (trust_remote_code=False)"
            ) from None
        raise _tokenizer_failure(path, e) from None


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
      (class ``TokenizersBackend`` in transformers 5, never running code from the directory)
      with the same vocabulary and special-token ids.

    Raises:
      FileNotFoundError: only when ``path/benchmark.json`` does not exist (not a saved benchmark).
      ValueError: anything else wrong in a directory that has ``benchmark.json``, naming the
        missing or corrupt file: ``benchmark.json`` itself, ``data/dataset_dict.json``, a split's
        ``state.json`` / ``dataset_info.json`` / Arrow file, the tokenizer files.
    """
    path = Path(path)
    meta_file = path / _META
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved benchmark (no {_META})")
    meta = _json_object(meta_file)
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise ValueError(f"{meta_file}: unsupported format {meta.get('format')!r} version {meta.get('version')!r}")
    splits = meta.get("splits")
    if (not isinstance(splits, dict) or not splits
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in splits.values())):
        raise ValueError(f"{meta_file} is corrupt ('splits' must map split names to row counts, got {splits!r})")
    dd = _load_saved_splits(path / "data")
    sizes = {name: len(ds) for name, ds in dd.items()}
    if sizes != splits:
        raise ValueError(f"{path}: splits on disk {sizes} differ from {_META} {splits}")
    tok_dir = path / "tokenizer"
    if not tok_dir.is_dir():
        raise ValueError(f"benchmark {path} is incomplete: its tokenizer directory {tok_dir} is missing")
    return dd, load_tokenizer(tok_dir)


def _load_saved_splits(data_dir: Path) -> datasets.DatasetDict:
    """``load_from_disk(data_dir)``; on failure a ``ValueError`` naming the missing or corrupt file."""
    if not data_dir.is_dir():
        raise ValueError(f"benchmark data directory {data_dir} is missing")
    try:
        dd = datasets.load_from_disk(str(data_dir))
    except Exception as e:
        raise _saved_splits_failure(data_dir, e) from None
    if not isinstance(dd, datasets.DatasetDict):
        raise ValueError(f"{data_dir} holds a single Dataset, expected a DatasetDict")
    return dd


def _saved_splits_failure(data_dir: Path, exc: BaseException) -> ValueError:
    """Finds which file of a ``DatasetDict.save_to_disk`` directory broke ``load_from_disk``."""
    cfg = datasets.config
    try:
        dd_file = data_dir / cfg.DATASETDICT_JSON_FILENAME
        if not dd_file.is_file():
            return ValueError(f"{dd_file} is missing (the benchmark's data directory is incomplete)")
        names = _json_object(dd_file).get("splits")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return ValueError(f"{dd_file} is corrupt ('splits' must be a list of names, got {names!r})")
        for name in names:
            split_dir = data_dir / name
            for meta_name in (cfg.DATASET_STATE_JSON_FILENAME, cfg.DATASET_INFO_FILENAME):
                if not (split_dir / meta_name).is_file():
                    return ValueError(f"{split_dir / meta_name} is missing (split {name!r} is incomplete)")
                _json_object(split_dir / meta_name)
            state_file = split_dir / cfg.DATASET_STATE_JSON_FILENAME
            entries = _json_object(state_file).get("_data_files")
            if not isinstance(entries, list) or not all(
                    isinstance(d, dict) and isinstance(d.get("filename"), str) for d in entries):
                return ValueError(f"{state_file} is corrupt ('_data_files' must list {{'filename': ...}} "
                                  f"objects, got {entries!r})")
            for entry in entries:
                arrow = split_dir / entry["filename"]
                if not arrow.is_file():
                    return ValueError(f"{arrow} is missing (listed in {state_file})")
                try:
                    with pa.memory_map(str(arrow)) as source:
                        pa.ipc.open_stream(source).read_all()
                except Exception as e:
                    return ValueError(f"{arrow} is corrupt ({type(e).__name__}: {reason(e)})")
    except ValueError as e:  # from _json_object: names its file
        return e
    return ValueError(f"cannot load the benchmark data in {data_dir}: {type(exc).__name__}: {reason(exc)}")


# --- TOFU ------------------------------------------------------------------------------------


def _read_json_rows(file: Path) -> list:
    text = _decode_utf8(file.read_bytes(), file).removeprefix("\ufeff")
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


def read_rows(file: Path) -> list:
    """The rows of one data file: a parquet table, a JSON array, or JSON lines (also in a ``.json``
    file, TOFU's habit; UTF-8, a BOM allowed). Raises ``ValueError`` naming the file (and the line)
    when it cannot be read."""
    file = Path(file)
    if file.suffix == ".parquet":
        try:
            return pq.read_table(file).to_pylist()
        except (pa.ArrowException, OSError) as e:  # ArrowInvalid: bad magic bytes, truncated footer
            raise ValueError(f"{file} is corrupt (not a readable parquet file: {reason(e)})") from None
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
    rows = [r for f in files for r in read_rows(f)]
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
        found). ValueError: an empty split, a missing column (named), a malformed row, a
        JSON file that is not UTF-8 (file, byte offset and line named) or not JSON (file and
        line named), a corrupt parquet file (named).
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
