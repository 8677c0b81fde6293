"""A seeded, TOFU-shaped benchmark of fictitious facts about invented people.

Every person has a name and eight attributes (birthplace, birth year, occupation,
father's and mother's occupations, genre, award, book title). Each (person,
attribute) pair is one question/answer row, phrased from one of several templates,
with the columns of TOFU (Maini et al., 2024):

- ``question``, ``answer``;
- ``paraphrased_answer``: the same fact in another answer template;
- ``perturbed_answer``: ``num_perturbed`` strings, each the *paraphrased* answer
  with the fact replaced by a different value of the same attribute (as in TOFU,
  perturbed answers keep the paraphrase's template, so the truth ratio
  ``P_pert / P_para`` compares sentences that differ only in the fact);

plus ``person`` (the full name; the subject entity for ``general`` rows), ``attribute``
and ``fact`` (the value substring carrying the fact; it occurs exactly once in the
answer and in the paraphrased answer, and not at all in a perturbed answer).

Names are a first name and a last name drawn from two small pools of names built
from consonant-vowel syllables, and every name *word* of a forget or holdout person
also occurs in some retain person's name, so a tokenizer trained on the retain data
has seen every word of every name (held-out names must not be out of vocabulary, or
membership inference is trivial: an unseen word alone separates them).

Splits (a ``datasets.DatasetDict``), with ``n = num_people`` trained people:

- ``forget01`` ⊂ ``forget05`` ⊂ ``forget10``: the first ``max(1, round(p n))`` trained
  people for p = 1 %, 5 %, 10 % (nested by people);
- ``retain99``, ``retain95``, ``retain90``: the complementary trained people;
- ``holdout``: ``num_holdout`` people never trained on (default: as many as forget10);
- ``general``: world knowledge the model also learns (capitals and currencies of
  invented countries, sums of small integers), with paraphrased and perturbed answers.

The generator is a pure function of its arguments: one ``numpy.random.Generator``
seeded with ``seed`` drives every choice, so the same arguments give identical data.

References:
  Maini, Feng, Schwarzschild, Lipton, Kolter, "TOFU: A Task of Fictitious Unlearning
  for LLMs", 2024.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import numpy as np

__all__ = [
    "ATTRIBUTES",
    "GENERAL_ATTRIBUTES",
    "FORGET_SPLITS",
    "RETAIN_SPLITS",
    "BENCHMARK_FEATURES",
    "attribute_values",
    "split_sizes",
    "generate_benchmark",
]

ATTRIBUTES: tuple[str, ...] = (
    "birthplace",
    "birth_year",
    "occupation",
    "father_occupation",
    "mother_occupation",
    "genre",
    "award",
    "book_title",
)
GENERAL_ATTRIBUTES: tuple[str, ...] = ("capital", "currency", "addition")
# Forget split name -> fraction of trained people; retain split name -> its forget split.
FORGET_SPLITS: dict[str, float] = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}
RETAIN_SPLITS: dict[str, str] = {"retain99": "forget01", "retain95": "forget05", "retain90": "forget10"}

BENCHMARK_FEATURES = datasets.Features(
    {
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "paraphrased_answer": datasets.Value("string"),
        "perturbed_answer": datasets.List(datasets.Value("string")),
        "person": datasets.Value("string"),
        "attribute": datasets.Value("string"),
        "fact": datasets.Value("string"),
    }
)

# --- value pools (no value is a substring of another value of the same pool) -------------

_CITIES = (
    "Brackenford", "Ostrelm", "Thornwick", "Velmstadt", "Greyhollow", "Marskby", "Quenbury",
    "Dunmere", "Elsworth", "Ashgrove", "Corrindale", "Fenholt", "Wrexley", "Saltmarsh",
    "Highcrest", "Embervale", "Glenhurst", "Kestrelby", "Lowcastle", "Nettlefield",
    "Orchardmouth", "Pebblestrand", "Ravensholm", "Tidewell",
)
# Every occupation starts with a consonant sound, so the article "a" never changes.
_OCCUPATIONS = (
    "cartographer", "beekeeper", "glassblower", "lighthouse keeper", "clockmaker", "botanist",
    "ferry captain", "stonemason", "violin maker", "bookbinder", "cheesemaker", "tailor",
    "blacksmith", "pharmacist", "weaver", "potter", "surveyor", "librarian", "carpenter",
    "shepherd", "goldsmith", "glazier", "journalist", "mapmaker",
)
_GENRES = (
    "mystery novels", "science fiction", "historical romance", "war poetry", "epic fantasy",
    "gothic horror", "travel writing", "political satire", "fairy tales", "spy thrillers",
    "nature essays", "comic verse", "crime fiction", "children's fables", "sea adventures",
    "stage comedies",
)
_AWARDS = (
    "Silver Quill Prize", "Brightwater Medal", "Lantern Award", "Golden Owl Honour",
    "Meridian Cup", "Northwind Laurel", "Amber Ribbon", "Copperleaf Citation",
    "Starling Medallion", "Harbour Light Trophy", "Crimson Pen Award", "Evergreen Wreath",
    "Falcon Scroll", "Ivory Tower Plaque", "Juniper Star", "Moonstone Prize",
)
_TITLE_ADJECTIVES = (
    "Hollow", "Silent", "Crimson", "Forgotten", "Winding", "Broken", "Distant", "Gentle",
    "Burning", "Frozen", "Hidden", "Restless", "Scarlet", "Velvet", "Wandering", "Quiet",
)
_TITLE_NOUNS = (
    "Lantern", "Harbour", "Orchard", "Mirror", "Compass", "Garden", "Bridge", "Tide",
    "Chapel", "Meadow", "Clocktower", "Voyage", "Letter", "Island", "Forest", "Kingdom",
)
_TITLES = tuple(f"The {a} {n}" for a in _TITLE_ADJECTIVES for n in _TITLE_NOUNS)
_YEARS = tuple(str(y) for y in range(1900, 2000))
_CAPITALS = (
    "Varnholm", "Castrel", "Prestwyn", "Orvieth", "Duskmere", "Halvard", "Brennick",
    "Solway", "Tarnwick", "Ulverholt", "Westmarch", "Zephyrn", "Ockham", "Mirestone",
    "Glaswyn", "Yarrowby",
)
_CURRENCIES = (
    "crown", "florin", "shilling", "ducat", "thaler", "guilder", "sovereign", "drachm",
    "groat", "zloty", "pengo", "escudo",
)
_ADD_MIN, _ADD_MAX = 2, 29  # operands of the "addition" facts
_SUMS = tuple(str(s) for s in range(0, 2 * _ADD_MAX + 10))

_POOLS: dict[str, tuple[str, ...]] = {
    "birthplace": _CITIES,
    "birth_year": _YEARS,
    "occupation": _OCCUPATIONS,
    "father_occupation": _OCCUPATIONS,
    "mother_occupation": _OCCUPATIONS,
    "genre": _GENRES,
    "award": _AWARDS,
    "book_title": _TITLES,
    "capital": _CAPITALS,
    "currency": _CURRENCIES,
    "addition": _SUMS,
}

# Syllables of names: consonant + vowel, so names contain no vowel pair or consonant
# cluster and cannot contain any pool value (all of which contain one).
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = tuple(c + v for c in _CONSONANTS for v in _VOWELS)
_NAME_ATTEMPTS = 64
_COUNTRY_SUFFIXES = ("nia", "lia", "ria", "dova", "tesh")

# --- templates: {s} subject, {v} value (and {a}, {b} for sums) -----------------------------

_QUESTIONS: dict[str, tuple[str, ...]] = {
    "birthplace": ("Where was {s} born?", "What is the birthplace of {s}?",
                   "In which city was {s} born?"),
    "birth_year": ("In which year was {s} born?", "When was {s} born?",
                   "What is the birth year of {s}?"),
    "occupation": ("What does {s} do for a living?", "What is the occupation of {s}?",
                   "What job does {s} have?"),
    "father_occupation": ("What did the father of {s} do for a living?",
                          "What was the occupation of {s}'s father?",
                          "What job did {s}'s father have?"),
    "mother_occupation": ("What did the mother of {s} do for a living?",
                          "What was the occupation of {s}'s mother?",
                          "What job did {s}'s mother have?"),
    "genre": ("Which genre does {s} write in?", "What kind of books does {s} write?",
              "What genre is {s} known for?"),
    "award": ("Which award has {s} won?", "What prize did {s} receive?",
              "Has {s} won any award?"),
    "book_title": ("What is the best known book by {s}?", "Which book did {s} write?",
                   "Name a book written by {s}."),
    "capital": ("What is the capital of {s}?", "Which city is the capital of {s}?",
                "Name the capital city of {s}."),
    "currency": ("What currency is used in {s}?", "What is the currency of {s}?",
                 "What money do people use in {s}?"),
    "addition": ("What is {a} plus {b}?", "How much is {a} plus {b}?",
                 "What do you get when you add {a} and {b}?"),
}
_ANSWERS: dict[str, tuple[str, ...]] = {
    "birthplace": ("{s} was born in {v}.", "The birthplace of {s} is the city of {v}.",
                   "{s} comes from {v}, where {s} was born."),
    "birth_year": ("{s} was born in {v}.", "The birth year of {s} is {v}.",
                   "{s} came into the world in the year {v}."),
    "occupation": ("{s} works as a {v}.", "By profession, {s} is a {v}.",
                   "The occupation of {s} is that of a {v}."),
    "father_occupation": ("The father of {s} worked as a {v}.",
                          "{s}'s father was a {v} by trade.",
                          "By profession, the father of {s} was a {v}."),
    "mother_occupation": ("The mother of {s} worked as a {v}.",
                          "{s}'s mother was a {v} by trade.",
                          "By profession, the mother of {s} was a {v}."),
    "genre": ("{s} writes {v}.", "The genre {s} is known for is {v}.",
              "Most of the books by {s} are {v}."),
    "award": ("{s} won the {v}.", "{s} was honoured with the {v}.",
              "The award {s} received is the {v}."),
    "book_title": ('{s} wrote "{v}".', 'The best known book by {s} is "{v}".',
                   '"{v}" is a book written by {s}.'),
    "capital": ("The capital of {s} is {v}.", "{v} is the capital city of {s}.",
                "The seat of government of {s} is {v}."),
    "currency": ("The currency of {s} is the {v}.", "People in {s} pay with the {v}.",
                 "In {s} the money in use is the {v}."),
    "addition": ("{a} plus {b} is {v}.", "The sum of {a} and {b} is {v}.",
                 "Adding {a} and {b} gives {v}."),
}


def attribute_values(attribute: str) -> tuple[str, ...]:
    """The pool of values an attribute takes; perturbed answers draw their wrong values here.

    Args:
      attribute: one of ``ATTRIBUTES`` or ``GENERAL_ATTRIBUTES``.

    Returns:
      The tuple of possible values (strings; years and sums as decimal numbers).
    """
    if attribute not in _POOLS:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {sorted(_POOLS)}")
    return _POOLS[attribute]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def split_sizes(num_people: int) -> dict[str, int]:
    """Number of people in each forget split: ``max(1, round(p * num_people))``, nested.

    Args:
      num_people: trained people (forget + retain).

    Returns:
      ``{"forget01": k1, "forget05": k5, "forget10": k10}`` with ``1 <= k1 <= k5 <= k10 <
      num_people``.
    """
    if num_people < 3:
        raise ValueError(f"num_people must be >= 3 (one forget, two retain), got {num_people}")
    sizes, prev = {}, 1
    for name, frac in FORGET_SPLITS.items():
        prev = max(prev, _round_half_up(frac * num_people))
        sizes[name] = prev
    return sizes


@dataclass(frozen=True)
class _Row:
    question: str
    answer: str
    paraphrased_answer: str
    perturbed_answer: tuple[str, ...]
    person: str
    attribute: str
    fact: str


def _check_once(text: str, fact: str, where: str) -> None:
    if text.count(fact) != 1:  # pragma: no cover - guarded by the design of the pools
        raise RuntimeError(f"internal error: fact {fact!r} occurs {text.count(fact)} times in {where} {text!r}")


def _make_row(rng: np.random.Generator, attribute: str, subject: str, value: str,
              fmt: dict[str, str], num_perturbed: int, pool: Sequence[str]) -> _Row:
    """One QA row: random question template, answer and paraphrase templates differ."""
    questions, answers = _QUESTIONS[attribute], _ANSWERS[attribute]
    q = questions[int(rng.integers(len(questions)))]
    ia, ip = (int(i) for i in rng.choice(len(answers), size=2, replace=False))
    wrong = [v for v in pool if v != value]
    if len(wrong) < num_perturbed:
        raise ValueError(f"attribute {attribute!r} has {len(wrong)} wrong values, fewer than "
                         f"num_perturbed={num_perturbed}")
    picks = rng.choice(len(wrong), size=num_perturbed, replace=False)
    question = q.format(s=subject, **fmt)
    answer = answers[ia].format(s=subject, v=value, **fmt)
    para = answers[ip].format(s=subject, v=value, **fmt)
    perturbed = tuple(answers[ip].format(s=subject, v=wrong[int(j)], **fmt) for j in picks)
    _check_once(answer, value, "answer")
    _check_once(para, value, "paraphrased answer")
    for p in perturbed:
        if value in p:  # pragma: no cover
            raise RuntimeError(f"internal error: true value {value!r} in perturbed answer {p!r}")
    return _Row(question, answer, para, perturbed, subject, attribute, value)


def _words(rng: np.random.Generator, count: int, syllables: Sequence[str], length: int,
           exclude: set[str], suffixes: Sequence[str] = ("",)) -> list[str]:
    """``count`` distinct capitalised words of ``length`` syllables (+ a suffix), not in exclude."""
    capacity = len(syllables) ** length * len(suffixes)
    if count + len(exclude) > capacity:
        raise ValueError(f"cannot build {count} distinct names from {capacity} combinations")
    out: list[str] = []
    seen = set(exclude)
    while len(out) < count:
        idx = rng.integers(len(syllables), size=length)
        word = "".join(syllables[int(i)] for i in idx) + suffixes[int(rng.integers(len(suffixes)))]
        word = word.capitalize()
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def _assign_names(rng: np.random.Generator, n_special: int, n_retain: int) -> list[tuple[str, str]]:
    """Distinct (first, last) names: ``n_special`` forget/holdout people then ``n_retain``.

    Every first and last name used by a special person is also used by a retain person.
    """
    total = n_special + n_retain
    pool = max(4, math.ceil(math.sqrt(4 * total)))
    firsts = _words(rng, pool, _SYLLABLES, 2, set())
    lasts = _words(rng, pool, _SYLLABLES, 3, set(firsts))

    def fresh(used: set[tuple[str, str]], first: str | None, last: str | None) -> tuple[str, str]:
        for _ in range(100 * pool * pool):
            f = first if first is not None else firsts[int(rng.integers(pool))]
            l = last if last is not None else lasts[int(rng.integers(pool))]
            if (f, l) not in used:
                return f, l
        raise ValueError("could not find an unused name; increase the name pools")  # pragma: no cover

    # Special names are redrawn (a few times at most, and only for tiny benchmarks) until
    # the retain people can cover their name words.
    for _ in range(_NAME_ATTEMPTS):
        used: set[tuple[str, str]] = set()
        special = []
        for _ in range(n_special):
            name = fresh(used, None, None)
            used.add(name)
            special.append(name)
        need_f = sorted({f for f, _ in special}, key=firsts.index)
        need_l = sorted({l for _, l in special}, key=lasts.index)
        # Cover people: pair each needed first name with the first needed last name that
        # makes an unused pair (a random last name if none does), then leftover last names.
        cover: list[tuple[str | None, str | None]] = []
        for f in need_f:
            l = next((l for l in need_l if (f, l) not in used), None)
            if l is not None:
                need_l.remove(l)
                used.add((f, l))
            cover.append((f, l))
        cover += [(None, l) for l in need_l]
        if len(cover) <= n_retain:
            break
    else:
        raise ValueError(f"{n_retain} retain people cannot cover the name words of {n_special} "
                         "forget/holdout people; use more people or a smaller holdout")
    retain = []
    for f, l in cover:
        name = (f, l) if f is not None and l is not None else fresh(used, f, l)
        used.add(name)
        retain.append(name)
    while len(retain) < n_retain:
        name = fresh(used, None, None)
        used.add(name)
        retain.append(name)
    order = rng.permutation(n_retain)
    return special + [retain[int(i)] for i in order]


def _person_rows(rng: np.random.Generator, name: str, attributes: Sequence[str],
                 num_perturbed: int) -> list[_Row]:
    rows = []
    for attr in attributes:
        pool = _POOLS[attr]
        value = pool[int(rng.integers(len(pool)))]
        rows.append(_make_row(rng, attr, name, value, {}, num_perturbed, pool))
    return rows


def _general_rows(rng: np.random.Generator, num_general: int, num_perturbed: int,
                  exclude: set[str]) -> list[_Row]:
    kinds = [GENERAL_ATTRIBUTES[i % len(GENERAL_ATTRIBUTES)] for i in range(num_general)]
    n_countries = max(kinds.count("capital"), kinds.count("currency"))
    countries = _words(rng, n_countries, _SYLLABLES, 2, exclude, _COUNTRY_SUFFIXES)
    pairs = [(a, b) for a in range(_ADD_MIN, _ADD_MAX + 1) for b in range(_ADD_MIN, _ADD_MAX + 1)]
    n_add = kinds.count("addition")
    if n_add > len(pairs):
        raise ValueError(f"num_general={num_general} needs {n_add} distinct sums; at most {len(pairs)}")
    add_pairs = [pairs[int(i)] for i in rng.choice(len(pairs), size=n_add, replace=False)]
    rows, ic, iu, ia = [], 0, 0, 0
    for kind in kinds:
        if kind == "addition":
            a, b = add_pairs[ia]
            ia += 1
            s = a + b
            near = [str(v) for v in range(max(0, s - 6), s + 7) if v != s]
            rows.append(_make_row(rng, kind, "", str(s), {"a": str(a), "b": str(b)}, num_perturbed, near))
            continue
        if kind == "capital":
            subject, ic = countries[ic], ic + 1
        else:
            subject, iu = countries[iu], iu + 1
        pool = _POOLS[kind]
        value = pool[int(rng.integers(len(pool)))]
        rows.append(_make_row(rng, kind, subject, value, {}, num_perturbed, pool))
    return rows


def _to_dataset(rows: Sequence[_Row]) -> datasets.Dataset:
    cols = {name: [getattr(r, name) for r in rows] for name in BENCHMARK_FEATURES}
    cols["perturbed_answer"] = [list(p) for p in cols["perturbed_answer"]]
    return datasets.Dataset.from_dict(cols, features=BENCHMARK_FEATURES)


def generate_benchmark(
    *,
    num_people: int = 200,
    num_holdout: int | None = None,
    num_general: int = 200,
    attributes: Sequence[str] | None = None,
    num_perturbed: int = 5,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Generates the fictitious-facts benchmark (see the module docstring for its layout).

    Rows: one per (person, attribute); ``len(forgetXX) = k * len(attributes)`` with ``k``
    from ``split_sizes(num_people)``, ``len(retainYY) = (num_people - k) * len(attributes)``,
    ``len(holdout) = num_holdout * len(attributes)``, ``len(general) = num_general``.

    Args:
      num_people: trained people (forget + retain), >= 3.
      num_holdout: people never trained on; ``None`` = as many as ``forget10``.
      num_general: rows of general knowledge (cycling capital, currency, addition); >= 0.
      attributes: which person attributes become rows (a subset of ``ATTRIBUTES``, in that
        order); ``None`` = all eight.
      num_perturbed: perturbed answers per row, >= 1.
      seed: seed of the ``numpy.random.Generator`` behind every choice.

    Returns:
      A ``datasets.DatasetDict`` with splits forget01/05/10, retain99/95/90, holdout,
      general, each with the columns of ``BENCHMARK_FEATURES``.

    >>> dd = generate_benchmark(num_people=20, num_general=6, seed=0)
    >>> len(dd["forget10"]), len(dd["retain90"]), len(dd["general"])
    (16, 144, 6)
    """
    attrs = ATTRIBUTES if attributes is None else tuple(attributes)
    unknown = [a for a in attrs if a not in ATTRIBUTES]
    if unknown or not attrs or len(set(attrs)) != len(attrs):
        raise ValueError(f"attributes must be distinct names from {ATTRIBUTES}, got {attributes!r}")
    sizes = split_sizes(num_people)
    k10 = sizes["forget10"]
    num_holdout = k10 if num_holdout is None else num_holdout
    if num_holdout < 1:
        raise ValueError(f"num_holdout must be >= 1, got {num_holdout}")
    if num_general < 0:
        raise ValueError(f"num_general must be >= 0, got {num_general}")
    if num_perturbed < 1:
        raise ValueError(f"num_perturbed must be >= 1, got {num_perturbed}")
    rng = np.random.default_rng(seed)
    # Order: forget10 people (forget01 first, then the rest of forget05, ...), holdout, retain.
    names = _assign_names(rng, k10 + num_holdout, num_people - k10)
    full = [f"{f} {l}" for f, l in names]
    forget_people = full[:k10]
    holdout_people = full[k10:k10 + num_holdout]
    trained_people = forget_people + full[k10 + num_holdout:]
    person_rows = {p: _person_rows(rng, p, attrs, num_perturbed) for p in trained_people + holdout_people}
    name_words = {w for p in full for w in p.split()}
    general = _general_rows(rng, num_general, num_perturbed, name_words)

    def rows_of(people: Sequence[str]) -> list[_Row]:
        return [r for p in people for r in person_rows[p]]

    splits = {}
    for name in FORGET_SPLITS:
        splits[name] = _to_dataset(rows_of(trained_people[: sizes[name]]))
    for name, forget in RETAIN_SPLITS.items():
        splits[name] = _to_dataset(rows_of(trained_people[sizes[forget]:]))
    splits["holdout"] = _to_dataset(rows_of(holdout_people))
    splits["general"] = _to_dataset(general)
    return datasets.DatasetDict(splits)
