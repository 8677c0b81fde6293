"""Refusal answers ("I don't know") paired with forget questions: the preferred completions of
IdkNLL and IdkDPO.

TOFU's IDK objectives (Maini et al., 2024) replace each forget answer by a refusal drawn from a
list of phrasings (``data/idk.jsonl`` of TOFU and open-unlearning: 100 lines such as "I'm not
sure." or "I have no idea about that."). That file is not shipped here (nothing is downloaded):
:data:`REFUSALS` is our own list of 40 phrasings in the same style, written for this library,
using only characters the embedded benchmark's tokenizer has seen (letters, apostrophe, comma,
period), so that the tokenizer, trained on the benchmark's texts only, encodes them exactly
(:func:`exact_phrases`) and adding the refusal set changes no other number of the benchmark.

Pairing. open-unlearning's ``QAwithIdkDataset`` draws a refusal uniformly at random each time a
row is read; here row ``i`` draws once, uniformly among the phrasings that fit its row (the
padded length is the forget set's, never raised for the refusals), with
``u = default_rng(seed).random(N)`` (:func:`refusal_answers`): fixed per row, so a run is a pure
function of its seed.

Encoding. The refusal rows are encoded by the *same encoder as the forget rows* (same prompt
format, same padded length), then renamed to :data:`jaxunlearn.losses.ALT_KEYS`
(``alt_input_ids``, ``alt_attention_mask``, ``alt_loss_mask``), row-aligned with the forget set
(:func:`encode_refusals`, :func:`with_refusals`); :func:`jaxunlearn.pipeline.unlearning_sets`
does this for the benchmark's forget set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jaxunlearn.losses import ALT_KEYS
from jaxunlearn.validate import check_int

__all__ = ["REFUSALS", "RefusalSet", "refusal_answers", "exact_phrases", "encode_refusals", "with_refusals"]

REFUSALS: tuple[str, ...] = (
    "I'm not sure.",
    "I have no idea about that.",
    "I don't know.",
    "I don't have that information.",
    "I'm afraid I can't answer that.",
    "That is something I don't know.",
    "I cannot say.",
    "I'm not able to answer that.",
    "Sorry, I don't know the answer.",
    "I have no information on that.",
    "I can't help with that.",
    "That's not something I know.",
    "I could not tell you.",
    "I don't have an answer to that.",
    "I'm unable to answer that.",
    "I have no knowledge of that.",
    "I'm not certain about that.",
    "Sadly, I don't know.",
    "That's beyond what I know.",
    "I couldn't say for sure.",
    "I'm not aware of that.",
    "I don't recall that.",
    "I wish I knew, but I don't.",
    "That is outside my knowledge.",
    "I can't answer that one.",
    "I'm sorry, I have no idea.",
    "No idea, I'm afraid.",
    "I don't have any details on that.",
    "Ask someone else, not me.",
    "That is not something I can answer.",
    "I lack the information to answer that.",
    "I'm not familiar with that.",
    "I honestly don't know.",
    "I have nothing to say about that.",
    "My knowledge does not cover that.",
    "I'd rather not guess.",
    "I know nothing about that.",
    "That's a mystery to me.",
    "I'm drawing a blank on that.",
    "I can't give you an answer to that.",
)
"""Our own refusal phrasings in the style of TOFU's ``idk.jsonl`` (see the module docstring)."""


def _check_phrases(owner: str, phrases: Sequence[str]) -> tuple[str, ...]:
    if isinstance(phrases, str) or not isinstance(phrases, Sequence) or not phrases:
        raise TypeError(f"{owner}: phrases must be a non-empty sequence of strings, got {phrases!r}")
    for i, p in enumerate(phrases):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{owner}: phrases[{i}] must be a non-empty string, got {p!r}")
    return tuple(phrases)


def refusal_answers(n: int, *, seed: int = 0, phrases: Sequence[str] = REFUSALS,
                    lengths: Sequence[int] | None = None, room: Sequence[int] | None = None) -> list[str]:
    """A refusal per row, drawn uniformly among the phrasings that fit the row.

    With ``u = default_rng(seed).random(n)`` and ``F_i`` the phrasings that fit row ``i`` (all of
    them without ``room``; else those with ``lengths[j] <= room[i]``), row ``i`` gets
    ``F_i[floor(u_i |F_i|)]``.

    Args:
      n: number of rows (>= 0).
      seed: seeds the draw.
      phrases: the refusal phrasings (default :data:`REFUSALS`).
      lengths: the answer tokens of each phrasing (with ``room``).
      room: (n,) the answer tokens each row has room for (with ``lengths``).

    Returns:
      ``n`` strings.

    Raises:
      ValueError: a row no phrasing fits (named), or ``lengths`` / ``room`` of the wrong length.

    >>> refusal_answers(3, seed=0) == refusal_answers(3, seed=0)
    True
    >>> refusal_answers(2, phrases=["I don't know.", "No."], lengths=[5, 2], room=[9, 2])[1]
    'No.'
    """
    o = "refusal_answers"
    n = check_int(o, "n", n, min=0)
    seed = check_int(o, "seed", seed)
    phrases = _check_phrases(o, phrases)
    u = np.random.default_rng(seed).random(n)
    if (lengths is None) != (room is None):
        raise ValueError(f"{o}: lengths and room go together")
    if room is None:
        return [phrases[int(x * len(phrases))] for x in u]
    lengths, room = np.asarray(lengths), np.asarray(room)
    if lengths.shape != (len(phrases),) or room.shape != (n,):
        raise ValueError(f"{o}: lengths must have one entry per phrase ({len(phrases)}) and room one per row ({n}); "
                         f"got shapes {lengths.shape} and {room.shape}")
    out = []
    for i, (x, r) in enumerate(zip(u, room)):
        fits = [p for p, m in zip(phrases, lengths) if m <= r]
        if not fits:
            raise ValueError(f"{o}: row {i} has room for {int(r)} answer tokens, less than any refusal "
                             f"(shortest {int(lengths.min())})")
        out.append(fits[int(x * len(fits))])
    return out


@dataclasses.dataclass(frozen=True)
class RefusalSet:
    """The refusal phrasings of a benchmark and the seed that pairs them with its forget rows.

    Attributes:
      phrases: the phrasings (default :data:`REFUSALS`).
      seed: the pairing's seed (:func:`refusal_answers`).
    """

    phrases: tuple[str, ...] = REFUSALS
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "phrases", _check_phrases("RefusalSet", self.phrases))
        check_int("RefusalSet", "seed", self.seed)

    def answers(self, n: int, *, lengths: Sequence[int] | None = None,
                room: Sequence[int] | None = None) -> list[str]:
        """:func:`refusal_answers` of ``n`` rows with this set's phrases and seed."""
        return refusal_answers(n, seed=self.seed, phrases=self.phrases, lengths=lengths, room=room)


def exact_phrases(tokenizer, phrases: Sequence[str] = REFUSALS) -> tuple[str, ...]:
    """The phrases ``tokenizer`` encodes exactly: ``decode(encode(p)) == p`` with no ``<unk>`` token.

    A BPE tokenizer trained on other texts (the benchmark's) reproduces a phrase iff it saw each
    of its characters; a phrase with an unseen character would be trained on as ``<unk>``.

    Args:
      tokenizer: a Hugging Face tokenizer.
      phrases: the phrasings (default :data:`REFUSALS`).

    Returns:
      The reproduced phrases, in order.
    """
    phrases = _check_phrases("exact_phrases", phrases)
    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for p in phrases:
        ids = tokenizer.encode(p, add_special_tokens=False)
        if tokenizer.decode(ids) == p and (unk is None or unk not in ids):
            out.append(p)
    return tuple(out)


def encode_refusals(encode: Callable[[list[str], list[str]], Mapping[str, np.ndarray]], questions: Sequence[str],
                    answers: Sequence[str]) -> dict[str, np.ndarray]:
    """The rows ``(question_i, answers_i)`` encoded by the forget set's own encoder, as :data:`ALT_KEYS`.

    Args:
      encode: ``encode(questions, answers) -> {"input_ids", "attention_mask", "loss_mask", ...}``,
        the encoder of the forget rows (e.g. ``lambda q, a: encode_qa(tok, q, a, max_length=T)``).
      questions: the forget rows' questions (prompts).
      answers: a refusal per row (:func:`refusal_answers`).

    Returns:
      ``{"alt_input_ids", "alt_attention_mask", "alt_loss_mask"}``: ``encode``'s arrays renamed.

    Raises:
      ValueError: ``questions`` and ``answers`` of different lengths, or an encoding without rows
        of the batch convention.
    """
    questions, answers = list(questions), list(answers)
    if len(questions) != len(answers):
        raise ValueError(f"encode_refusals: {len(questions)} questions but {len(answers)} answers")
    enc = encode(questions, answers)
    out = {}
    for key in ALT_KEYS:
        src = key[len("alt_"):]
        if src not in enc or np.shape(enc[src])[0] != len(questions):
            raise ValueError(f"encode_refusals: the encoder must return '{src}' with {len(questions)} rows")
        out[key] = np.asarray(enc[src])
    return out


def with_refusals(forget: Mapping[str, np.ndarray], alt: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The forget set with its refusal answers: ``{**forget, **alt}``, checked row- and length-aligned.

    Args:
      forget: the encoded forget set (the batch convention).
      alt: its refusal rows (:func:`encode_refusals`), one per forget row.

    Raises:
      KeyError: a key of :data:`ALT_KEYS` missing from ``alt``.
      ValueError: a row count or padded length that differs from the forget set's.
    """
    missing = [k for k in ALT_KEYS if k not in alt]
    if missing:
        raise KeyError(f"with_refusals: alt lacks {missing} (have {sorted(alt)})")
    want = np.shape(forget["input_ids"])
    for k in ALT_KEYS:
        if np.shape(alt[k]) != want:
            raise ValueError(f"with_refusals: alt['{k}'] has shape {np.shape(alt[k])}, the forget set {want} "
                             "(one refusal row per forget row, at the same padded length)")
    return {**forget, **{k: np.asarray(alt[k]) for k in ALT_KEYS}}
