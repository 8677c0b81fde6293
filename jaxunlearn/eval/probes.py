"""Probes: extra per-model evaluations a benchmark runs on every evaluated parameter set.

A probe is a function ``probe(params) -> {column: float}`` built once per benchmark (data
encoded, jitted passes compiled once) and called on the reference's, the target's and every
unlearned model's parameters; its numbers join that model's table row
(:func:`jaxunlearn.benchmark.compare_methods` ``probes=``). Three are here:

- :func:`relearn_probe` -- the relearning attack (:mod:`jaxunlearn.eval.relearn`): fine-tune on
  the forget rows of half the forget people, measure the other half. Columns
  ``relearn_p0`` (held-out forget answer probability before the attack), ``relearn_p`` (after)
  and ``relearn_rec`` = :func:`~jaxunlearn.eval.relearn.recovered_fraction`
  ``(p - p0) / (p_target - p0)``: the share of what unlearning removed from the held-out people
  that the attack brings back (0 none, 1 all; NaN for the target itself). The reference's row
  calibrates it: what a fine-tune on the attack people alone teaches about the held-out ones.
- :func:`overlap_probe` -- the BLUR-style overlap splits (:mod:`jaxunlearn.data.overlap`):
  for each split, the fact probability ``<split>_fp`` (``exp`` of minus the mean NLL of the
  tokens carrying the fact) and the fact accuracy ``<split>_fa`` (teacher-forced argmax on them).
- :func:`remind_probe` -- REMIND (:mod:`jaxunlearn.eval.remind`): ``remind_auc``, how well the
  input-loss-landscape features of the forget examples separate them from never-seen ones.

References:
  Hu, Fu, Wu, Smith, "Jogging the Memory of Unlearned LLMs Through Targeted Relearning Attacks",
  2024; Hu et al., "BLUR: A Benchmark for LLM Unlearning Robust to Forget-Retain Overlap", 2025;
  Cohen, Nemcovesky, Mendelson, "REMIND: Input Loss Landscapes Reveal Residual Memorization in
  Post-Unlearning LLMs", 2025.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import datasets
import jax
import numpy as np

from jaxunlearn.data import encode_split
from jaxunlearn.data.overlap import OVERLAP_COLUMNS, overlap_splits
from jaxunlearn.eval.relearn import BATCH_KEYS, RelearnConfig, recovered_fraction, relearn, split_for_relearning
from jaxunlearn.eval.remind import RemindConfig, embedding_neighbours, find_embedding, remind_evaluate
from jaxunlearn.eval.runner import evaluate_encoded

__all__ = ["Probe", "PROBES", "RELEARN_DATA", "RELEARN_DEFAULT", "RELEARN_CURVE", "REMIND_DEFAULT", "relearn_probe", "overlap_probe", "remind_probe",
           "fact_scores", "benchmark_probes"]

Probe = Callable[[Any], dict[str, float]]

# 10 AdamW steps at the demo's training learning rate / 3 on 8 rows of the attack people
RELEARN_DEFAULT = RelearnConfig(steps=10, learning_rate=1e-3, batch_size=8, fraction=0.5, eval_every=2)
#: the column of the held-out probability after ``s`` attack steps (the curve :func:`relearn_probe` records)
RELEARN_CURVE = "relearn_p_step{}"


def _mean_probability(apply_fn: Callable, params: Any, data: Mapping[str, np.ndarray], batch_size: int) -> float:
    return float(np.mean(evaluate_encoded(apply_fn, params, data, batch_size=batch_size)["probability"]))


def relearn_probe(apply_fn: Callable, forget: Mapping[str, np.ndarray], groups: Sequence[Any] | None,
                  target_params: Any, cfg: RelearnConfig = RELEARN_DEFAULT, *, batch_size: int = 64,
                  min_gap: float = 0.05, attack_source: Mapping[str, np.ndarray] | None = None) -> Probe:
    """The relearning attack as a probe (module docstring).

    The forget rows are split by :func:`~jaxunlearn.eval.relearn.split_for_relearning`
    (``cfg.fraction`` of the ``groups``, e.g. the people, with ``cfg.seed``); the probe runs
    :func:`~jaxunlearn.eval.relearn.relearn` on the attack rows and measures the mean answer
    probability of the held-out rows before and after ``cfg.steps`` steps.

    Args:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits``.
      forget: the encoded forget rows (``input_ids``, ``attention_mask``, ``loss_mask``).
      groups: one label per row (rows of a label stay on one side), or None (rows split alone).
      target_params: the model before unlearning (``p_target`` of ``relearn_rec``).
      cfg: the attack.
      batch_size: rows per evaluation call.
      attack_source: the rows the attacker fine-tunes on, row-aligned with ``forget`` (e.g. the same
        questions with their paraphrased answers); None: ``forget`` itself. Only the attack part's
        rows of it are used; the held-out part is always ``forget``'s.
      min_gap: ``relearn_rec`` is NaN when unlearning lowered the held-out probability by less than
        this (``p_target - p0 < min_gap``: nothing was forgotten to recover, and the ratio of two
        small differences would be noise).

    Returns:
      ``probe(params) -> {"relearn_p0", "relearn_p", "relearn_rec", "relearn_p_step<s>" ...}``, the
      last the held-out probability at every evaluated step ``s`` (0, ``cfg.eval_every``, ...,
      ``cfg.steps``: the attack's curve, :func:`jaxunlearn.results_table.plot_relearn`).

    Raises:
      KeyError: ``forget`` lacks a batch key. ValueError: fewer than two groups (rows).
    """
    for k in BATCH_KEYS:
        if k not in forget:
            raise KeyError(f"relearn_probe: the forget set lacks '{k}' (have {sorted(forget)})")
    n = len(forget["input_ids"])
    source = forget if attack_source is None else attack_source
    if len(source["input_ids"]) != n or any(k not in source for k in BATCH_KEYS):
        raise ValueError(f"relearn_probe: attack_source must hold {list(BATCH_KEYS)} for the {n} forget rows")
    attack_rows, held_rows = split_for_relearning(n, cfg.fraction, cfg.seed, groups)
    attack = {k: np.asarray(source[k])[attack_rows] for k in BATCH_KEYS}
    held = {k: np.asarray(forget[k])[held_rows] for k in BATCH_KEYS}
    p_target = _mean_probability(apply_fn, target_params, held, batch_size)

    def probe(params: Any) -> dict[str, float]:
        curve = relearn(apply_fn, params, attack, cfg,
                        lambda p: {"p": _mean_probability(apply_fn, p, held, batch_size)})
        p0, p1 = curve[0]["p"], curve[-1]["p"]
        rec = recovered_fraction(p0, p1, p_target) if p_target - p0 >= min_gap else float("nan")
        return {"relearn_p0": p0, "relearn_p": p1, "relearn_rec": rec,
                **{RELEARN_CURVE.format(c["step"]): c["p"] for c in curve}}

    return probe


def fact_scores(apply_fn: Callable, params: Any, data: Mapping[str, np.ndarray], *,
                batch_size: int = 64) -> dict[str, np.ndarray]:
    """Per row: ``fact_p = exp(-mean NLL over the fact tokens)`` and ``fact_acc`` (the share of
    fact tokens that are the argmax given the true prefix), from the encoded row's ``fact_mask``.

    Raises:
      KeyError: ``data`` has no ``fact_mask``.
    """
    if "fact_mask" not in data:
        raise KeyError(f"fact_scores needs a 'fact_mask' (encode with a fact column; have {sorted(data)})")
    on_facts = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"],
                "loss_mask": data["fact_mask"]}
    stats = evaluate_encoded(apply_fn, params, on_facts, batch_size=batch_size)
    return {"fact_p": stats["probability"], "fact_acc": stats["token_acc"]}


def overlap_probe(apply_fn: Callable, tokenizer, splits: Mapping[str, datasets.Dataset], *,
                  batch_size: int = 64, max_rows: int | None = None, seed: int = 0) -> Probe:
    """Fact probability and accuracy on each overlap split (module docstring).

    The splits (e.g. :func:`jaxunlearn.data.overlap.overlap_splits`) are encoded once, padded to
    one length (one compilation), with their ``fact`` column as the fact mask; a split longer than
    ``max_rows`` is a seeded subset of that many rows (None: all).

    Returns:
      ``probe(params) -> {"<split>_fp", "<split>_fa" for each split}``.

    Raises:
      ValueError: no splits. KeyError: a split without ``question`` / ``answer`` / ``fact``.
    """
    if not splits:
        raise ValueError("overlap_probe needs at least one split")
    for name, ds in splits.items():
        if "fact" not in ds.column_names:
            raise KeyError(f"overlap split {name!r} has no 'fact' column (columns: {ds.column_names})")
    splits = {name: ds if max_rows is None or len(ds) <= max_rows else
              ds.select(np.sort(np.random.default_rng(seed).permutation(len(ds))[:max_rows]))
              for name, ds in splits.items()}
    length = max(encode_split(tokenizer, ds, max_length=None)["input_ids"].shape[-1] for ds in splits.values())
    encoded = {name: encode_split(tokenizer, ds, max_length=length) for name, ds in splits.items()}

    def probe(params: Any) -> dict[str, float]:
        out = {}
        for name, data in encoded.items():
            s = fact_scores(apply_fn, params, data, batch_size=batch_size)
            out[f"{name}_fp"] = float(np.mean(s["fact_p"]))
            out[f"{name}_fa"] = float(np.mean(s["fact_acc"]))
        return out

    return probe


PROBES = ("relearn", "overlap", "remind")
#: what the relearning attacker fine-tunes on (:func:`benchmark_probes`)
RELEARN_DATA = ("forget", "paraphrase", "facts")
# the benchmark's overlap splits: at most this many rows each (the shared / unshared retain rows are
# most of the retain split)
OVERLAP_MAX_ROWS = 240
# the benchmark's REMIND: 8 variants (2 per strength level), up to 96 examples a side (AUC over 5 folds)
REMIND_DEFAULT = RemindConfig(num_variants=8)
REMIND_MAX_EXAMPLES = 96


def _subset(data: Mapping[str, np.ndarray], n: int, seed: int) -> dict[str, np.ndarray]:
    rows = np.arange(len(data["input_ids"]))
    if len(rows) > n:
        rows = np.sort(np.random.default_rng(seed).permutation(len(rows))[:n])
    return {k: np.asarray(data[k])[rows] for k in BATCH_KEYS}


def remind_probe(apply_fn: Callable, forget: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray],
                 neighbours: np.ndarray, *, cfg: RemindConfig = REMIND_DEFAULT,
                 max_examples: int = REMIND_MAX_EXAMPLES, seed: int = 0, batch_size: int = 16) -> Probe:
    """REMIND's detection AUC as a probe: :func:`jaxunlearn.eval.remind.remind_evaluate` of the
    forget rows against ``other`` (e.g. the never-trained holdout), at most ``max_examples`` of each
    (a seeded subset), every model on the same neighbourhoods (``neighbours``, one table, and the key
    of ``seed``). Column ``remind_auc``: 0.5 = the forget examples' input loss landscapes look like
    the unseen ones' (forgotten, as the reference never learnt them), 1 = fully detectable."""
    f, o = _subset(forget, max_examples, seed), _subset(other, max_examples, seed + 1)

    def probe(params: Any) -> dict[str, float]:
        res = remind_evaluate(apply_fn, params, f, o, key=jax.random.key(seed), cfg=cfg, batch_size=batch_size,
                              neighbours=neighbours, seed=seed)
        return {"remind_auc": float(res["auc"])}

    return probe


def benchmark_probes(data, apply_fn: Callable, target_params: Any, names: Sequence[str] = PROBES, *,
                     seed: int = 0, relearn_data: str = "forget",
                     relearn: RelearnConfig | None = None) -> tuple[dict[str, Probe], dict[str, str]]:
    """The named probes for a prepared benchmark (:class:`jaxunlearn.pipeline.PreparedData`).

    ``"relearn"``: :func:`relearn_probe` on the forget QA split's encoded rows; what the attacker
    fine-tunes on is ``relearn_data`` (:data:`RELEARN_DATA`, the attacks of Hu et al. 2024):
    ``"forget"`` the rows of a fraction of the forget people (grouped by the ``person`` column;
    with a single person, or none, by rows), ``"paraphrase"`` the same rows with their
    ``paraphrased_answer`` instead, ``"facts"`` related-but-different facts about the same people
    (grouped by the ``attribute`` column: the attack sees some attributes of every forget person,
    the held-out part asks the others); ``relearn``: the attack (default :data:`RELEARN_DEFAULT`
    with ``seed``); ``"overlap"``: :func:`overlap_probe` on
    :func:`jaxunlearn.data.overlap.overlap_splits` of the forget and retain splits (needs the
    ``person`` / ``attribute`` / ``fact`` columns); ``"remind"``: :func:`remind_probe` of the forget
    split against the holdout split, on the neighbour table of the target's input embedding.

    Returns:
      ``(probes, not_available)``: ``{name: probe}`` and ``{name: why}`` for each named probe the
      data cannot support (e.g. user data without a ``fact`` column).

    Raises:
      ValueError: an unknown probe name.
    """
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise ValueError(f"unknown probe(s) {unknown}; choose from {list(PROBES)}")
    fs, rs = data.forget_split, data.retain_split
    forget_ds = data.dataset[fs]
    probes: dict[str, Probe] = {}
    missing: dict[str, str] = {}
    if relearn_data not in RELEARN_DATA:
        raise ValueError(f"relearn_data must be one of {RELEARN_DATA}, got {relearn_data!r}")
    if "relearn" in names:
        column = "attribute" if relearn_data == "facts" else "person"
        groups = list(forget_ds[column]) if column in forget_ds.column_names else None
        if groups is not None and len(set(groups)) < 2:  # one subject: held-out facts of the same person
            groups = None
        need = {"facts": "attribute", "paraphrase": "paraphrased_answer"}.get(relearn_data)
        if len(forget_ds) < 2:
            missing["relearn"] = f"needs at least 2 forget rows, split {fs!r} has {len(forget_ds)}"
        elif need is not None and need not in forget_ds.column_names:
            missing["relearn"] = f"relearn_data={relearn_data!r} needs column {need!r} in split {fs!r}"
        else:
            cfg = dataclasses.replace(relearn or RELEARN_DEFAULT, seed=seed)
            source = None
            if relearn_data == "paraphrase":
                source = encode_split(data.tokenizer, forget_ds, max_length=None, answer_column="paraphrased_answer",
                                      fact_column=None, separator=getattr(data, "separator", None))
            probes["relearn"] = relearn_probe(apply_fn, data.encoded[fs], groups, target_params, cfg,
                                              attack_source=source)
    if "overlap" in names:
        lacking = sorted({c for s in (fs, rs) for c in OVERLAP_COLUMNS if c not in data.dataset[s].column_names})
        if lacking:
            missing["overlap"] = f"needs columns {lacking} in splits {fs!r} and {rs!r}"
        else:
            probes["overlap"] = overlap_probe(apply_fn, data.tokenizer, overlap_splits(data.dataset, fs, rs, seed=seed),
                                              max_rows=OVERLAP_MAX_ROWS, seed=seed)
    if "remind" in names:
        hs = data.holdout_split
        if hs is None:
            missing["remind"] = "needs a holdout split (never-trained rows: REMIND's negatives)"
        else:
            nb = embedding_neighbours(find_embedding(target_params), REMIND_DEFAULT.max_rank,
                                      special_ids=list(data.tokenizer.all_special_ids))
            probes["remind"] = remind_probe(apply_fn, data.encoded[fs], data.encoded[hs], nb, seed=seed)
    return probes, missing
