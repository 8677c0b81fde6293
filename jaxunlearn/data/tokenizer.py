"""A small deterministic BPE tokenizer for the synthetic benchmark.

Pipeline (``tokenizers`` library): no normaliser; pre-tokenizer = Metaspace (every
whitespace character becomes ``▁`` and starts a new word; a ``▁`` is prepended to the
text) followed by isolating punctuation (optionally single digits); model = BPE with
``<unk>``; decoder = Metaspace. So ``decode(encode(text)) == text`` for any text whose
whitespace is plain spaces, that does not start with a space, and whose characters were
seen in training. BPE never merges across words, so a word's tokens do not depend on
its neighbours and every answer word has its own token span (used by the fact mask).

Special tokens take the first ids, in this order: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` (BOS)
2, ``</s>`` (EOS) 3, ``<sep>`` (separates question and answer) 4; the returned
``transformers.PreTrainedTokenizerFast`` has ``pad/unk/bos/eos/sep_token`` set to them.
Saved with ``save_pretrained``, it reloads through ``AutoTokenizer`` (as
``TokenizersBackend`` in transformers 5) with the same ids.

References:
  Sennrich, Haddow, Birch, "Neural Machine Translation of Rare Words with Subword Units",
  2016 (BPE); Kudo, Richardson, "SentencePiece", 2018 (the ``▁`` meta-space).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import datasets
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["SPECIAL_TOKENS", "train_tokenizer", "benchmark_texts"]

# role -> token; the order gives the ids 0, 1, 2, ...
SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "sep_token": "<sep>",
}
_TEXT_COLUMNS = ("question", "answer", "paraphrased_answer", "perturbed_answer")


def benchmark_texts(
    dataset_dict: datasets.DatasetDict | Mapping[str, datasets.Dataset],
    splits: Sequence[str] | None = None,
    columns: Sequence[str] = _TEXT_COLUMNS,
) -> list[str]:
    """Distinct strings of the text columns of some splits, in first-seen order.

    Strings are visited split by split, column by column, row by row.

    Splits overlap (``forget05`` contains ``forget01``), so strings are de-duplicated:
    each distinct question or answer counts once in the tokenizer's statistics.

    Args:
      dataset_dict: the benchmark (split name -> ``datasets.Dataset``).
      splits: split names to read; ``None`` = all, in the dict's order.
      columns: text columns; list-valued columns (``perturbed_answer``) are flattened.
        Columns a split lacks are skipped.

    Returns:
      The list of distinct strings.
    """
    names = list(dataset_dict) if splits is None else list(splits)
    missing = [s for s in names if s not in dataset_dict]
    if missing:
        raise KeyError(f"splits {missing} not in the dataset (have {list(dataset_dict)})")
    seen: dict[str, None] = {}
    for split in names:
        ds = dataset_dict[split]
        for col in columns:
            if col not in ds.column_names:
                continue
            for value in ds[col]:
                for text in value if isinstance(value, list) else (value,):
                    seen.setdefault(text, None)
    return list(seen)


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 1024,
    min_frequency: int = 2,
    max_token_length: int | None = None,
    individual_digits: bool = False,
) -> transformers.PreTrainedTokenizerFast:
    """Trains a BPE tokenizer on ``texts`` (see the module docstring for the pipeline).

    Training is deterministic: the same texts and arguments give the same vocabulary
    and merges.

    Args:
      texts: training strings (at least one non-empty).
      vocab_size: size of the final vocabulary, special tokens and alphabet included.
      min_frequency: a pair is merged only if it occurs at least this often.
      max_token_length: no token longer than this many characters (``None``: no limit).
      individual_digits: split numbers into single digits before BPE.

    Returns:
      A ``transformers.PreTrainedTokenizerFast`` with ``padding_side="right"`` and the
      special tokens of ``SPECIAL_TOKENS`` (ids 0..4).

    >>> tok = train_tokenizer(["Kalo was born in Dunmere.", "Kalo writes poems."], vocab_size=60)
    >>> tok.decode(tok.encode("Kalo writes.", add_special_tokens=False))
    'Kalo writes.'
    """
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not a single string")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts[{bad[0]}] is {type(texts[bad[0]]).__name__}, expected str")
    if not any(t.strip() for t in texts):
        raise ValueError("texts is empty: nothing to train a tokenizer on")
    specials = list(SPECIAL_TOKENS.values())
    if vocab_size <= len(specials):
        raise ValueError(f"vocab_size={vocab_size} leaves no room beside {len(specials)} special tokens")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    if max_token_length is not None and max_token_length < 1:
        raise ValueError(f"max_token_length must be >= 1 or None, got {max_token_length}")

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    steps = [
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ]
    if individual_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        max_token_length=max_token_length,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )
    for i, (role, token) in enumerate(SPECIAL_TOKENS.items()):
        got = getattr(wrapped, role + "_id")
        if got != i:  # pragma: no cover - the trainer puts special tokens first
            raise RuntimeError(f"internal error: {role} {token!r} has id {got}, expected {i}")
    return wrapped
