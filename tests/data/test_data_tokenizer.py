"""Tests of the BPE tokenizer: round trip, special ids, determinism, reload, name coverage."""

import pytest
import transformers

from jaxunlearn.data import SPECIAL_TOKENS, benchmark_texts, generate_benchmark, train_tokenizer


@pytest.fixture(scope="module")
def bench():
    return generate_benchmark(num_people=30, num_general=9, seed=1)


@pytest.fixture(scope="module")
def tok(bench):
    # Trained without the holdout split, as the demo does.
    return train_tokenizer(benchmark_texts(bench, ["forget10", "retain90", "general"]), vocab_size=400)


def _all_texts(bench):
    return benchmark_texts(bench)


def test_benchmark_texts_distinct_in_first_seen_order(bench):
    texts = benchmark_texts(bench, ["forget01", "forget05"])
    ds = bench["forget05"]  # forget01 is a subset of forget05
    expected = []
    for split in ("forget01", "forget05"):  # split by split, column by column
        for col in ("question", "answer", "paraphrased_answer", "perturbed_answer"):
            for value in bench[split][col]:
                for t in value if isinstance(value, list) else [value]:
                    if t not in expected:
                        expected.append(t)
    assert texts == expected
    assert len(texts) == len(set(texts)) <= len(ds) * 8
    with pytest.raises(KeyError, match="nope"):
        benchmark_texts(bench, ["nope"])


def test_special_tokens_have_fixed_ids(tok):
    for i, (role, token) in enumerate(SPECIAL_TOKENS.items()):
        assert getattr(tok, role) == token
        assert getattr(tok, role + "_id") == i
        assert tok.convert_ids_to_tokens(i) == token
    assert tok.padding_side == "right"
    assert len(tok) <= 400


def test_round_trip_every_text_including_holdout(tok, bench):
    for text in _all_texts(bench):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text


def test_words_are_split_on_spaces_and_punctuation(tok):
    text = "Where was Zuzo, the glazier, born? In 1957."
    tokens = tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))
    assert "".join(tokens) == "▁" + text.replace(" ", "▁")
    # No token crosses a word boundary or glues punctuation to a word.
    for t in tokens:
        assert "▁" not in t[1:], t
        assert not (len(t) > 1 and any(c in ",?." for c in t)), t
    assert tokens[-1] == "." and "?" in tokens and tokens.count(",") == 2


def test_holdout_and_forget_names_use_tokens_seen_in_retain(tok, bench):
    def name_tokens(split):
        return {t for p in set(bench[split]["person"]) for t in tok.encode(p, add_special_tokens=False)}

    retain = name_tokens("retain90")
    assert name_tokens("holdout") <= retain
    assert name_tokens("forget10") <= retain


def test_training_is_deterministic(bench):
    texts = benchmark_texts(bench, ["retain90"])
    a = train_tokenizer(texts, vocab_size=300)
    b = train_tokenizer(list(texts), vocab_size=300)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    c = train_tokenizer(texts, vocab_size=250)
    assert a.backend_tokenizer.to_str() != c.backend_tokenizer.to_str()


def test_reloads_through_auto_tokenizer(tok, bench, tmp_path):
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for role in SPECIAL_TOKENS:
        assert getattr(again, role + "_id") == getattr(tok, role + "_id")
    assert again.get_vocab() == tok.get_vocab()
    for text in benchmark_texts(bench, ["holdout"])[:50]:
        ids = again.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text, add_special_tokens=False)
        assert again.decode(ids) == text


def test_unknown_characters_map_to_unk(tok):
    ids = tok.encode("Ωmega", add_special_tokens=False)
    assert tok.unk_token_id in ids


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([])
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(["", "  "])
    with pytest.raises(TypeError, match="single string"):
        train_tokenizer("a text")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        train_tokenizer(["a", 3])
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b c"], vocab_size=5)
