"""Benchmark splits encoded for the TOFU-style evaluation: one fixed padded length for every
split and answer column, so each jitted pass of :mod:`jaxunlearn.eval.runner` compiles once.

A split in the TOFU column schema (``question``, ``answer``, ``paraphrased_answer``,
``perturbed_answer``: a list of K wrong answers; only ``question`` and ``answer`` are required,
the metrics the missing columns would enable are then not available) becomes an :class:`EvalSplit`: the teacher-forced
arrays of each answer column (``jaxunlearn.data.encode_split``), the left-padded generation
prompts (``jaxunlearn.data.encode_prompts``), and the answer texts that generations are scored
against (ROUGE-L). Encoding uses the tokenizer's chat template when it has one, as
open-unlearning does (``jaxunlearn.data.ChatFormat``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import datasets
import numpy as np

from jaxunlearn.data import ChatFormat, encode_prompts, encode_split

__all__ = ["ROLE_COLUMNS", "REQUIRED_COLUMNS", "truth_ratio_columns", "split_not_available", "EvalSplit",
           "encode_eval_splits"]


#: Columns of the TOFU evaluation schema a split uses, by role: with all of them every metric of
#: its role is computed; with only :data:`REQUIRED_COLUMNS` the answer-only metrics are
#: (:func:`split_not_available` names the others and the columns they need).
ROLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "forget": ("question", "answer", "paraphrased_answer", "perturbed_answer"),
    "retain": ("question", "answer", "paraphrased_answer", "perturbed_answer"),
    "general": ("question", "answer", "perturbed_answer"),
    "holdout": ("question", "answer"),
}

#: Columns every split needs: without them nothing can be computed.
REQUIRED_COLUMNS: tuple[str, ...] = ("question", "answer")


def truth_ratio_columns(role: str) -> tuple[str, ...]:
    """The columns a split of ``role`` needs for the truth ratio (and the option-normalised
    probability): ``paraphrased_answer`` and ``perturbed_answer`` on forget / retain splits,
    ``perturbed_answer`` on general and holdout splits.

    Raises:
      KeyError: an unknown role.
    """
    if role not in ROLE_COLUMNS:
        raise KeyError(f"unknown role {role!r}; roles: {sorted(ROLE_COLUMNS)}")
    extra = tuple(c for c in ROLE_COLUMNS[role] if c not in REQUIRED_COLUMNS)
    return extra if "perturbed_answer" in extra else extra + ("perturbed_answer",)


def _needs(columns: tuple[str, ...]) -> str:
    return f"needs column{'s' if len(columns) > 1 else ''} {', '.join(columns)}"


def split_not_available(split: "EvalSplit", role: str) -> dict[str, str]:
    """The per-example metrics a split of ``role`` cannot give for lack of columns.

    Args:
      split: an encoded split (:func:`encode_eval_splits`).
      role: its role (``"forget"``, ``"retain"``, ``"general"`` or ``"holdout"``).

    Returns:
      ``{metric: "needs column(s) ..."}``, empty when every metric of the role is computed:
      ``truth_ratio``, ``normalized_probability``, ``correct_probability`` and
      ``perturbed_probability`` without the truth-ratio columns (:func:`truth_ratio_columns`);
      on a forget split ``paraphrased_rouge_l_recall`` without ``paraphrased_answer`` and
      ``perturbed_rouge_l_recall`` without ``perturbed_answer``.

    Raises:
      KeyError: an unknown role.
    """
    out: dict[str, str] = {}
    if split.perturbed is None:
        why = _needs(truth_ratio_columns(role))
        out.update({m: why for m in ("truth_ratio", "normalized_probability", "correct_probability",
                                     "perturbed_probability")})
    if role == "forget":
        if split.paraphrased_answers is None:
            out["paraphrased_rouge_l_recall"] = _needs(("paraphrased_answer",))
        if split.perturbed_answers is None:
            out["perturbed_rouge_l_recall"] = _needs(("perturbed_answer",))
    return out


@dataclasses.dataclass(frozen=True)
class EvalSplit:
    """One split encoded for :func:`~jaxunlearn.eval.runner.evaluate_model` (all arrays share the
    padded length T).

    Attributes:
      answer: ``encode_qa`` arrays of ``[BOS] q [SEP] answer [EOS]`` (or of the chat-template
        row), (N, T) (+ ``fact_mask``).
      prompts: ``encode_prompts`` arrays of ``[BOS] q [SEP]`` (or of the chat-template prompt),
        left-padded to (N, P).
      answers: the N answer strings (ROUGE-L targets, zlib texts).
      correct: arrays of the truth ratio's correct answer, (N, T): the paraphrased answer, or
        the answer itself for a split without ``paraphrased_answer``; ``None`` without
        ``perturbed_answer``.
      perturbed: arrays of the K perturbed answers, (N, K, T), or ``None``.
      paraphrased_answers: the N paraphrased answers (ROUGE-L targets of the forget summary's
        ``paraphrased_rouge_l``), or ``None``.
      perturbed_answers: the N lists of K perturbed answers (``perturbed_rouge_l``), or ``None``.
    """

    answer: Mapping[str, np.ndarray]
    prompts: Mapping[str, np.ndarray]
    answers: tuple[str, ...]
    correct: Mapping[str, np.ndarray] | None = None
    perturbed: Mapping[str, np.ndarray] | None = None
    paraphrased_answers: tuple[str, ...] | None = None
    perturbed_answers: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self):
        n = len(self.answers)
        if n == 0:
            raise ValueError("EvalSplit has no rows (empty split)")
        for name in ("answer", "prompts", "correct", "perturbed"):
            part = getattr(self, name)
            if part is None:
                continue
            for key, arr in part.items():
                if np.shape(arr)[0] != n:
                    raise ValueError(f"EvalSplit.{name}[{key!r}] has {np.shape(arr)[0]} rows, expected {n}")
        if (self.correct is None) != (self.perturbed is None):
            raise ValueError("EvalSplit needs both `correct` and `perturbed` (truth ratio) or neither")
        for name in ("paraphrased_answers", "perturbed_answers"):
            texts = getattr(self, name)
            if texts is not None and len(texts) != n:
                raise ValueError(f"EvalSplit.{name} has {len(texts)} rows, expected {n}")
        if self.perturbed_answers is not None and len({len(t) for t in self.perturbed_answers}) > 1:
            raise ValueError("EvalSplit.perturbed_answers rows have different numbers of answers")

    @property
    def num_rows(self) -> int:
        """N, the number of examples."""
        return len(self.answers)


def _pad_right(enc: Mapping[str, np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
    out = {}
    for key, arr in enc.items():
        if key in ("prompt_lengths", "lengths"):
            out[key] = arr
            continue
        extra = length - arr.shape[-1]
        fill = pad_id if key == "input_ids" else 0
        widths = [(0, 0)] * (arr.ndim - 1) + [(0, extra)]
        out[key] = np.pad(arr, widths, constant_values=fill)
    return out


def _pad_left(enc: Mapping[str, np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
    out = {}
    for key, arr in enc.items():
        if key == "prompt_lengths":
            out[key] = arr
            continue
        fill = pad_id if key == "input_ids" else 0
        out[key] = np.pad(arr, [(0, 0), (length - arr.shape[-1], 0)], constant_values=fill)
    return out


def _role_of(name: str, roles: Mapping[str, str]) -> str:
    return roles.get(name, "holdout")


def encode_eval_splits(
    tokenizer,
    splits: Mapping[str, datasets.Dataset],
    *,
    roles: Mapping[str, str] | None = None,
    max_length: int | None = None,
    separator: str | None = None,
    chat_template: bool | ChatFormat | None = None,
) -> dict[str, EvalSplit]:
    """Encode benchmark splits for :func:`~jaxunlearn.eval.runner.evaluate_model`, all with one
    padded length.

    Every split is encoded for its answer (and, where it has the columns, the truth-ratio
    answers: ``paraphrased_answer`` or else ``answer``, and ``perturbed_answer``), then padded
    to the longest row over all splits and columns, so each jitted pass compiles once.

    Args:
      tokenizer: the model's tokenizer (``bos/eos/pad`` and, with ``separator=None``, ``sep``).
      splits: ``{name: datasets.Dataset}`` in the TOFU column schema.
      roles: ``{name: "forget" | "retain" | "general" | "holdout"}``; the role sets the columns
        of the truth ratio (:func:`truth_ratio_columns`: encoded only when the split has them all);
        unnamed splits are ``"holdout"``. Every split needs ``question`` and ``answer``.
      max_length: padded length T; ``None`` = the longest row. A longer row is an error.
      separator: text between question and answer, as in ``jaxunlearn.data.encode_qa``.
      chat_template: ``None`` (the tokenizer's chat template when it has one), ``False``,
        ``True`` or a ``jaxunlearn.data.ChatFormat``, as in ``jaxunlearn.data.encode_qa``.

    Returns:
      ``{name: EvalSplit}``.

    Raises:
      KeyError: a split lacks ``question`` or ``answer`` (split and columns named: nothing can be
        computed on it), or an unknown role.
      ValueError: an empty split, a row longer than ``max_length``.
    """
    roles = dict(roles or {})
    for name, role in roles.items():
        if role not in ROLE_COLUMNS:
            raise KeyError(f"unknown role {role!r} for split {name!r}; roles: {sorted(ROLE_COLUMNS)}")
        if name not in splits:
            raise KeyError(f"split {name!r} (role {role!r}) not in the data (have {sorted(splits)})")
    if not splits:
        raise ValueError("no splits to encode")
    raw = {}
    for name, ds in splits.items():
        if not isinstance(ds, datasets.Dataset):
            raise TypeError(f"split {name!r} is a {type(ds).__name__}, expected a datasets.Dataset")
        missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
        if missing:
            raise KeyError(f"split {name!r} (role {_role_of(name, roles)!r}) is missing column(s) {missing}; "
                           f"it has {ds.column_names}: nothing can be evaluated without question and answer")
        if len(ds) == 0:
            raise ValueError(f"split {name!r} is empty: nothing to evaluate")
        fmt = dict(separator=separator, chat_template=chat_template)
        answer = encode_split(tokenizer, ds, max_length=max_length, **fmt)
        correct = perturbed = None
        texts = {"answers": tuple(ds["answer"])}
        if "paraphrased_answer" in ds.column_names:
            texts["paraphrased_answers"] = tuple(ds["paraphrased_answer"])
        if "perturbed_answer" in ds.column_names:
            texts["perturbed_answers"] = tuple(tuple(a) for a in ds["perturbed_answer"])
        if all(c in ds.column_names for c in truth_ratio_columns(_role_of(name, roles))):
            col = "paraphrased_answer" if "paraphrased_answer" in ds.column_names else "answer"
            correct = encode_split(tokenizer, ds, max_length=max_length, answer_column=col, fact_column=None, **fmt)
            perturbed = encode_split(tokenizer, ds, max_length=max_length, answer_column="perturbed_answer", **fmt)
        prompts = encode_prompts(tokenizer, list(ds["question"]), max_length=None, **fmt)
        raw[name] = (answer, correct, perturbed, prompts, texts)
    length = max_length or max(p["input_ids"].shape[-1] for r in raw.values() for p in r[:3] if p is not None)
    p_len = max(r[3]["input_ids"].shape[-1] for r in raw.values())
    pad = int(tokenizer.pad_token_id)
    return {
        name: EvalSplit(
            answer=_pad_right(a, length, pad),
            prompts=_pad_left(p, p_len, pad),
            correct=None if c is None else _pad_right(c, length, pad),
            perturbed=None if q is None else _pad_right(q, length, pad),
            **texts,
        )
        for name, (a, c, q, p, texts) in raw.items()
    }
