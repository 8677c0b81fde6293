"""ROUGE-L of a generation against a reference answer, as TOFU / open-unlearning score it.

The reference evaluations (Maini et al., 2024; open-unlearning) call Google's ``rouge_score``
with ``RougeScorer(["rouge1", "rougeL"], use_stemmer=True).score(target, prediction)`` and
report ``rougeL.recall`` (TOFU's ROUGE) and ``rougeL.fmeasure`` (open-unlearning's ``rougeL_f1``,
MUSE's score). This module reimplements exactly that, with no dependency:

- tokenisation (``rouge_score.tokenize``): lowercase, replace every run of characters
  outside ``[a-z0-9]`` by a space, split on whitespace, Porter-stem the tokens longer than 3
  characters (with ``use_stemmer``), drop empty tokens;
- stemming: the Porter (1980) algorithm with the NLTK extensions, the default mode of
  ``nltk.stem.porter.PorterStemmer`` that ``rouge_score`` instantiates;
- ROUGE-L (Lin, 2004): with ``L = LCS(target, prediction)`` (longest common subsequence of
  the token lists), ``recall = L / |target|``, ``precision = L / |prediction|``,
  ``f = 2 P R / (P + R)`` (``rouge_score.scoring.fmeasure``: 0 when ``P + R = 0``); all three
  are 0 if either token list is empty.

References:
  Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", 2004.
  Porter, "An algorithm for suffix stripping", Program 14(3), 1980.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["RougeScore", "porter_stem", "rouge_tokenize", "lcs_length", "rouge_l", "rouge_l_recall", "rouge_l_f1"]

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_VALID = re.compile(r"^[a-z0-9]+$")
_VOWELS = frozenset("aeiou")
# NLTK_EXTENSIONS: irregular forms mapped straight to their stem.
_IRREGULAR = {
    "sky": "sky", "skies": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
    "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
    "cannings": "canning", "canning": "canning", "howe": "howe", "proceed": "proceed",
    "exceed": "exceed", "succeed": "succeed",
}


class RougeScore(NamedTuple):
    """ROUGE-L of one (prediction, target) pair: ``precision``, ``recall``, ``fmeasure``."""

    precision: float
    recall: float
    fmeasure: float


# --------------------------------------------------------------------------- Porter stemmer


def _consonants(word: str) -> list[bool]:
    """Porter's consonant flags: a letter other than a, e, i, o, u, and other than a ``y``
    preceded by a consonant (a leading ``y`` is a consonant)."""
    flags: list[bool] = []
    for i, ch in enumerate(word):
        if ch in _VOWELS:
            flags.append(False)
        elif ch == "y":
            flags.append(True if i == 0 else not flags[i - 1])
        else:
            flags.append(True)
    return flags


def _measure(stem: str) -> int:
    """``m`` in ``[C](VC)^m[V]``: the number of vowel-run -> consonant-run transitions."""
    c = _consonants(stem)
    return sum(1 for i in range(1, len(c)) if c[i] and not c[i - 1])


def _has_vowel(stem: str) -> bool:
    return not all(_consonants(stem))


def _double_consonant(word: str) -> bool:
    """``*d``: the word ends with two equal consonants."""
    return len(word) >= 2 and word[-1] == word[-2] and _consonants(word)[-1]


def _cvc(word: str) -> bool:
    """``*o``: ends consonant-vowel-consonant, the last not w, x or y (NLTK extension: or the
    word is exactly vowel-consonant)."""
    c = _consonants(word)
    if len(word) >= 3 and c[-3] and not c[-2] and c[-1] and word[-1] not in "wxy":
        return True
    return len(word) == 2 and not c[0] and c[1]


def _rules(word: str, rules) -> str:
    """Apply the first rule (in list order) whose suffix the word ends with; if that rule's
    condition on the remaining stem fails, the word is left unchanged (later rules are not tried)."""
    for suffix, repl, cond in rules:
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            return stem + repl if cond is None or cond(stem) else word
    return word


def _m_pos(stem: str) -> bool:
    return _measure(stem) > 0


def _m_gt1(stem: str) -> bool:
    return _measure(stem) > 1


def _step1ab(w: str) -> str:
    # step 1a (NLTK: a 4-letter "-ies" word keeps "ie": dies -> die)
    if w.endswith("ies") and len(w) == 4:
        w = w[:-3] + "ie"
    else:
        w = _rules(w, [("sses", "ss", None), ("ies", "i", None), ("ss", "ss", None), ("s", "", None)])
    # step 1b (NLTK: "-ied" -> "ie" for 4 letters, else "i")
    if w.endswith("ied"):
        return w[:-3] + ("ie" if len(w) == 4 else "i")
    if w.endswith("eed"):
        return w[:-1] if _measure(w[:-3]) > 0 else w
    for suffix in ("ed", "ing"):
        if w.endswith(suffix) and _has_vowel(w[: -len(suffix)]):
            s = w[: -len(suffix)]
            break
    else:
        return w
    for end, repl in (("at", "ate"), ("bl", "ble"), ("iz", "ize")):
        if s.endswith(end):
            return s[: -len(end)] + repl
    if _double_consonant(s):
        return s[:-1] if s[-1] not in "lsz" else s
    return s + "e" if _measure(s) == 1 and _cvc(s) else s


def _step1c(w: str) -> str:
    # NLTK: y -> i only after a consonant that is not the first letter (happy -> happi, enjoy, by)
    if w.endswith("y") and len(w) > 2 and _consonants(w[:-1])[-1]:
        return w[:-1] + "i"
    return w


_STEP2 = [
    ("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
    ("bli", "ble"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"),
    ("ization", "ize"), ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"),
    ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"),
    ("fulli", "ful"),
]
_STEP3 = [("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"),
          ("ful", ""), ("ness", "")]
_STEP4 = ["al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion",
          "ou", "ism", "ate", "iti", "ous", "ive", "ize"]


def _step2(w: str) -> str:
    if w.endswith("alli") and _m_pos(w[:-4]):  # NLTK: -alli -> -al, then step 2 again
        return _step2(w[:-4] + "al")
    rules = [(s, r, _m_pos) for s, r in _STEP2]
    rules.append(("logi", "log", lambda _stem: _m_pos(w[:-3])))  # NLTK: m(stem + "l") > 0
    return _rules(w, rules)


def _step4(w: str) -> str:
    rules = [(s, "", (lambda st: _m_gt1(st) and st[-1] in "st") if s == "ion" else _m_gt1) for s in _STEP4]
    return _rules(w, rules)


def _step5(w: str) -> str:
    if w.endswith("e"):
        s = w[:-1]
        m = _measure(s)
        if m > 1 or (m == 1 and not _cvc(s)):
            w = s
    if w.endswith("ll") and _measure(w[:-1]) > 1:
        w = w[:-1]
    return w


@functools.lru_cache(maxsize=65536)
def porter_stem(word: str) -> str:
    """Porter stem of one word (NLTK-extensions mode, as ``nltk.stem.porter.PorterStemmer()``).

    Steps 1a-5b of Porter (1980), with NLTK's extensions: irregular forms (``skies -> sky``,
    ``dying -> die``, ...), words of at most 2 letters unchanged, ``-ies``/``-ied`` of 4-letter
    words to ``-ie``, ``-y -> -i`` only after a consonant that is not the first letter,
    ``-alli``/``-fulli``/``-logi`` rules in step 2, and ``*o`` also true of a 2-letter
    vowel-consonant word.

    Args:
      word: one token (lowercased here).

    Returns:
      Its stem, e.g. ``porter_stem("caresses") == "caress"``, ``porter_stem("relational") == "relat"``
      (results are cached: the function is pure).
    """
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if len(word) <= 2:
        return w
    w = _step1c(_step1ab(w))
    w = _rules(_step2(w), [(s, r, _m_pos) for s, r in _STEP3])
    return _step5(_step4(w))


# --------------------------------------------------------------------------- ROUGE-L


def rouge_tokenize(text: str, *, use_stemmer: bool = True) -> list[str]:
    """``rouge_score``'s default tokenisation (see the module docstring).

    Args:
      text: any string.
      use_stemmer: Porter-stem tokens longer than 3 characters (TOFU uses True).

    Returns:
      The list of tokens, e.g. ``rouge_tokenize("The Cats' toys, 1990!") == ["the", "cat", "toy", "1990"]``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    tokens = re.split(r"\s+", _NON_ALNUM.sub(" ", text.lower()))
    if use_stemmer:
        tokens = [porter_stem(t) if len(t) > 3 else t for t in tokens]
    return [t for t in tokens if _VALID.match(t)]


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences (dynamic programme, O(|a||b|)).

    ``L[i][j] = L[i-1][j-1] + 1`` if ``a[i-1] == b[j-1]`` else ``max(L[i-1][j], L[i][j-1])``;
    one row is kept at a time.
    """
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, target: str, *, use_stemmer: bool = True) -> RougeScore:
    """ROUGE-L precision, recall and F1 of ``prediction`` against ``target``.

    ``recall = LCS / |target tokens|``, ``precision = LCS / |prediction tokens|``; equals
    ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer).score(target, prediction)``
    (note the argument order of ``rouge_score``: target first).

    Args:
      prediction: generated text.
      target: reference answer.
      use_stemmer: as in :func:`rouge_tokenize` (TOFU / open-unlearning: True).

    Returns:
      A :class:`RougeScore`; all zeros if either text has no token.
    """
    t = rouge_tokenize(target, use_stemmer=use_stemmer)
    p = rouge_tokenize(prediction, use_stemmer=use_stemmer)
    if not t or not p:
        return RougeScore(0.0, 0.0, 0.0)
    lcs = lcs_length(t, p)
    prec, rec = lcs / len(p), lcs / len(t)
    f = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
    return RougeScore(prec, rec, f)


def _per_example(field: str, predictions: Sequence[str], targets: Sequence[str], use_stemmer: bool) -> np.ndarray:
    if isinstance(predictions, str) or isinstance(targets, str):
        raise TypeError("predictions and targets must be sequences of strings, not a single string")
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    return np.asarray([getattr(rouge_l(p, t, use_stemmer=use_stemmer), field) for p, t in zip(predictions, targets)],
                      np.float64)


def rouge_l_recall(predictions: Sequence[str], targets: Sequence[str], *, use_stemmer: bool = True) -> np.ndarray:
    """Per-example ROUGE-L recall (the TOFU "ROUGE" metric) of generations against answers.

    Args:
      predictions: N generated strings.
      targets: N reference answers.
      use_stemmer: as in :func:`rouge_tokenize`.

    Returns:
      float64 (N,) array of ``LCS / |target tokens|``.
    """
    return _per_example("recall", predictions, targets, use_stemmer)


def rouge_l_f1(predictions: Sequence[str], targets: Sequence[str], *, use_stemmer: bool = True) -> np.ndarray:
    """Per-example ROUGE-L F1 (open-unlearning's ``rougeL_f1``) of generations against answers.

    ``F1 = 2 P R / (P + R)`` with ``P = LCS / |prediction tokens|``, ``R = LCS / |target tokens|``
    (0 when the LCS is empty or either text has no token), as ``rouge_score``'s ``fmeasure``.

    Args:
      predictions: N generated strings.
      targets: N reference answers.
      use_stemmer: as in :func:`rouge_tokenize`.

    Returns:
      float64 (N,) array.

    >>> rouge_l_f1(["the cat sat"], ["the cat sat on the mat"]).round(4).tolist()
    [0.6667]
    """
    return _per_example("fmeasure", predictions, targets, use_stemmer)
