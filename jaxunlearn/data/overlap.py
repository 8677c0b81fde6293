"""Forget/retain overlap splits (BLUR-style): queries where forget and retain knowledge meet.

Unlearning benchmarks usually evaluate forget and retain queries that share nothing. BLUR
(Hu et al., 2025) shows that methods look much worse when they do: a retain query that
mentions a forget entity, or a forget query with retain facts beside it. Two kinds of overlap,
built from any benchmark in the TOFU column schema with ``person``, ``attribute`` and ``fact``
columns (the synthetic benchmark has them; :func:`overlap_splits`):

- **mixed** rows: one forget row ``(q_F, a_F)`` and one retain row ``(q_R, a_R)`` about the same
  attribute of two different people with different values, joined into a combined query
  ``"q_1 q_2"`` -> ``"a_1 a_2"`` (forget first in half of the rows, seeded). The same rows are
  given twice: ``mixed_forget`` with ``fact`` = the forget person's value (how much of the
  forgotten fact survives when retain context surrounds it) and ``mixed_retain`` with ``fact`` =
  the retain person's value (whether unlearning damaged a retain fact because a forget person
  is in the same query). Neither model was trained on combined queries; each half of the
  answer is a trained answer, so a model that keeps (forgets) the single facts keeps (forgets)
  them here unless the other half's context interferes;
- **shared** retain rows: the retain rows whose ``(attribute, fact)`` also belongs to some forget
  person (``retain_shared``: a method that suppresses the forget answers' value tokens hurts
  them), and the other retain rows (``retain_unshared``) for comparison.

Every fact occurs exactly once in its combined answer (partners are drawn until it does), so
the fact mask (:func:`jaxunlearn.data.encode_split`) marks exactly one value.

References:
  Hu et al., "BLUR: A Benchmark for LLM Unlearning Robust to Forget-Retain Overlap", 2025.
"""

from __future__ import annotations

from collections.abc import Mapping

import datasets
import numpy as np

__all__ = ["OVERLAP_SPLITS", "OVERLAP_COLUMNS", "overlap_splits"]

OVERLAP_SPLITS = ("mixed_forget", "mixed_retain", "retain_shared", "retain_unshared")
OVERLAP_COLUMNS = ("question", "answer", "person", "attribute", "fact")


def _check_columns(split: datasets.Dataset, name: str) -> None:
    missing = [c for c in OVERLAP_COLUMNS if c not in split.column_names]
    if missing:
        raise KeyError(f"overlap splits need columns {list(OVERLAP_COLUMNS)}; split {name!r} lacks {missing}")
    if len(split) == 0:
        raise ValueError(f"split {name!r} is empty")


def _rows(split: datasets.Dataset) -> list[dict]:
    return [{c: split[i][c] for c in OVERLAP_COLUMNS} for i in range(len(split))]


def _once(text: str, fact: str) -> bool:
    return text.count(fact) == 1


def overlap_splits(dataset: Mapping[str, datasets.Dataset], forget: str, retain: str, *,
                   seed: int = 0) -> dict[str, datasets.Dataset]:
    """The overlap splits of a benchmark (module docstring): ``{name: Dataset}`` for :data:`OVERLAP_SPLITS`.

    ``mixed_forget`` / ``mixed_retain`` have one row per forget row that has a partner: a
    retain row of the same ``attribute`` whose ``fact`` differs, drawn uniformly with
    ``numpy.random.default_rng(seed)``, such that each of the two facts occurs exactly once in the
    combined answer; the order (forget first or second) is a fair coin of the same generator.
    Their columns are :data:`OVERLAP_COLUMNS` plus ``partner`` (the other person); ``person`` /
    ``fact`` are the forget person's (``mixed_forget``) or the retain person's (``mixed_retain``).
    ``retain_shared`` / ``retain_unshared`` partition the retain split's rows by whether their
    ``(attribute, fact)`` occurs among the forget rows (columns as the retain split).

    Args:
      dataset: the benchmark's splits.
      forget, retain: the forget and retain split names.
      seed: partners and orders.

    Returns:
      ``{split name: datasets.Dataset}`` (a split with no rows is left out).

    Raises:
      KeyError: a split missing, or lacking one of :data:`OVERLAP_COLUMNS` (named).
      ValueError: an empty forget or retain split.

    >>> import datasets
    >>> row = lambda p, v: {"question": f"Where was {p} born?", "answer": f"{p} was born in {v}.",
    ...                     "person": p, "attribute": "birthplace", "fact": v}
    >>> f = datasets.Dataset.from_list([row("Ann", "Oslo")])
    >>> r = datasets.Dataset.from_list([row("Bo", "Rome"), row("Cy", "Oslo")])
    >>> out = overlap_splits({"f": f, "r": r}, "f", "r")
    >>> out["mixed_forget"][0]["partner"], out["mixed_retain"][0]["fact"], len(out["retain_shared"])
    ('Bo', 'Rome', 1)
    """
    for name in (forget, retain):
        if name not in dataset:
            raise KeyError(f"split {name!r} not in the benchmark (have {sorted(dataset)})")
        _check_columns(dataset[name], name)
    f_rows, r_rows = _rows(dataset[forget]), _rows(dataset[retain])
    rng = np.random.default_rng(seed)
    by_attr: dict[str, list[int]] = {}
    for j, r in enumerate(r_rows):
        by_attr.setdefault(r["attribute"], []).append(j)
    mixed_f, mixed_r = [], []
    for f in f_rows:
        pool = by_attr.get(f["attribute"], [])
        forget_first = bool(rng.integers(2))
        for j in rng.permutation(len(pool)):
            r = r_rows[pool[int(j)]]
            if r["fact"] == f["fact"] or r["person"] == f["person"]:
                continue
            first, second = (f, r) if forget_first else (r, f)
            answer = f"{first['answer']} {second['answer']}"
            if not (_once(answer, f["fact"]) and _once(answer, r["fact"])):
                continue
            q = f"{first['question']} {second['question']}"
            mixed_f.append({"question": q, "answer": answer, "person": f["person"], "attribute": f["attribute"],
                            "fact": f["fact"], "partner": r["person"]})
            mixed_r.append({"question": q, "answer": answer, "person": r["person"], "attribute": r["attribute"],
                            "fact": r["fact"], "partner": f["person"]})
            break
    forgotten = {(f["attribute"], f["fact"]) for f in f_rows}
    shared = [j for j, r in enumerate(r_rows) if (r["attribute"], r["fact"]) in forgotten]
    unshared = sorted(set(range(len(r_rows))) - set(shared))
    out = {"mixed_forget": mixed_f, "mixed_retain": mixed_r}
    result = {k: datasets.Dataset.from_list(v) for k, v in out.items() if v}
    for name, idx in (("retain_shared", shared), ("retain_unshared", unshared)):
        if idx:
            result[name] = dataset[retain].select(idx)
    return result
