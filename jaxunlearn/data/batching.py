"""Tokenisation of question/answer pairs into fixed-shape batches (numpy, host side).

A training row is ``[BOS] question [SEP] answer [EOS]`` then right padding; following
the batch convention of ``jaxunlearn.losses``:

- ``input_ids``      int32 (N, T), padded with ``tokenizer.pad_token_id``;
- ``attention_mask`` int32 (N, T), 1 on the ``L_n`` real tokens;
- ``loss_mask``      float32 (N, T), 1 on the answer tokens and the EOS, i.e. on
  positions ``P_n <= t < L_n`` with ``P_n`` the prompt length (BOS + question + SEP);
- ``fact_mask``      float32 (N, T), 1 on the answer tokens whose character span
  overlaps the ``fact`` substring of the answer (for fact-token accuracy: answer-token
  accuracy alone is a weak signal on templated answers, where the template words are
  predictable without the fact);
- ``prompt_lengths`` int32 (N,) = ``P_n``; ``lengths`` int32 (N,) = ``L_n``.

Question and answer are tokenised separately (``add_special_tokens=False``) and the ids
concatenated, so the mask is exact whatever the tokenizer merges. Rows never get
truncated: a row longer than ``max_length`` is an error naming it.

Chat template. When the tokenizer has a ``chat_template`` (an instruction-tuned model's), a row
is encoded as open-unlearning's ``preprocess_chat_instance`` does (``src/data/utils.py``) instead:
with the chat ``[system?] user: q, assistant: a``,

- the full row is ``apply_chat_template(chat, add_generation_prompt=False)`` (the template's
  own special tokens, no others), plus an EOS if the last id is not already the EOS;
- the prompt is ``apply_chat_template(chat[:-1], add_generation_prompt=True)`` and
  ``loss_mask`` covers positions ``len(prompt) <= t < L``: the answer, whatever the template
  closes the turn with, and the EOS;
- generation prompts (``encode_prompts``) are that prompt.

Templates render text that is then tokenised with ``add_special_tokens=False``, exactly what
``apply_chat_template(..., tokenize=True)`` does. :class:`ChatFormat` carries the system prompt
and the template's extra variables; ``chat_template=False`` forces the plain format.

``batch_iterator`` yields batches of a fixed size so shapes stay static under ``jit``:
an incomplete last batch is filled with copies of real rows whose ``loss_mask`` and
``fact_mask`` are zero and whose ``weight`` is 0 (copies rather than all-padding rows,
so no row has an all-zero attention mask, which would make attention softmax NaN).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

import datasets
import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ChatFormat",
    "encode_qa",
    "encode_prompts",
    "encode_split",
    "num_batches",
    "batch_iterator",
]

# Keys zeroed on the padding rows of an incomplete batch (they select tokens to score).
_ZERO_ON_PADDING = ("loss_mask", "fact_mask")
_RESERVED = ("weight", "index")


def _special_id(tokenizer: PreTrainedTokenizerBase, role: str) -> int:
    tid = getattr(tokenizer, role + "_id", None)
    if tid is None:
        raise ValueError(f"tokenizer has no {role} (needed to build the sequences); set tokenizer.{role}")
    return int(tid)


def _separator_ids(tokenizer: PreTrainedTokenizerBase, separator: str | None) -> list[int]:
    if separator is None:
        return [_special_id(tokenizer, "sep_token")]
    if not isinstance(separator, str):
        raise TypeError(f"separator must be a string or None, got {type(separator).__name__}")
    return list(tokenizer.encode(separator, add_special_tokens=False)) if separator else []


def _check_texts(name: str, texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a sequence of strings, not a single string")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty: nothing to encode (empty split?)")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] is {type(t).__name__}, expected str")
    return texts


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], offsets: bool = False):
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    return enc["input_ids"], (enc["offset_mapping"] if offsets else None)


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """How a question/answer pair is put in the tokenizer's chat template (open-unlearning's
    ``template_args`` with ``apply_chat_template: True``).

    Attributes:
      system_prompt: content of a system message put first; ``None`` or ``""``: no system
        message (the template may still add its own default). open-unlearning's configs use
        ``"You are a helpful assistant."`` for Llama-3.x-Instruct, Qwen2.5-Instruct, Phi-3.5 and
        zephyr, none for gemma (whose template refuses a system role).
      template_kwargs: extra variables for the template, e.g. ``{"date_string": "10 Apr 2025"}``
        (open-unlearning's pinned date: Llama-3.x templates otherwise print today's date, so the
        encoding would change from day to day).
    """

    system_prompt: str | None = None
    template_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise TypeError(f"system_prompt must be a string or None, got {type(self.system_prompt).__name__}")
        if not isinstance(self.template_kwargs, Mapping):
            raise TypeError(f"template_kwargs must be a mapping, got {type(self.template_kwargs).__name__}")

    def chat(self, question: str, answer: str | None = None) -> list[dict[str, str]]:
        """The messages ``[system?, user: question, assistant: answer?]``."""
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        msgs.append({"role": "user", "content": question})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return msgs


#: ``chat_template=`` argument: ``None`` (the template if the tokenizer has one), ``False``
#: (never), ``True`` (the template, default :class:`ChatFormat`), or a :class:`ChatFormat`.
ChatTemplateArg = Union[bool, ChatFormat, None]


def _chat_format(tokenizer: PreTrainedTokenizerBase, chat_template: ChatTemplateArg,
                 separator: str | None) -> ChatFormat | None:
    """The :class:`ChatFormat` to encode with, or ``None`` for the plain ``[BOS] q [SEP] a`` format."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is None:
        fmt = ChatFormat() if has else None
    elif chat_template is False:
        fmt = None
    elif chat_template is True or isinstance(chat_template, ChatFormat):
        if not has:
            raise ValueError("chat_template was requested but the tokenizer has no chat_template")
        fmt = ChatFormat() if chat_template is True else chat_template
    else:
        raise TypeError(f"chat_template must be None, a bool or a ChatFormat, got {type(chat_template).__name__}")
    if fmt is not None and separator is not None:
        raise ValueError("separator applies to the plain format only, and this tokenizer has a chat template: "
                         "pass chat_template=False to use a separator")
    return fmt


def _render(tokenizer: PreTrainedTokenizerBase, fmt: ChatFormat, questions: list[str],
            answers: list[str] | None) -> list[str]:
    """Rendered template text per row: the full chat (with answers) or the generation prompt."""
    if answers is None:
        return [tokenizer.apply_chat_template(fmt.chat(q), tokenize=False, add_generation_prompt=True,
                                              **fmt.template_kwargs) for q in questions]
    return [tokenizer.apply_chat_template(fmt.chat(q, a), tokenize=False, add_generation_prompt=False,
                                          **fmt.template_kwargs) for q, a in zip(questions, answers)]


def _chat_rows(tokenizer, fmt: ChatFormat, questions, answers, facts, eos: int):
    """Template-path rows: ``(ids, prompt_length, fact_positions or None)`` per row."""
    texts = _render(tokenizer, fmt, questions, answers)
    full, off = _tokenize(tokenizer, texts, offsets=facts is not None)
    prompt_ids, _ = _tokenize(tokenizer, _render(tokenizer, fmt, questions, None))
    rows = []
    for i, (ids, p) in enumerate(zip(full, prompt_ids)):
        ids = list(ids) if ids and ids[-1] == eos else [*ids, eos]
        hits = None
        if facts is not None:
            fact = facts[i]
            # search the fact from the first answer-side token on (the question may name it too)
            start = off[i][len(p)][0] if len(p) < len(off[i]) else len(texts[i])
            c0 = texts[i].find(fact, start) if fact else -1
            if c0 < 0:
                raise ValueError(f"row {i}: fact {fact!r} is not a non-empty substring of answer {answers[i]!r}")
            c1 = c0 + len(fact)
            hits = [j for j, (s, e) in enumerate(off[i]) if j >= len(p) and e > s and s < c1 and e > c0]
        rows.append((ids, len(p), hits))
    return rows


def _plain_rows(tokenizer, questions, answers, facts, bos: int, eos: int, sep: list[int]):
    """Plain-format rows ``[BOS] q [SEP] a [EOS]``: ``(ids, prompt_length, fact_positions or None)``."""
    q_ids, _ = _tokenize(tokenizer, questions)
    a_ids, a_off = _tokenize(tokenizer, answers, offsets=facts is not None)
    rows = []
    for i, (q, a) in enumerate(zip(q_ids, a_ids)):
        prompt = [bos, *q, *sep]
        hits = None
        if facts is not None:
            fact = facts[i]
            c0 = answers[i].find(fact) if fact else -1
            if c0 < 0:
                raise ValueError(f"row {i}: fact {fact!r} is not a non-empty substring of answer {answers[i]!r}")
            c1 = c0 + len(fact)
            hits = [len(prompt) + j for j, (s, e) in enumerate(a_off[i]) if e > s and s < c1 and e > c0]
        rows.append(([*prompt, *a, eos], len(prompt), hits))
    return rows


def _too_long(i: int, length: int, max_length: int, question: str) -> ValueError:
    short = question if len(question) <= 60 else question[:57] + "..."
    return ValueError(f"row {i} needs {length} tokens > max_length={max_length} "
                      f"(question {short!r}); rows are never truncated: raise max_length")


def encode_qa(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    max_length: int | None,
    facts: Sequence[str] | None = None,
    separator: str | None = None,
    chat_template: ChatTemplateArg = None,
) -> dict[str, np.ndarray]:
    """Encodes ``[BOS] q [SEP] a [EOS]`` rows (or chat-template rows) with right padding and
    answer-token masks.

    Args:
      tokenizer: a Hugging Face tokenizer with ``bos/eos/pad`` tokens (and ``sep_token`` when
        ``separator`` is None); a fast tokenizer when ``facts`` is given (offsets). With a chat
        template, ``eos/pad`` only.
      questions: N question strings.
      answers: N answer strings.
      max_length: padded length T; ``None`` = the longest row. A longer row is an error.
      facts: optional N strings, each a substring of its answer (first occurrence used);
        adds ``fact_mask``.
      separator: text put between question and answer; ``None`` = the tokenizer's
        ``sep_token``; ``""`` = nothing. Plain format only.
      chat_template: ``None`` = the tokenizer's chat template when it has one (see the module
        docstring), else the plain format; ``False`` = the plain format; ``True`` or a
        :class:`ChatFormat` = the template (an error if the tokenizer has none).

    Returns:
      ``input_ids`` int32 (N, T), ``attention_mask`` int32 (N, T), ``loss_mask`` float32
      (N, T), ``prompt_lengths`` int32 (N,), ``lengths`` int32 (N,), and ``fact_mask``
      float32 (N, T) when ``facts`` is given (see the module docstring).
    """
    questions = _check_texts("questions", questions)
    answers = _check_texts("answers", answers)
    if len(answers) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if facts is not None:
        facts = _check_texts("facts", facts)
        if len(facts) != len(answers):
            raise ValueError(f"{len(answers)} answers but {len(facts)} facts")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("fact_mask needs token offsets: pass a fast tokenizer")
    fmt = _chat_format(tokenizer, chat_template, separator)
    eos, pad = _special_id(tokenizer, "eos_token"), _special_id(tokenizer, "pad_token")
    if fmt is None:
        rows = _plain_rows(tokenizer, questions, answers, facts, _special_id(tokenizer, "bos_token"), eos,
                           _separator_ids(tokenizer, separator))
    else:
        rows = _chat_rows(tokenizer, fmt, questions, answers, facts, eos)
    lengths = [len(ids) for ids, _, _ in rows]
    if max_length is None:
        max_length = max(lengths)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    n = len(questions)
    input_ids = np.full((n, max_length), pad, np.int32)
    attention_mask = np.zeros((n, max_length), np.int32)
    loss_mask = np.zeros((n, max_length), np.float32)
    fact_mask = np.zeros((n, max_length), np.float32) if facts is not None else None
    for i, ((ids, p_len, hits), length) in enumerate(zip(rows, lengths)):
        if length > max_length:
            raise _too_long(i, length, max_length, questions[i])
        input_ids[i, :length] = ids
        attention_mask[i, :length] = 1
        loss_mask[i, p_len:length] = 1.0
        if fact_mask is not None:
            if not hits:  # pragma: no cover - a non-empty span always overlaps some token
                raise ValueError(f"row {i}: no answer token covers fact {facts[i]!r}")
            fact_mask[i, hits] = 1.0
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "prompt_lengths": np.asarray([p_len for _, p_len, _ in rows], np.int32),
        "lengths": np.asarray(lengths, np.int32),
    }
    if fact_mask is not None:
        out["fact_mask"] = fact_mask
    return out


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    *,
    max_length: int | None,
    separator: str | None = None,
    chat_template: ChatTemplateArg = None,
) -> dict[str, np.ndarray]:
    """Encodes generation prompts ``[BOS] q [SEP]`` (or the chat template's prompt with the
    generation header), LEFT padded so all prompts end at T - 1.

    Args:
      tokenizer: a Hugging Face tokenizer with ``bos/pad`` (and ``sep``) tokens; with a chat
        template, ``pad`` only.
      questions: N question strings.
      max_length: padded length T; ``None`` = the longest prompt. A longer prompt is an error.
      separator: as in ``encode_qa``.
      chat_template: as in ``encode_qa``; the prompt is then the ids that ``encode_qa``'s
        ``loss_mask`` starts after.

    Returns:
      ``input_ids`` int32 (N, T) (pad ids on the left), ``attention_mask`` int32 (N, T),
      ``position_ids`` int32 (N, T) = ``max(cumsum(attention_mask) - 1, 0)`` (0 on padding,
      so the first real token is at position 0), ``prompt_lengths`` int32 (N,).
    """
    questions = _check_texts("questions", questions)
    pad = _special_id(tokenizer, "pad_token")
    fmt = _chat_format(tokenizer, chat_template, separator)
    if fmt is None:
        bos, sep = _special_id(tokenizer, "bos_token"), _separator_ids(tokenizer, separator)
        q_ids, _ = _tokenize(tokenizer, questions)
        prompts = [[bos, *q, *sep] for q in q_ids]
    else:
        prompts, _ = _tokenize(tokenizer, _render(tokenizer, fmt, questions, None))
    if max_length is None:
        max_length = max(len(p) for p in prompts)
    n = len(prompts)
    input_ids = np.full((n, max_length), pad, np.int32)
    attention_mask = np.zeros((n, max_length), np.int32)
    for i, p in enumerate(prompts):
        if len(p) > max_length:
            raise _too_long(i, len(p), max_length, questions[i])
        input_ids[i, max_length - len(p):] = p
        attention_mask[i, max_length - len(p):] = 1
    position_ids = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "prompt_lengths": np.asarray([len(p) for p in prompts], np.int32),
    }


def encode_split(
    tokenizer: PreTrainedTokenizerBase,
    dataset: datasets.Dataset,
    *,
    max_length: int | None,
    answer_column: str = "answer",
    fact_column: str | None = "fact",
    separator: str | None = None,
    chat_template: ChatTemplateArg = None,
) -> dict[str, np.ndarray]:
    """``encode_qa`` on a benchmark split, for any of its answer columns.

    A string column (``answer``, ``paraphrased_answer``) gives (N, T) arrays, with
    ``fact_mask`` when ``fact_column`` is a column of the split (the fact occurs in the
    answer and in its paraphrase). A list column (``perturbed_answer``, K answers per
    row, K equal across rows) gives (N, K, T) arrays (``prompt_lengths``/``lengths``
    (N, K)) and no ``fact_mask`` (perturbed answers carry wrong values).

    Args:
      tokenizer: as in ``encode_qa``.
      dataset: a split with a ``question`` column and ``answer_column``.
      max_length: as in ``encode_qa``.
      answer_column: the column of answers to encode.
      fact_column: column of fact substrings, or ``None`` for no ``fact_mask``.
      separator: as in ``encode_qa``.
      chat_template: as in ``encode_qa``.

    Returns:
      The dict of ``encode_qa``, shaped as above.
    """
    for col in ("question", answer_column):
        if col not in dataset.column_names:
            raise KeyError(f"column {col!r} not in the split (columns: {dataset.column_names})")
    if len(dataset) == 0:
        raise ValueError("the split is empty: nothing to encode")
    questions = list(dataset["question"])
    answers = list(dataset[answer_column])
    if all(isinstance(a, str) for a in answers):
        facts = None
        if fact_column is not None and fact_column in dataset.column_names:
            facts = list(dataset[fact_column])
        return encode_qa(tokenizer, questions, answers, max_length=max_length, facts=facts,
                         separator=separator, chat_template=chat_template)
    k = None
    for i, a in enumerate(answers):
        if not isinstance(a, list) or not a:
            raise ValueError(f"row {i} of {answer_column!r} is {a!r}: expected a string or a non-empty list")
        if k is None:
            k = len(a)
        elif len(a) != k:
            raise ValueError(f"row {i} of {answer_column!r} has {len(a)} answers, row 0 has {k}")
    flat = encode_qa(tokenizer, [q for q in questions for _ in range(k)],
                     [x for a in answers for x in a], max_length=max_length, separator=separator,
                     chat_template=chat_template)
    n = len(questions)
    return {key: v.reshape(n, k, *v.shape[1:]) for key, v in flat.items()}


def num_batches(num_rows: int, batch_size: int, *, drop_last: bool = False) -> int:
    """Batches per epoch: ``floor(N / B)`` with ``drop_last``, else ``ceil(N / B)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return num_rows // batch_size if drop_last else -(-num_rows // batch_size)


def batch_iterator(
    encoded: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    epochs: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size batches over the rows of ``encoded``, for ``epochs`` passes.

    Each epoch visits the rows in order, or in ``numpy.random.default_rng(seed)``'s
    permutation for that epoch when ``shuffle``. Every batch has exactly ``batch_size``
    rows, plus ``weight`` float32 (B,) (1 real row, 0 padding) and ``index`` int32 (B,)
    (the row of ``encoded`` each batch row comes from). An incomplete last batch of an
    epoch is dropped if ``drop_last``, else filled with copies of the epoch's first rows
    with zero ``loss_mask``/``fact_mask`` and ``weight`` 0, so a masked loss summed over
    the batch counts each real row exactly once per epoch.

    Args:
      encoded: arrays with a common leading dimension N (e.g. from ``encode_qa``).
      batch_size: rows per batch, >= 1.
      shuffle: permute the rows each epoch.
      seed: seed of the permutations.
      drop_last: drop an incomplete last batch instead of padding it.
      epochs: number of passes, >= 1.

    Returns:
      An iterator of dicts of numpy arrays, ``epochs * num_batches(N, B, drop_last)`` long.
    """
    if not encoded:
        raise ValueError("encoded is empty: no arrays to batch")
    reserved = [k for k in _RESERVED if k in encoded]
    if reserved:
        raise ValueError(f"keys {reserved} are reserved for the iterator's outputs")
    arrays = {}
    n = None
    for key, value in encoded.items():
        if not isinstance(value, np.ndarray) or value.ndim < 1:
            raise TypeError(f"encoded[{key!r}] must be a numpy array with a leading row axis")
        if n is None:
            n = value.shape[0]
        elif value.shape[0] != n:
            raise ValueError(f"encoded[{key!r}] has {value.shape[0]} rows, others have {n}")
        arrays[key] = value
    if n == 0:
        raise ValueError("encoded has 0 rows (empty split)")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    per_epoch = num_batches(n, batch_size, drop_last=drop_last)
    if per_epoch == 0:
        raise ValueError(f"drop_last=True with batch_size={batch_size} > {n} rows yields no batch")

    def gen() -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            order = rng.permutation(n) if shuffle else np.arange(n)
            for b in range(per_epoch):
                idx = order[b * batch_size:(b + 1) * batch_size]
                valid = len(idx)
                if valid < batch_size:
                    idx = np.concatenate([idx, np.resize(order, batch_size - valid)])
                batch = {k: v[idx] for k, v in arrays.items()}
                for k in _ZERO_ON_PADDING:
                    if k in batch:
                        batch[k][valid:] = 0
                weight = np.zeros((batch_size,), np.float32)
                weight[:valid] = 1.0
                batch["weight"] = weight
                batch["index"] = idx.astype(np.int32)
                yield batch

    return gen()
