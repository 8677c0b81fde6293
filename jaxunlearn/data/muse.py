"""MUSE-format data: a reader for local files, a writer, and the passage encoding.

MUSE (Shi et al., 2024) ships its corpora (``muse-bench/MUSE-News``, ``muse-bench/MUSE-Books``)
as Hugging Face configs of splits. The evaluation reads, by config:

- ``knowmem``: ``forget_qa``, ``retain_qa`` (the questions scored) and ``forget_qa_icl``,
  ``retain_qa_icl`` (the in-context examples put before every question), rows
  ``{"question": str, "answer": str}``;
- ``verbmem``: ``forget``, rows ``{"prompt": str, "gt": str}`` (the first part of a forget
  passage and its true continuation);
- ``privleak``: ``forget``, ``retain``, ``holdout``, rows ``{"text": str}`` (whole passages;
  ``holdout`` was never trained on);
- ``raw`` (training text, optional here): ``forget``, ``retain1``, ``retain2``, ``holdout``,
  rows ``{"text": str}``.

On disk a split is ``<root>/<config>/<split>.json`` (a JSON array: of objects, or for the text
configs of plain strings, as the reference repository's ``load_data.py`` writes them),
``<split>.jsonl`` (one object or string per line), ``<split>.parquet``, Hub shards
``<split>-00000-of-00001.parquet``, or a directory ``<split>/`` of such files. Older Hub
revisions name the retain QA ``retain2_qa`` / ``retain2_qa_icl``; both names are read.

Files are untrusted input: a missing split, an unreadable file, a row that is not an object
(or string), a missing or non-string field raise an error naming the file, the row and the key.

References:
  Shi, Lee, Huang, Malladi, Zhao, Holtzman, Liu, Zettlemoyer, Smith, Zhang, "MUSE: Machine
  Unlearning Six-Way Evaluation for Language Models", 2024 (``swj0419/muse_bench``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np

from jaxunlearn.data.io import read_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["MUSE_SPLITS", "MUSE_RAW_SPLITS", "MuseData", "string_features", "load_muse", "save_muse",
           "encode_passages", "encode_passage_windows"]

#: ``MuseData`` field -> (config directory, split name(s) tried in order, columns).
MUSE_SPLITS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "forget_qa": ("knowmem", ("forget_qa",), ("question", "answer")),
    "forget_qa_icl": ("knowmem", ("forget_qa_icl",), ("question", "answer")),
    "retain_qa": ("knowmem", ("retain_qa", "retain2_qa"), ("question", "answer")),
    "retain_qa_icl": ("knowmem", ("retain_qa_icl", "retain2_qa_icl"), ("question", "answer")),
    "verbmem_forget": ("verbmem", ("forget",), ("prompt", "gt")),
    "privleak_forget": ("privleak", ("forget",), ("text",)),
    "privleak_holdout": ("privleak", ("holdout",), ("text",)),
    "privleak_retain": ("privleak", ("retain",), ("text",)),
}
#: Splits of the ``raw`` config (training text), read when present.
MUSE_RAW_SPLITS: tuple[str, ...] = ("forget", "retain1", "retain2", "holdout")
_OPTIONAL = ("privleak_retain",)
_MAY_BE_EMPTY = ("forget_qa_icl", "retain_qa_icl")  # zero-shot KnowMem
_SUFFIXES = (".json", ".jsonl", ".parquet")


def string_features(columns: Sequence[str]) -> datasets.Features:
    """``datasets.Features`` of string columns (so an empty split keeps its column types)."""
    return datasets.Features({c: datasets.Value("string") for c in columns})


def _check_dataset(name: str, ds, columns: Sequence[str], *, allow_empty: bool = False) -> None:
    if not isinstance(ds, datasets.Dataset):
        raise TypeError(f"MuseData.{name} is {type(ds).__name__}, expected a datasets.Dataset")
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise KeyError(f"MuseData.{name} is missing column(s) {missing}; it has {ds.column_names}")
    if len(ds) == 0 and not allow_empty:
        raise ValueError(f"MuseData.{name} is empty")
    for c in columns:
        for i, v in enumerate(ds[c]):
            if not isinstance(v, str):
                raise ValueError(f"MuseData.{name} row {i} column {c!r} is {type(v).__name__}, expected str")


@dataclasses.dataclass(frozen=True)
class MuseData:
    """The MUSE evaluation sets (and optionally the training text) of one corpus.

    Attributes:
      forget_qa, forget_qa_icl, retain_qa, retain_qa_icl: ``question`` / ``answer`` datasets
        (KnowMem: the scored questions and the in-context examples; the latter may be empty).
      verbmem_forget: ``prompt`` / ``gt`` dataset (VerbMem).
      privleak_forget, privleak_holdout: ``text`` datasets of whole passages (PrivLeak: members
        vs never-seen non-members).
      privleak_retain: ``text`` dataset (retain passages; not needed by PrivLeak), or ``None``.
      raw: ``{split: text dataset}``, the training corpus (``forget``, ``retain1``, ``retain2``,
        ``holdout``), possibly empty.

    Every dataset is checked on construction: the columns present, non-empty, strings.
    """

    forget_qa: datasets.Dataset
    forget_qa_icl: datasets.Dataset
    retain_qa: datasets.Dataset
    retain_qa_icl: datasets.Dataset
    verbmem_forget: datasets.Dataset
    privleak_forget: datasets.Dataset
    privleak_holdout: datasets.Dataset
    privleak_retain: datasets.Dataset | None = None
    raw: Mapping[str, datasets.Dataset] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name, (_, _, columns) in MUSE_SPLITS.items():
            ds = getattr(self, name)
            if ds is None and name in _OPTIONAL:
                continue
            _check_dataset(name, ds, columns, allow_empty=name in _MAY_BE_EMPTY)
        if not isinstance(self.raw, Mapping):
            raise TypeError(f"MuseData.raw must map split names to datasets, got {type(self.raw).__name__}")
        for split, ds in self.raw.items():
            _check_dataset(f"raw[{split!r}]", ds, ("text",))
        object.__setattr__(self, "raw", dict(self.raw))


# --------------------------------------------------------------------------- reading


def _split_files(directory: Path, split: str) -> list[Path]:
    for suffix in _SUFFIXES:
        f = directory / f"{split}{suffix}"
        if f.is_file():
            return [f]
    shards = sorted(directory.glob(f"{split}-*-of-*.parquet"))
    if shards:
        return shards
    sub = directory / split
    if sub.is_dir():
        files = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix in _SUFFIXES)
        if files:
            return files
    return []


def _rows_to_dataset(files: list[Path], columns: Sequence[str], allow_empty: bool = False) -> datasets.Dataset:
    out: dict[str, list[str]] = {c: [] for c in columns}
    text_only = tuple(columns) == ("text",)
    for file in files:
        rows = read_rows(file)
        for i, row in enumerate(rows):
            if isinstance(row, str) and text_only:
                out["text"].append(row)
                continue
            if not isinstance(row, dict):
                want = "an object or a string" if text_only else "an object"
                raise ValueError(f"{file}: row {i} is a {type(row).__name__}, expected {want} "
                                 f"with key(s) {list(columns)}")
            for c in columns:
                if c not in row or row[c] is None:
                    raise ValueError(f"{file}: row {i} has no key {c!r} (it has {sorted(row)})")
                if not isinstance(row[c], str):
                    raise ValueError(f"{file}: row {i} key {c!r} is a {type(row[c]).__name__}, expected a string")
                out[c].append(row[c])
    if not out[columns[0]] and not allow_empty:
        where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
        raise ValueError(f"{where}: the split is empty")
    return datasets.Dataset.from_dict(out, features=string_features(columns))


def _load_split(root: Path, config: str, names: Sequence[str], columns: Sequence[str],
                allow_empty: bool = False) -> datasets.Dataset | None:
    directory = root / config
    for name in names:
        files = _split_files(directory, name) if directory.is_dir() else []
        if files:
            return _rows_to_dataset(files, columns, allow_empty)
    return None


def load_muse(path: str | os.PathLike, *, raw: bool = True) -> MuseData:
    """Reads a MUSE corpus from local files (see the module docstring for the layout).

    Args:
      path: the corpus root, holding ``knowmem/``, ``verbmem/``, ``privleak/`` (and ``raw/``).
      raw: also read the ``raw`` training splits that are present.

    Returns:
      A :class:`MuseData`.

    Raises:
      FileNotFoundError: no directory at ``path``, or a required split is missing (named, with
        the file names tried). ValueError: an unreadable or malformed file, an empty split, a
        row without a required key or with a non-string value (file, row and key named).

    >>> import tempfile
    >>> from jaxunlearn.data import generate_benchmark
    >>> from jaxunlearn.data.synthetic_muse import generate_muse_benchmark
    >>> data = generate_muse_benchmark(generate_benchmark(num_people=20, num_general=0), num_icl=2)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_muse(data, d)
    ...     back = load_muse(d)
    >>> back.forget_qa["answer"] == data.forget_qa["answer"], sorted(back.raw)
    (True, ['forget', 'holdout', 'retain1', 'retain2'])
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no MUSE corpus directory at {root}")
    parts: dict[str, datasets.Dataset | None] = {}
    for field, (config, names, columns) in MUSE_SPLITS.items():
        ds = _load_split(root, config, names, columns, allow_empty=field in _MAY_BE_EMPTY)
        if ds is None and field not in _OPTIONAL:
            tried = ", ".join(f"{config}/{n}{{{','.join(_SUFFIXES)}}}" for n in names)
            raise FileNotFoundError(f"{root}: no MUSE split {config}/{names[0]} for {field} (tried {tried}, "
                                    f"{config}/{names[0]}-*-of-*.parquet and {config}/{names[0]}/)")
        parts[field] = ds
    raw_parts = {}
    if raw:
        for split in MUSE_RAW_SPLITS:
            ds = _load_split(root, "raw", (split,), ("text",))
            if ds is not None:
                raw_parts[split] = ds
    return MuseData(**parts, raw=raw_parts)


def save_muse(data: MuseData, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Writes ``data`` in the reference repository's local layout (what :func:`load_muse` reads).

    ``<path>/knowmem/{forget_qa,forget_qa_icl,retain_qa,retain_qa_icl}.json`` (arrays of
    ``{"question", "answer"}``), ``<path>/verbmem/forget.json`` (``{"prompt", "gt"}``),
    ``<path>/privleak/{forget,holdout[,retain]}.json`` and ``<path>/raw/<split>.json`` (arrays of
    strings), all UTF-8 JSON.

    Args:
      data: the corpus.
      path: a directory (created).
      overwrite: replace existing files; otherwise an existing MUSE file is an error.

    Raises:
      FileExistsError: a file would be replaced and ``overwrite`` is False.
    """
    if not isinstance(data, MuseData):
        raise TypeError(f"data must be a MuseData, got {type(data).__name__}")
    root = Path(path)
    payload: dict[Path, list] = {}
    for field, (config, names, columns) in MUSE_SPLITS.items():
        ds = getattr(data, field)
        if ds is None:
            continue
        rows = list(ds["text"]) if columns == ("text",) else [{c: r[c] for c in columns} for r in ds]
        payload[root / config / f"{names[0]}.json"] = rows
    for split, ds in data.raw.items():
        payload[root / "raw" / f"{split}.json"] = list(ds["text"])
    if not overwrite:
        existing = [str(f) for f in payload if f.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} exists; pass overwrite=True to replace it")
    for file, rows in payload.items():
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")


# --------------------------------------------------------------------------- encoding


def _special_ids(tokenizer, roles: Sequence[str]) -> dict[str, int]:
    ids = {}
    for role in roles:
        tid = getattr(tokenizer, role + "_id", None)
        if tid is None:
            raise ValueError(f"tokenizer has no {role} (needed to encode passages)")
        ids[role] = int(tid)
    return ids


def _passage_tokens(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The text tokens of each passage (no special tokens); an empty or non-string text is an error."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: nothing to encode")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
    body = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for i, b in enumerate(body):
        if not b:
            raise ValueError(f"texts[{i}] has no tokens (empty passage)")
    return [list(b) for b in body]


def _pack(rows: list[list[int]], length: int, pad: int) -> dict[str, np.ndarray]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``loss_mask`` (1 after the first token) / ``lengths``."""
    n = len(rows)
    input_ids = np.full((n, length), pad, np.int32)
    attention_mask = np.zeros((n, length), np.int32)
    loss_mask = np.zeros((n, length), np.float32)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = r
        attention_mask[i, :len(r)] = 1
        loss_mask[i, 1:len(r)] = 1.0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "lengths": np.asarray([len(r) for r in rows], np.int32)}


def encode_passage_windows(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int,
    add_eos: bool = True,
) -> dict[str, np.ndarray]:
    """Passages cut into consecutive token windows that fit ``max_length``: ``[BOS] w_j``, every
    window token scored.

    With ``x_1 .. x_n`` a passage's text tokens (and ``x_{n+1} = EOS`` with ``add_eos``) and
    ``W = max_length - 1``, window ``j = 0, 1, ...`` holds ``x_{jW+1} .. x_{min((j+1)W, n')}``:
    ``ceil(n' / W)`` windows per passage, in order, passages in order. This is how MUSE's
    unlearning runs feed a corpus (its token stream cut into ``max_len`` chunks, no overlap),
    here per passage and with the BOS first, so that the windows take the padded length of other
    rows (e.g. QA rows) and join them in one set (:func:`jaxunlearn.pipeline.unlearning_sets`).
    A window's first token is predicted from the BOS alone, without the passage before it.

    Args:
      tokenizer: with ``bos`` / ``pad`` (and ``eos``) tokens.
      texts: N passages.
      max_length: the windows' padded length T (>= 2).
      add_eos: end each passage's last window with the EOS.

    Returns:
      ``input_ids`` int32 (M, T), ``attention_mask`` int32 (M, T), ``loss_mask`` float32 (M, T)
      (1 on every token after the BOS), ``lengths`` int32 (M,), ``passage`` int32 (M,) (the
      passage each window comes from).

    >>> from jaxunlearn.data import train_tokenizer
    >>> tok = train_tokenizer(["Kalo was born in Dunmere."], vocab_size=40, min_frequency=1)
    >>> enc = encode_passage_windows(tok, ["Kalo was born."], max_length=5)  # 5 tokens + EOS
    >>> enc["passage"].tolist(), enc["lengths"].tolist()
    ([0, 0], [5, 3])
    """
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (the BOS and a token), got {max_length!r}")
    ids = _special_ids(tokenizer, ("bos_token", "pad_token") + (("eos_token",) if add_eos else ()))
    width = int(max_length) - 1
    rows, owner = [], []
    for i, body in enumerate(_passage_tokens(tokenizer, texts)):
        body = body + ([ids["eos_token"]] if add_eos else [])
        for start in range(0, len(body), width):
            rows.append([ids["bos_token"], *body[start:start + width]])
            owner.append(i)
    out = _pack(rows, int(max_length), ids["pad_token"])
    out["passage"] = np.asarray(owner, np.int32)
    return out


def encode_passages(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    max_tokens: int | None = None,
    add_eos: bool = False,
) -> dict[str, np.ndarray]:
    """Encodes whole passages ``[BOS] text [EOS?]``, right-padded, every text token scored.

    The BOS first, as MUSE's Llama tokenizer adds it (``tokenizer.encode(text)``). Batch
    convention of ``jaxunlearn.losses``: ``loss_mask`` is 1 on every token after the BOS (the
    text tokens, and the EOS with ``add_eos``), so ``answer_loss`` on these batches is the
    language-modelling loss on the passages (training), and Min-k over the ``loss_mask`` is
    MUSE's Min-k over the whole passage (evaluation, without EOS).

    Args:
      tokenizer: a Hugging Face tokenizer with ``bos``, ``pad`` (and ``eos``) tokens.
      texts: N passages.
      max_length: padded length T; ``None`` = the longest row. A longer row is an error.
      max_tokens: keep only the first ``max_tokens`` text tokens of each passage (``None``:
        all; open-unlearning's MUSE configs cut at 2048).
      add_eos: append the EOS (for training rows).

    Returns:
      ``input_ids`` int32 (N, T), ``attention_mask`` int32 (N, T), ``loss_mask`` float32
      (N, T), ``lengths`` int32 (N,) (real tokens, BOS included).

    >>> from jaxunlearn.data import train_tokenizer
    >>> tok = train_tokenizer(["Kalo was born in Dunmere."], vocab_size=40, min_frequency=1)
    >>> enc = encode_passages(tok, ["Kalo was born.", "Kalo."])
    >>> enc["input_ids"].shape, enc["loss_mask"][1].tolist()
    ((2, 6), [0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    ids = _special_ids(tokenizer, ("bos_token", "pad_token") + (("eos_token",) if add_eos else ()))
    rows = []
    for b in _passage_tokens(tokenizer, texts):
        b = b[:max_tokens] if max_tokens is not None else b
        rows.append([ids["bos_token"], *b] + ([ids["eos_token"]] if add_eos else []))
    length = max(len(r) for r in rows) if max_length is None else int(max_length)
    for i, r in enumerate(rows):
        if len(r) > length:
            raise ValueError(f"passage {i} needs {len(r)} tokens > max_length={length}; raise max_length "
                             "or cut the passages with max_tokens")
    return _pack(rows, length, ids["pad_token"])
