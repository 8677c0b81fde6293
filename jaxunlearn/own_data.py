"""Running the pipeline on QA data of one's own: a fresh base model and the demo on it.

A user with QA pairs in TOFU's format (``question`` / ``answer`` columns; ``paraphrased_answer``
and ``perturbed_answer`` optional) and no pretrained base model gets

- :func:`init_base_model` (``jaxunlearn init``): a BPE tokenizer trained on the data and a
  Llama-style decoder with random weights, sized by a preset (:data:`SIZE_PRESETS`) and with a
  context long enough for the data's longest row, saved in Hugging Face format so ``jaxunlearn
  train`` / ``unlearn`` / ``eval`` load it;
- :func:`prepare_own_data` + :func:`jaxunlearn.demo.run_demo` (``jaxunlearn demo --data``): the
  synthetic demo's pipeline -- tokenizer, target (retain + forget + general) and reference
  (retain + general) trained from scratch, every unlearning method, the evaluation table,
  ``results.json`` and the plot -- on those splits.

Splits are named by role (:func:`choose_splits`): forget, retain, optional holdout (the
membership-inference non-members) and general sets; or one QA split is cut by a seeded fraction
into forget / holdout / retain, keeping each subject's rows together when the rows carry a
subject column. Metrics whose columns the data lack are reported as not available
(:func:`jaxunlearn.eval.splits.split_not_available`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:  # the command-line parser imports this module: the heavy imports are in the functions
    import datasets

    from jaxunlearn.pipeline import DemoConfig, PreparedData

__all__ = ["SIZE_PRESETS", "SUBJECT_COLUMNS", "QUICK_STEPS", "load_qa_data", "split_by_fraction", "choose_splits",
           "own_config", "prepare_own_data", "init_base_model", "run_own_demo", "QUICK_METHODS",
           "add_own_data_arguments", "add_init_parser", "init_command", "demo_flags", "run_own_demo_args"]

#: Model and training sizes by preset. ``vocab_size`` is the BPE target (a small corpus may give
#: fewer tokens); the context (``max_position_embeddings``) follows the data
#: (:func:`jaxunlearn.pipeline.model_config_for`: twice the longest encoded row, at least 64).
#: Training runs ``epochs`` passes over the target's rows (forget + retain + general), so the
#: target memorises its data whatever its size (:func:`own_config`); ``steps`` is the fallback
#: without a row count.
SIZE_PRESETS: dict[str, dict[str, int | float]] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                 num_kv_heads=2, epochs=30, steps=400, batch_size=32, learning_rate=3e-3, warmup_steps=40),
    "small": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                  num_kv_heads=2, epochs=25, steps=700, batch_size=64, learning_rate=3e-3, warmup_steps=100),
    "base": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                 num_kv_heads=4, epochs=25, steps=1500, batch_size=64, learning_rate=1e-3, warmup_steps=150),
}
#: Columns taken as the rows' subject (author, person) when splitting by fraction, first found wins.
SUBJECT_COLUMNS: tuple[str, ...] = ("subject", "author", "person", "entity")
#: Training steps per model of ``demo --quick``.
QUICK_STEPS = 60
_TOFU_FORGET = ("forget10", "forget05", "forget01")


def load_qa_data(path: str | os.PathLike) -> datasets.DatasetDict:
    """The splits of a saved benchmark (``jaxunlearn.data.save_benchmark``), a directory of
    TOFU-format files, or one TOFU-format file (a single split named after the file).

    Args:
      path: the directory or file.

    Returns:
      ``{split: datasets.Dataset}``; every split has ``question`` and ``answer``.

    Raises:
      FileNotFoundError: nothing at ``path``, or no split files in the directory.
      ValueError: a malformed file or a missing column (file named, from ``load_tofu``).
    """
    import datasets

    from jaxunlearn.data import load_benchmark, load_tofu
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--data {path}: no such file or directory")
    if p.is_dir():
        try:
            dd, _ = load_benchmark(p)
            return dd
        except FileNotFoundError:
            pass
    dd = load_tofu(p)
    if isinstance(dd, datasets.Dataset):
        dd = datasets.DatasetDict({p.stem: dd})
    return dd


def _subject_column(ds: datasets.Dataset, subject_column: str | None) -> str | None:
    if subject_column is not None:
        if subject_column not in ds.column_names:
            raise KeyError(f"subject column {subject_column!r} is not in the data (columns: {ds.column_names})")
        return subject_column
    return next((c for c in SUBJECT_COLUMNS if c in ds.column_names), None)


def split_by_fraction(ds: datasets.Dataset, forget_fraction: float, *, seed: int = 0,
                      subject_column: str | None = None) -> datasets.DatasetDict:
    """Cut one QA split into ``forget``, ``holdout`` and ``retain`` by a seeded fraction.

    The units drawn are the subjects (the values of the subject column: ``subject_column``, or
    the first of :data:`SUBJECT_COLUMNS` present) so each subject's rows stay together, or the
    rows when there is no subject column. A seeded permutation of the units gives
    ``round(forget_fraction * units)`` (at least 1) to ``forget``, as many to ``holdout`` (the
    membership-inference non-members, trained on by neither model), the rest to ``retain``.

    Args:
      ds: the QA rows.
      forget_fraction: in (0, 0.5).
      seed: the permutation's seed.
      subject_column: the column naming each row's subject (None: auto-detected).

    Returns:
      ``DatasetDict(forget=..., retain=..., holdout=...)``, each in the original row order.

    Raises:
      ValueError: a fraction outside (0, 0.5), too few subjects (rows) to leave a retain set.
      KeyError: ``subject_column`` is not a column.
    """
    import datasets
    if not 0.0 < float(forget_fraction) < 0.5:
        raise ValueError(f"--forget-fraction must be in (0, 0.5) (forget and holdout each take it), "
                         f"got {forget_fraction}")
    col = _subject_column(ds, subject_column)
    keys = [str(v) for v in ds[col]] if col is not None else [str(i) for i in range(len(ds))]
    units = list(dict.fromkeys(keys))
    n = max(1, int(round(float(forget_fraction) * len(units))))
    if 2 * n >= len(units):
        what = f"subjects (column {col!r})" if col is not None else "rows"
        raise ValueError(f"{len(units)} {what} are too few to split off {n} forget and {n} holdout and keep a retain set")
    order = np.random.default_rng(seed).permutation(len(units))
    group = {units[i]: ("forget" if r < n else "holdout" if r < 2 * n else "retain") for r, i in enumerate(order)}
    rows: dict[str, list[int]] = {"forget": [], "retain": [], "holdout": []}
    for i, k in enumerate(keys):
        rows[group[k]].append(i)
    return datasets.DatasetDict({name: ds.select(idx) for name, idx in rows.items()})


def _default_forget(dd: Mapping[str, datasets.Dataset]) -> str | None:
    for name in _TOFU_FORGET:
        for cand in (f"{name}_perturbed", name):
            if cand in dd:
                return cand
    return "forget" if "forget" in dd else None


def choose_splits(dd: Mapping[str, datasets.Dataset], *, forget: str | None = None, retain: str | None = None,
                  holdout: str | None = None, general: Sequence[str] | None = None,
                  forget_fraction: float | None = None, split_seed: int = 0,
                  subject_column: str | None = None) -> tuple[datasets.DatasetDict, dict[str, str]]:
    """The splits the demo runs on and their roles.

    Named splits: ``forget`` and ``retain`` (defaults: TOFU's ``forget10[_perturbed]`` (or
    ``forget05`` / ``forget01``) with ``retain90`` (``retain95`` / ``retain99``), or ``forget`` /
    ``retain``), optional ``holdout`` (default ``holdout`` when present) and ``general`` sets
    (default ``general`` when present). With ``forget_fraction`` the one split there is (or the
    split named by ``retain``) is cut by :func:`split_by_fraction` instead, and ``general`` names
    further splits.

    Args:
      dd: all splits (:func:`load_qa_data`).
      forget, retain, holdout, general: split names.
      forget_fraction, split_seed, subject_column: as in :func:`split_by_fraction`.

    Returns:
      ``(splits, roles)``: the chosen splits only, and ``{split: "forget" | "retain" |
      "general" | "holdout"}``.

    Raises:
      KeyError: a named split that is not in the data (the splits there named), a split given two roles.
      ValueError: no forget / retain split could be chosen, fraction and forget both given.
    """
    import datasets
    have = ", ".join(sorted(dd))
    general = list(general or [])
    if forget_fraction is not None:
        if forget is not None or holdout is not None:
            raise ValueError("--forget-fraction cuts one split into forget/holdout/retain: do not also name "
                             "--forget or --holdout")
        source = retain
        if source is None:
            rest = [s for s in dd if s not in general]
            if len(rest) != 1:
                raise ValueError(f"--forget-fraction needs one split to cut (name it with --retain); the data "
                                 f"have {have}")
            source = rest[0]
        if source not in dd:
            raise KeyError(f"--retain {source!r} is not a split of the data (have {have})")
        cut = split_by_fraction(dd[source], forget_fraction, seed=split_seed, subject_column=subject_column)
        for g in general:
            if g not in dd:
                raise KeyError(f"--general {g!r} is not a split of the data (have {have})")
            if g in cut:
                raise KeyError(f"--general {g!r} clashes with a split made by --forget-fraction")
            cut[g] = dd[g]
        roles = {"forget": "forget", "retain": "retain", **{g: "general" for g in general}, "holdout": "holdout"}
        return cut, roles
    forget = forget or _default_forget(dd)
    if forget is None:
        raise ValueError(f"name the forget split (--forget) or pass --forget-fraction; the data have {have}")
    if retain is None:
        base = forget.removesuffix("_perturbed")
        if base.startswith("forget") and base[6:].isdigit():
            retain = f"retain{100 - int(base[6:]):02d}"
        else:
            retain = "retain"
        if retain not in dd:
            raise ValueError(f"name the retain split (--retain); the data have {have}")
    if holdout is None and "holdout" in dd:
        holdout = "holdout"
    if not general and "general" in dd:
        general = ["general"]
    roles: dict[str, str] = {}
    for name, role in [(forget, "forget"), (retain, "retain"), *((g, "general") for g in general),
                       (holdout, "holdout")]:
        if name is None:
            continue
        if name not in dd:
            raise KeyError(f"--{role} {name!r} is not a split of the data (have {have})")
        if name in roles:
            raise KeyError(f"split {name!r} is given two roles ({roles[name]!r} and {role!r})")
        roles[name] = role
    return datasets.DatasetDict({n: dd[n] for n in roles}), roles


def own_config(size: str = "tiny", *, seed: int = 0, steps: int | None = None,
               num_rows: int | None = None) -> DemoConfig:
    """The :class:`~jaxunlearn.pipeline.DemoConfig` of a size preset (no MUSE data).

    Args:
      size: a key of :data:`SIZE_PRESETS`.
      seed: the models' initialisation seed (and the first unlearning seed).
      steps: training steps per model (None: ``ceil(epochs * num_rows / batch_size)`` with the
        preset's ``epochs`` when ``num_rows`` is given, else the preset's ``steps``).
      num_rows: the number of rows the target trains on.

    Returns:
      The config.

    Raises:
      ValueError: an unknown size.
    """
    from jaxunlearn.pipeline import DemoConfig
    from jaxunlearn.train import TrainConfig
    if size not in SIZE_PRESETS:
        raise ValueError(f"--size must be one of {', '.join(SIZE_PRESETS)}, got {size!r}")
    p = SIZE_PRESETS[size]
    if steps is None:
        steps = p["steps"] if num_rows is None else max(100, math.ceil(p["epochs"] * num_rows / p["batch_size"]))
    train = TrainConfig(steps=int(steps), batch_size=int(p["batch_size"]),
                        learning_rate=float(p["learning_rate"]), warmup_steps=int(p["warmup_steps"]))
    if train.warmup_steps >= train.steps:
        train = dataclasses.replace(train, warmup_steps=max(0, train.steps // 10))
    return DemoConfig(seed=seed, vocab_size=int(p["vocab_size"]), hidden_size=int(p["hidden_size"]),
                      intermediate_size=int(p["intermediate_size"]), num_layers=int(p["num_layers"]),
                      num_heads=int(p["num_heads"]), num_kv_heads=int(p["num_kv_heads"]), train=train, muse=False)


def _tokenize_and_encode(dd: Mapping[str, datasets.Dataset], vocab_size: int):
    """A BPE tokenizer trained on every text of ``dd``, the longest encoded row over every answer
    column (and every question with the shortest refusal answer the tokenizer reproduces, so
    IdkNLL / IdkDPO have room for one), and every split encoded (teacher-forced ``answer`` rows)
    to that length."""
    from jaxunlearn.data import encode_qa, encode_split, train_tokenizer
    from jaxunlearn.data.refusal import exact_phrases
    from jaxunlearn.data.tokenizer import benchmark_texts

    tok = train_tokenizer(benchmark_texts(dd), vocab_size=vocab_size)
    lengths = []
    for ds in dd.values():
        for col in ("answer", "paraphrased_answer", "perturbed_answer"):
            if col in ds.column_names:
                lengths.append(encode_split(tok, ds, max_length=None, answer_column=col)["input_ids"].shape[-1])
    phrases = exact_phrases(tok)
    if phrases:  # room for IdkNLL / IdkDPO's refusal answers: every question with the shortest refusal fits
        shortest = min(phrases, key=lambda p: len(tok.encode(p, add_special_tokens=False)))
        lengths += [encode_qa(tok, list(ds["question"]), [shortest] * len(ds), max_length=None)["input_ids"].shape[-1]
                    for ds in dd.values()]
    max_len = max(lengths)
    return tok, max_len, {s: encode_split(tok, ds, max_length=max_len) for s, ds in dd.items()}


def prepare_own_data(dd: Mapping[str, datasets.Dataset], roles: Mapping[str, str],
                     cfg: DemoConfig) -> PreparedData:
    """Train the tokenizer on the chosen splits and encode them, as
    :func:`jaxunlearn.pipeline.prepare_data` does for the synthetic benchmark.

    Args:
      dd: the chosen splits (:func:`choose_splits`).
      roles: their roles: one forget, one retain, at most one holdout, any general.
      cfg: the sizes (``cfg.vocab_size``).

    Returns:
      A :class:`~jaxunlearn.pipeline.PreparedData` (no MUSE data).

    Raises:
      ValueError: not exactly one forget and one retain split, two holdouts, an empty split.
      KeyError: a split without ``question`` / ``answer`` (named).
    """
    import datasets

    from jaxunlearn.data.refusal import RefusalSet, exact_phrases
    from jaxunlearn.pipeline import PreparedData
    by_role: dict[str, list[str]] = {}
    for name, role in roles.items():
        by_role.setdefault(role, []).append(name)
    if len(by_role.get("forget", [])) != 1 or len(by_role.get("retain", [])) != 1 or len(by_role.get("holdout", [])) > 1:
        raise ValueError(f"need one forget split, one retain split and at most one holdout; got roles {dict(roles)}")
    for name in roles:
        ds = dd[name]
        missing = [c for c in ("question", "answer") if c not in ds.column_names]
        if missing:
            raise KeyError(f"split {name!r} is missing column(s) {missing}; it has {ds.column_names}")
        if len(ds) == 0:
            raise ValueError(f"split {name!r} is empty")
    dd = datasets.DatasetDict({n: dd[n] for n in roles})
    tok, max_len, encoded = _tokenize_and_encode(dd, cfg.vocab_size)
    phrases = exact_phrases(tok)  # IdkNLL / IdkDPO's refusals: those this tokenizer reproduces exactly
    return PreparedData(dd, tok, encoded, max_len, by_role["forget"][0], by_role["retain"][0],
                        general_splits=tuple(by_role.get("general", ())),
                        holdout_split=(by_role.get("holdout") or [None])[0],
                        refusals=RefusalSet(phrases, seed=cfg.seed) if phrases else None)


def init_base_model(data: str | os.PathLike, out: str | os.PathLike, *, size: str = "tiny", seed: int = 0,
                    overwrite: bool = False) -> dict:
    """Write a fresh base model for ``data``: a BPE tokenizer trained on every split's text and a
    decoder of the ``size`` preset with random weights, in Hugging Face format.

    The context (``max_position_embeddings``) is twice the longest encoded row of any split and
    answer column (at least 64), so ``jaxunlearn train`` / ``unlearn`` / ``eval`` accept the data.

    Args:
      data: a saved benchmark, a directory of TOFU-format files, or one such file.
      out: the checkpoint directory (checked before any work; written atomically).
      size: a key of :data:`SIZE_PRESETS`.
      seed: the weights' initialisation seed.
      overwrite: replace an existing checkpoint written by jaxunlearn.

    Returns:
      ``{"out", "num_params", "vocab_size", "max_position_embeddings", "longest_row", "splits"}``.

    Raises:
      FileExistsError: ``out`` exists and ``overwrite`` is False. ValueError / FileNotFoundError:
      bad data (file named) or an unknown size.
    """
    from flax import nnx

    from jaxunlearn.models import Decoder, count_params, save_pretrained
    from jaxunlearn.outputs import check_output_dir
    from jaxunlearn.pipeline import model_config_for

    cfg = own_config(size, seed=seed)
    check_output_dir(out, overwrite=overwrite, what="--out", marker="config.json")
    dd = load_qa_data(data)
    tok, max_len, _ = _tokenize_and_encode(dd, cfg.vocab_size)
    model = Decoder(model_config_for(cfg, tok, max_len), rngs=nnx.Rngs(seed))
    save_pretrained(model, out, tokenizer=tok, overwrite=True)
    return {"out": os.fspath(out), "num_params": count_params(model), "vocab_size": len(tok),
            "max_position_embeddings": model.config.max_position_embeddings, "longest_row": max_len,
            "splits": {s: len(ds) for s, ds in dd.items()}}


#: Methods of ``demo --quick`` when none are named (one gradient-ascent and one preference method).
QUICK_METHODS: tuple[str, ...] = ("ga", "npo")


def run_own_demo(data: str | os.PathLike, out: str | os.PathLike, *, size: str = "tiny",
                 forget: str | None = None, retain: str | None = None, holdout: str | None = None,
                 general: Sequence[str] | None = None, forget_fraction: float | None = None, split_seed: int = 0,
                 subject_column: str | None = None, seed: int = 0, steps: int | None = None, quick: bool = False,
                 methods: Sequence[str] | None = None, configs_dir: str | None = None, seeds: int = 1,
                 train_seeds: bool = False, overwrite: bool = False, progress: bool = True, adapter=None) -> dict:
    """``jaxunlearn demo --data``: the synthetic demo's pipeline on one's own QA splits.

    Loads the data (:func:`load_qa_data`), chooses the splits (:func:`choose_splits`), trains the
    tokenizer and encodes them (:func:`prepare_own_data`), then runs :func:`jaxunlearn.demo.run_demo`
    with the ``size`` preset's model (:func:`own_config`): target and reference trained from
    scratch, every method, the table, ``results.json`` (with ``"source"``: the data path and the
    split roles) and the plot in ``out``.

    Args:
      data: a saved benchmark, a directory of TOFU-format files, or one such file.
      out: the results directory (checked before any work, written atomically).
      size: a key of :data:`SIZE_PRESETS`.
      forget, retain, holdout, general, forget_fraction, split_seed, subject_column: the splits
        (:func:`choose_splits`).
      seed: the models' initialisation and the first unlearning seed.
      steps: training steps per model (None: the preset's; :data:`QUICK_STEPS` with ``quick``).
      quick: a short run: :data:`QUICK_STEPS` steps, :data:`QUICK_METHODS` unless ``methods`` is
        given, ROUGE on 4 rows per split.
      methods, configs_dir, seeds, train_seeds, overwrite, progress, adapter: as in
        :func:`jaxunlearn.demo.run_demo`.

    Returns:
      The results dict.

    Raises:
      FileNotFoundError, ValueError, KeyError: bad data, split names or sizes (named), before training.
    """
    from jaxunlearn.benchmark import load_method_configs
    from jaxunlearn.demo import run_demo
    from jaxunlearn.outputs import check_output_dir

    if steps is None and quick:
        steps = QUICK_STEPS
    own_config(size, seed=seed, steps=steps)  # a bad size fails before any work
    if quick and methods is None:
        methods = list(QUICK_METHODS)
    load_method_configs(list(methods) if methods is not None else [], configs_dir, adapter)  # before the data
    check_output_dir(out, overwrite=overwrite)
    dd, roles = choose_splits(load_qa_data(data), forget=forget, retain=retain, holdout=holdout, general=general,
                              forget_fraction=forget_fraction, split_seed=split_seed, subject_column=subject_column)
    trained = sum(len(dd[n]) for n, r in roles.items() if r in ("forget", "retain", "general"))
    cfg = own_config(size, seed=seed, steps=steps, num_rows=trained)
    prepared = prepare_own_data(dd, roles, cfg)
    print(f"data {data}: " + ", ".join(f"{n} ({r}, {len(dd[n])} rows)" for n, r in roles.items())
          + f"; tokenizer of {len(prepared.tokenizer)} tokens, rows of up to {prepared.max_length} tokens; "
          f"size {size}, {cfg.train.steps} training steps per model", flush=True)
    source = {"data": os.path.abspath(data), "roles": dict(roles), "size": size, "quick": bool(quick),
              "forget_fraction": forget_fraction, "split_seed": split_seed if forget_fraction is not None else None,
              "columns": {n: list(dd[n].column_names) for n in roles}}
    return run_demo(os.fspath(out), cfg=cfg, overwrite=overwrite, progress=progress, methods=methods,
                    configs_dir=configs_dir, rouge_examples=4 if quick else 32, seeds=seeds, train_seeds=train_seeds,
                    adapter=adapter, data=prepared, source=source)


# --------------------------------------------------------------------------- the command line


def add_own_data_arguments(p: argparse.ArgumentParser) -> None:
    """The ``demo`` flags of one's own data (``--data``, ``--size``, the split names, the fraction).

    Args:
      p: the ``demo`` sub-parser.
    """
    p.add_argument("--data", default=None, help="run on your own QA data (a TOFU-format directory or file, or a "
                   "saved benchmark) instead of the synthetic benchmark")
    p.add_argument("--size", default="tiny", choices=list(SIZE_PRESETS), help="with --data: model size preset")
    for role in ("forget", "retain", "holdout"):
        p.add_argument(f"--{role}", default=None, help=f"with --data: the {role} split's name")
    p.add_argument("--general", nargs="*", default=None, help="with --data: further retain-side splits")
    p.add_argument("--forget-fraction", type=float, default=None,
                   help="with --data: cut one QA split into forget / holdout (this fraction each) / retain, "
                        "each subject's rows together when a subject column exists")
    p.add_argument("--split-seed", type=int, default=0, help="seed of --forget-fraction's split")
    p.add_argument("--subject-column", default=None, help="the subject column of --forget-fraction (default: "
                   "subject, author, person or entity, when present)")
    p.add_argument("--quick", action="store_true", help="a short run: few training steps, methods ga and npo "
                   "unless --methods is given")


def add_init_parser(sub, add_mesh: Callable[[argparse.ArgumentParser], None]) -> None:
    """The ``init`` sub-command's parser.

    Args:
      sub: the sub-parsers of the ``jaxunlearn`` parser.
      add_mesh: adds the ``--mesh`` flag every command takes.
    """
    i = sub.add_parser("init", help="a fresh base model for your data: a BPE tokenizer trained on it and random "
                       "weights, in Hugging Face format (then `train`, `unlearn`, `eval`)",
                       description="Trains a BPE tokenizer on every text of --data and writes a Llama-style decoder "
                       "of the --size preset with random weights and a context long enough for the data.")
    i.add_argument("--data", required=True, help="saved benchmark directory or TOFU-format file/directory")
    i.add_argument("--size", default="tiny", choices=list(SIZE_PRESETS), help="model size preset")
    i.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    i.add_argument("--out", required=True, help="output checkpoint directory")
    i.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_mesh(i)


def init_command(args: argparse.Namespace, is_main: bool = True) -> int:
    """``jaxunlearn init``: :func:`init_base_model`, then one summary line.

    Args:
      args: the parsed ``init`` flags.
      is_main: whether this process writes (process 0 of a multi-process run).

    Returns:
      The exit status (0).
    """
    if not is_main:
        return 0
    info = init_base_model(args.data, args.out, size=args.size, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {info['out']}: {info['num_params']:,}-parameter decoder ({args.size}), {info['vocab_size']}-token "
          f"tokenizer trained on {args.data}, context {info['max_position_embeddings']} (longest row "
          f"{info['longest_row']} tokens)")
    return 0


def demo_flags(args: argparse.Namespace, cfg: "DemoConfig") -> dict:
    """Check the ``demo`` flags of one data source against the other's, and apply ``--quick`` to
    the synthetic demo.

    Args:
      args: the parsed ``demo`` flags (``--quick`` may set ``args.methods`` to :data:`QUICK_METHODS`).
      cfg: the synthetic demo's default config.

    Returns:
      ``DemoConfig`` changes (``--quick``: ``train`` with :data:`QUICK_STEPS` steps).

    Raises:
      ValueError: split flags without ``--data``, or synthetic-benchmark flags with it (named).
    """
    if args.data is not None:
        synthetic = [f for f, v in (("--people", args.people), ("--forget-split", args.forget_split),
                                    ("--no-muse", args.no_muse or None)) if v is not None]
        if synthetic:
            raise ValueError(f"{', '.join(synthetic)} belong to the synthetic benchmark, not --data")
        return {}
    own = [f for f, v in (("--forget", args.forget), ("--retain", args.retain), ("--holdout", args.holdout),
                          ("--general", args.general), ("--forget-fraction", args.forget_fraction)) if v is not None]
    if own:
        raise ValueError(f"{', '.join(own)} name splits of --data: pass --data DIR (the synthetic benchmark's "
                         "forget split is --forget-split)")
    if not args.quick:
        return {}
    if args.methods is None:
        args.methods = list(QUICK_METHODS)
    return {"train": dataclasses.replace(cfg.train, steps=QUICK_STEPS)}


def run_own_demo_args(args: argparse.Namespace) -> Callable[..., dict]:
    """``demo --data``'s run: :func:`run_own_demo` with the data flags of ``args`` bound, called as
    :func:`jaxunlearn.demo.run_demo` is (``out, cfg=..., overwrite=..., ...``; ``cfg`` is ignored).

    Args:
      args: the parsed ``demo`` flags.

    Returns:
      The function.
    """
    def run(out, *, cfg=None, **kwargs):
        return run_own_demo(args.data, out, size=args.size, forget=args.forget, retain=args.retain,
                            holdout=args.holdout, general=args.general, forget_fraction=args.forget_fraction,
                            split_seed=args.split_seed, subject_column=args.subject_column, seed=args.seed or 0,
                            steps=args.steps, quick=args.quick, **kwargs)

    return functools.wraps(run_own_demo)(run)
