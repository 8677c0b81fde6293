"""Data: the synthetic fictitious-facts benchmark, TOFU-format files, tokeniser, batches.

- ``synthetic``: ``generate_benchmark`` (TOFU-shaped splits of invented people's facts);
- ``tokenizer``: ``train_tokenizer`` (small deterministic BPE), ``benchmark_texts``;
- ``muse``: MUSE-format corpora (``load_muse`` / ``save_muse``, ``encode_passages``,
  ``encode_passage_windows``);
  ``synthetic_muse``: MUSE-shaped passages and knowledge QA about the synthetic people;
- ``io``: ``save_benchmark`` / ``load_benchmark`` (atomic, with the tokenizer), ``load_tofu``;
- ``batching``: ``encode_qa`` / ``encode_prompts`` / ``encode_split`` (masks of the batch
  convention in ``jaxunlearn.losses``, plus ``fact_mask``; the tokenizer's chat template when it
  has one, set by ``ChatFormat``), ``batch_iterator``.
"""

from jaxunlearn.data.batching import (
    ChatFormat,
    batch_iterator,
    encode_prompts,
    encode_qa,
    encode_split,
    num_batches,
)
from jaxunlearn.data.muse import (MUSE_RAW_SPLITS, MUSE_SPLITS, MuseData, encode_passage_windows, encode_passages,
                                 load_muse, save_muse)
from jaxunlearn.data.io import TOFU_EVAL_COLUMNS, load_benchmark, load_tofu, save_benchmark
from jaxunlearn.data.synthetic import (
    ATTRIBUTES,
    BENCHMARK_FEATURES,
    FORGET_SPLITS,
    GENERAL_ATTRIBUTES,
    RETAIN_SPLITS,
    attribute_values,
    generate_benchmark,
    split_sizes,
)
from jaxunlearn.data.synthetic_muse import generate_muse_benchmark
from jaxunlearn.data.tokenizer import SPECIAL_TOKENS, benchmark_texts, train_tokenizer

__all__ = [
    "save_muse",
    "load_muse",
    "generate_muse_benchmark",
    "encode_passages",
    "encode_passage_windows",
    "MuseData",
    "MUSE_SPLITS",
    "MUSE_RAW_SPLITS",
    "ATTRIBUTES",
    "BENCHMARK_FEATURES",
    "ChatFormat",
    "FORGET_SPLITS",
    "GENERAL_ATTRIBUTES",
    "RETAIN_SPLITS",
    "SPECIAL_TOKENS",
    "TOFU_EVAL_COLUMNS",
    "attribute_values",
    "batch_iterator",
    "benchmark_texts",
    "encode_prompts",
    "encode_qa",
    "encode_split",
    "generate_benchmark",
    "load_benchmark",
    "load_tofu",
    "num_batches",
    "save_benchmark",
    "split_sizes",
    "train_tokenizer",
]
