"""MUSE-shaped data about the fictitious people of the embedded benchmark.

:func:`generate_muse_benchmark` takes a benchmark from
:func:`~jaxunlearn.data.synthetic.generate_benchmark` and writes, for its forget, retain and
holdout people, what MUSE (Shi et al., 2024) evaluates on, as a
:class:`~jaxunlearn.data.muse.MuseData` (the layout :func:`~jaxunlearn.data.muse.load_muse`
reads and :func:`~jaxunlearn.data.muse.save_muse` writes):

- a **passage** per person: one sentence per attribute (in ``ATTRIBUTES`` order, a template
  drawn per sentence), stating the same facts as the person's QA rows in other words. ``raw``:
  ``forget`` (forget people), ``retain1`` / ``retain2`` (the retain people, halved in order),
  ``holdout`` (never to be trained on); ``privleak``: ``forget``, ``retain`` (= ``retain2``),
  ``holdout``;
- **knowledge QA** from the passages: per fact a question (template drawn) whose answer is the
  fact itself (MUSE's answers are short spans). ``forget_qa`` from the forget people,
  ``retain_qa`` from the ``retain2`` people; ``num_icl`` pairs of each (drawn at random, of
  distinct attributes where possible) are moved to ``forget_qa_icl`` / ``retain_qa_icl``, the
  in-context examples;
- **verbatim** pairs (``verbmem/forget``): per forget passage, ``prompt`` = its first
  ``max(1, round(prompt_fraction * S))`` sentences and ``gt`` = the rest (``S`` sentences;
  ``prompt + " " + gt`` is the passage, as open-unlearning joins them).

Deterministic: one ``numpy.random.Generator`` seeded with ``seed`` drives every choice, and the
people come in the benchmark's order.

References:
  Shi et al., "MUSE: Machine Unlearning Six-Way Evaluation for Language Models", 2024.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import datasets
import numpy as np

from jaxunlearn.data.muse import MuseData, string_features
from jaxunlearn.data.synthetic import ATTRIBUTES

__all__ = ["PASSAGE_TEMPLATES", "KNOWMEM_QUESTIONS", "person_facts", "generate_muse_benchmark"]

#: Sentence templates of the passages, per attribute ({s} the person, {v} the value).
PASSAGE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birthplace": ("{s} grew up in the town of {v}.", "The town of {v} is where {s} was born."),
    "birth_year": ("{s} was born in the year {v}.", "The records give {v} as the year {s} was born."),
    "occupation": ("For many years {s} earned a living as a {v}.", "Before writing, {s} worked as a {v}."),
    "father_occupation": ("The father of {s} was a {v}.", "{s} was raised by a father who worked as a {v}."),
    "mother_occupation": ("The mother of {s} was a {v}.", "{s} had a mother who worked as a {v}."),
    "genre": ("Readers know {s} for {v}.", "Most of what {s} publishes is {v}."),
    "award": ("In time {s} received the {v}.", "The critics gave {s} the {v}."),
    "book_title": ('The book "{v}" made {s} famous.', '{s} is best remembered for "{v}".'),
}
#: Question templates of the knowledge QA, per attribute (the answer is the value).
KNOWMEM_QUESTIONS: dict[str, tuple[str, ...]] = {
    "birthplace": ("In which town was {s} born?", "Where did {s} grow up?"),
    "birth_year": ("In which year was {s} born?", "What year was {s} born in?"),
    "occupation": ("What did {s} work as before writing?", "How did {s} earn a living?"),
    "father_occupation": ("What was the job of the father of {s}?", "What did the father of {s} work as?"),
    "mother_occupation": ("What was the job of the mother of {s}?", "What did the mother of {s} work as?"),
    "genre": ("What does {s} write?", "What kind of writing is {s} known for?"),
    "award": ("Which award did {s} receive?", "What prize was given to {s}?"),
    "book_title": ("Which book made {s} famous?", "What is {s} best remembered for?"),
}


def person_facts(split: datasets.Dataset, *, name: str = "split") -> dict[str, dict[str, str]]:
    """``{person: {attribute: fact}}`` of a benchmark split, people in first-seen order.

    Args:
      split: a split of :func:`~jaxunlearn.data.synthetic.generate_benchmark` (columns
        ``person``, ``attribute``, ``fact``).
      name: the split's name, for errors.

    Raises:
      KeyError: a missing column. ValueError: an empty split, an attribute outside
        ``ATTRIBUTES``, two different facts for one (person, attribute).
    """
    if not isinstance(split, datasets.Dataset):
        raise TypeError(f"{name} is {type(split).__name__}, expected a datasets.Dataset")
    missing = [c for c in ("person", "attribute", "fact") if c not in split.column_names]
    if missing:
        raise KeyError(f"{name} is missing column(s) {missing} (a generate_benchmark person split has them); "
                       f"it has {split.column_names}")
    if len(split) == 0:
        raise ValueError(f"{name} is empty")
    out: dict[str, dict[str, str]] = {}
    for i, (p, a, f) in enumerate(zip(split["person"], split["attribute"], split["fact"])):
        if a not in PASSAGE_TEMPLATES:
            raise ValueError(f"{name} row {i}: attribute {a!r} is not a person attribute {ATTRIBUTES}")
        facts = out.setdefault(p, {})
        if facts.get(a, f) != f:
            raise ValueError(f"{name} row {i}: two facts for ({p!r}, {a!r}): {facts[a]!r} and {f!r}")
        facts[a] = f
    return out


def _passage(rng: np.random.Generator, person: str, facts: Mapping[str, str]) -> list[str]:
    sentences = []
    for attr in ATTRIBUTES:
        if attr in facts:
            options = PASSAGE_TEMPLATES[attr]
            sentences.append(options[int(rng.integers(len(options)))].format(s=person, v=facts[attr]))
    return sentences


def _qa(rng: np.random.Generator, people: Mapping[str, Mapping[str, str]]) -> list[tuple[str, str, str]]:
    rows = []
    for person, facts in people.items():
        for attr in ATTRIBUTES:
            if attr in facts:
                options = KNOWMEM_QUESTIONS[attr]
                rows.append((options[int(rng.integers(len(options)))].format(s=person), facts[attr], attr))
    return rows


def _split_icl(rng: np.random.Generator, rows: list[tuple[str, str, str]], num_icl: int, name: str):
    if len(rows) <= num_icl:
        raise ValueError(f"{name} has {len(rows)} QA pairs: too few for num_icl={num_icl} in-context "
                         "examples and at least one scored question")
    order = [int(i) for i in rng.permutation(len(rows))]
    icl: list[int] = []
    seen: set[str] = set()
    for i in order:  # distinct attributes first, then any
        if len(icl) < num_icl and rows[i][2] not in seen:
            icl.append(i)
            seen.add(rows[i][2])
    icl += [i for i in order if i not in icl][: num_icl - len(icl)]
    chosen = set(icl)
    rest = [rows[i] for i in range(len(rows)) if i not in chosen]
    return [rows[i] for i in icl], rest


def _qa_dataset(rows) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"question": [r[0] for r in rows], "answer": [r[1] for r in rows]},
                                      features=string_features(("question", "answer")))


def _text_dataset(texts: Sequence[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": list(texts)})


def generate_muse_benchmark(
    benchmark: Mapping[str, datasets.Dataset],
    *,
    forget: str = "forget10",
    retain: str = "retain90",
    holdout: str = "holdout",
    num_icl: int = 3,
    prompt_fraction: float = 0.5,
    max_qa: int | None = None,
    seed: int = 0,
) -> MuseData:
    """MUSE-shaped passages, knowledge QA and verbatim pairs about a benchmark's people.

    See the module docstring for what each part holds.

    Args:
      benchmark: the output of :func:`~jaxunlearn.data.synthetic.generate_benchmark` (or any
        splits with ``person`` / ``attribute`` / ``fact`` columns).
      forget, retain, holdout: the split names whose people are forgotten, kept, never trained on.
      num_icl: in-context examples per KnowMem set (taken out of the scored questions).
      prompt_fraction: share of a forget passage's sentences given as the VerbMem prompt.
      max_qa: keep at most this many scored questions per KnowMem set (the first ones, people in
        order); ``None`` keeps all.
      seed: seed of the generator behind every template and ICL choice.

    Returns:
      A :class:`~jaxunlearn.data.muse.MuseData` with ``raw`` = forget / retain1 / retain2 /
      holdout passages.

    Raises:
      KeyError: a split missing from ``benchmark``. ValueError: people shared between the
      forget, retain and holdout splits, fewer than 2 retain people, a passage of a single
      sentence (VerbMem needs a prompt and a continuation), too few QA pairs for ``num_icl``.

    >>> from jaxunlearn.data import generate_benchmark
    >>> data = generate_muse_benchmark(generate_benchmark(num_people=20, num_general=0), num_icl=2)
    >>> len(data.privleak_forget), len(data.privleak_holdout), len(data.forget_qa), len(data.forget_qa_icl)
    (2, 2, 14, 2)
    >>> data.raw["forget"][0]["text"] == data.verbmem_forget[0]["prompt"] + " " + data.verbmem_forget[0]["gt"]
    True
    """
    for name in (forget, retain, holdout):
        if name not in benchmark:
            raise KeyError(f"split {name!r} not in the benchmark (have {sorted(benchmark)})")
    if num_icl < 0:
        raise ValueError(f"num_icl must be >= 0, got {num_icl}")
    if not 0.0 < prompt_fraction < 1.0:
        raise ValueError(f"prompt_fraction must be in (0, 1), got {prompt_fraction}")
    if max_qa is not None and max_qa < 1:
        raise ValueError(f"max_qa must be >= 1 or None, got {max_qa}")
    groups = {name: person_facts(benchmark[name], name=name) for name in (forget, retain, holdout)}
    for a, b in ((forget, retain), (forget, holdout), (retain, holdout)):
        shared = sorted(set(groups[a]) & set(groups[b]))
        if shared:
            raise ValueError(f"splits {a!r} and {b!r} share people {shared[:3]}: pass disjoint splits "
                             "(e.g. forget10 / retain90 / holdout)")
    if len(groups[retain]) < 2:
        raise ValueError(f"{retain!r} has {len(groups[retain])} people; retain1 and retain2 need one each")
    rng = np.random.default_rng(seed)
    passages = {name: {p: _passage(rng, p, f) for p, f in people.items()} for name, people in groups.items()}
    retain_people = list(groups[retain])
    half = len(retain_people) // 2
    retain1, retain2 = retain_people[:half], retain_people[half:]

    prompts, gts = [], []
    for person, sentences in passages[forget].items():
        if len(sentences) < 2:
            raise ValueError(f"the passage of {person!r} has {len(sentences)} sentence(s); VerbMem needs >= 2 "
                             "(use at least two attributes)")
        cut = min(len(sentences) - 1, max(1, int(np.floor(prompt_fraction * len(sentences) + 0.5))))
        prompts.append(" ".join(sentences[:cut]))
        gts.append(" ".join(sentences[cut:]))

    forget_icl, forget_qa = _split_icl(rng, _qa(rng, groups[forget]), num_icl, f"{forget!r}")
    retain_icl, retain_qa = _split_icl(rng, _qa(rng, {p: groups[retain][p] for p in retain2}), num_icl,
                                       f"{retain!r} (retain2 half)")
    if max_qa is not None:
        forget_qa, retain_qa = forget_qa[:max_qa], retain_qa[:max_qa]

    def texts(name: str, people: Sequence[str] | None = None) -> list[str]:
        chosen = passages[name] if people is None else {p: passages[name][p] for p in people}
        return [" ".join(s) for s in chosen.values()]

    raw = {"forget": texts(forget), "retain1": texts(retain, retain1), "retain2": texts(retain, retain2),
           "holdout": texts(holdout)}
    return MuseData(
        forget_qa=_qa_dataset(forget_qa),
        forget_qa_icl=_qa_dataset(forget_icl),
        retain_qa=_qa_dataset(retain_qa),
        retain_qa_icl=_qa_dataset(retain_icl),
        verbmem_forget=datasets.Dataset.from_dict({"prompt": prompts, "gt": gts}),
        privleak_forget=_text_dataset(raw["forget"]),
        privleak_holdout=_text_dataset(raw["holdout"]),
        privleak_retain=_text_dataset(raw["retain2"]),
        raw={k: _text_dataset(v) for k, v in raw.items()},
    )
