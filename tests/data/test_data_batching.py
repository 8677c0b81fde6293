"""Tests of QA encoding, masks, prompts and fixed-size batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.data import (
    batch_iterator,
    benchmark_texts,
    encode_prompts,
    encode_qa,
    encode_split,
    generate_benchmark,
    num_batches,
    train_tokenizer,
)
from jaxunlearn.losses import sequence_nll


@pytest.fixture(scope="module")
def bench():
    return generate_benchmark(num_people=20, num_general=6, seed=2)


@pytest.fixture(scope="module")
def tok(bench):
    return train_tokenizer(benchmark_texts(bench), vocab_size=400)


@pytest.fixture(scope="module")
def tiny_tok():
    # Every word of these texts is frequent, so with a large vocabulary each is one token.
    texts = ["Where was Kalo born?", "Kalo was born in Dunmere.", "Kalo writes poems."] * 20
    return train_tokenizer(texts, vocab_size=200)


def test_encode_qa_hand_written_case(tiny_tok):
    enc = encode_qa(tiny_tok, ["Where was Kalo born?"], ["Kalo was born in Dunmere."],
                    max_length=16, facts=["Dunmere"])
    tokens = tiny_tok.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    assert tokens == ["<s>", "▁Where", "▁was", "▁Kalo", "▁born", "?", "<sep>",
                      "▁Kalo", "▁was", "▁born", "▁in", "▁Dunmere", ".", "</s>", "<pad>", "<pad>"]
    np.testing.assert_array_equal(enc["attention_mask"][0], [1] * 14 + [0] * 2)
    np.testing.assert_array_equal(enc["loss_mask"][0], [0] * 7 + [1] * 7 + [0] * 2)
    np.testing.assert_array_equal(enc["fact_mask"][0], [0] * 11 + [1] + [0] * 4)
    assert enc["prompt_lengths"].tolist() == [7] and enc["lengths"].tolist() == [14]
    assert enc["input_ids"].dtype == np.int32 and enc["attention_mask"].dtype == np.int32
    assert enc["loss_mask"].dtype == np.float32 and enc["fact_mask"].dtype == np.float32


def test_loss_mask_covers_exactly_the_answer_and_eos(tok, bench):
    ds = bench["forget10"]
    enc = encode_split(tok, ds, max_length=48)
    for i in (0, 3, len(ds) - 1):
        ids = enc["input_ids"][i]
        m = enc["loss_mask"][i] > 0
        masked = ids[m].tolist()
        assert masked[-1] == tok.eos_token_id
        assert tok.decode(masked[:-1]) == ds[i]["answer"]
        prompt = ids[: enc["prompt_lengths"][i]].tolist()
        assert prompt[0] == tok.bos_token_id and prompt[-1] == tok.sep_token_id
        assert tok.decode(prompt[1:-1]) == ds[i]["question"]
        # Masked positions are one contiguous run right after the prompt.
        np.testing.assert_array_equal(np.flatnonzero(m), np.arange(len(prompt), enc["lengths"][i]))
        assert (ids[enc["lengths"][i]:] == tok.pad_token_id).all()


def test_fact_mask_tokens_decode_to_the_fact(tok, bench):
    for split, column in (("retain90", "answer"), ("general", "answer"), ("holdout", "paraphrased_answer")):
        ds = bench[split]
        enc = encode_split(tok, ds, max_length=48, answer_column=column)
        assert ((enc["fact_mask"] > 0) <= (enc["loss_mask"] > 0)).all()
        for i in range(len(ds)):
            ids = enc["input_ids"][i][enc["fact_mask"][i] > 0].tolist()
            assert tok.decode(ids).strip() == ds[i]["fact"], (split, i)
            # Contiguous: the fact is one run of tokens.
            pos = np.flatnonzero(enc["fact_mask"][i])
            np.testing.assert_array_equal(pos, np.arange(pos[0], pos[-1] + 1))


def test_masks_follow_the_loss_convention(tok, bench):
    """With uniform logits, sequence_nll = (answer tokens + EOS) * log V."""
    enc = encode_split(tok, bench["forget05"], max_length=40)
    v = len(tok)
    logits = jnp.zeros(enc["input_ids"].shape + (v,), jnp.float32)
    nll = jax.jit(sequence_nll)(logits, jnp.asarray(enc["input_ids"]), jnp.asarray(enc["loss_mask"]))
    expected = (enc["lengths"] - enc["prompt_lengths"]) * np.log(v)
    np.testing.assert_allclose(np.asarray(nll), expected, rtol=1e-5)


def test_perturbed_answers_encode_to_n_k_t(tok, bench):
    ds = bench["forget05"]
    enc = encode_split(tok, ds, max_length=48, answer_column="perturbed_answer")
    n, k = len(ds), len(ds[0]["perturbed_answer"])
    assert enc["input_ids"].shape == (n, k, 48) and enc["prompt_lengths"].shape == (n, k)
    assert "fact_mask" not in enc
    for i, j in ((0, 0), (n - 1, k - 1)):
        ref = encode_qa(tok, [ds[i]["question"]], [ds[i]["perturbed_answer"][j]], max_length=48)
        for key in ref:
            np.testing.assert_array_equal(enc[key][i, j], ref[key][0])


def test_max_length_none_pads_to_the_longest(tok, bench):
    ds = bench["general"]
    enc = encode_split(tok, ds, max_length=None)
    assert enc["input_ids"].shape[1] == enc["lengths"].max()


def test_encode_errors(tok, bench):
    ds = bench["forget05"]
    q, a = list(ds["question"][:3]), list(ds["answer"][:3])
    lengths = encode_qa(tok, q, a, max_length=None)["lengths"]
    short = int(lengths[1]) - 1
    # Row 0 (a truncated answer) fits, row 1 (the full answer) is one token too long.
    q2, a2 = [q[1], q[1]], [a[1][:5], a[1]]
    with pytest.raises(ValueError, match="row 1 needs"):
        encode_qa(tok, q2, a2, max_length=short)
    with pytest.raises(ValueError, match="empty"):
        encode_qa(tok, [], [], max_length=8)
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        encode_qa(tok, q[:2], a[:1], max_length=64)
    with pytest.raises(ValueError, match="row 0: fact 'Nowhere'"):
        encode_qa(tok, q[:1], a[:1], max_length=64, facts=["Nowhere"])
    with pytest.raises(TypeError, match=r"answers\[0\]"):
        encode_qa(tok, q[:1], [None], max_length=64)
    with pytest.raises(ValueError, match="empty"):
        encode_split(tok, ds.select([]), max_length=64)
    with pytest.raises(KeyError, match="no_such"):
        encode_split(tok, ds, max_length=64, answer_column="no_such")


def test_explicit_separator(tiny_tok):
    enc = encode_qa(tiny_tok, ["Where was Kalo born?"], ["Kalo writes poems."], max_length=None,
                    separator="")
    tokens = tiny_tok.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    assert tokens == ["<s>", "▁Where", "▁was", "▁Kalo", "▁born", "?", "▁Kalo", "▁writes", "▁poems",
                      ".", "</s>"]
    assert enc["prompt_lengths"].tolist() == [6]


def test_encode_prompts_left_padded(tok, bench):
    ds = bench["retain90"]
    questions = list(ds["question"][:5])
    enc = encode_prompts(tok, questions, max_length=24)
    ref = encode_qa(tok, questions, list(ds["answer"][:5]), max_length=64)
    for i in range(5):
        p = int(enc["prompt_lengths"][i])
        assert p == ref["prompt_lengths"][i]
        np.testing.assert_array_equal(enc["input_ids"][i, 24 - p:], ref["input_ids"][i, :p])
        assert (enc["input_ids"][i, : 24 - p] == tok.pad_token_id).all()
        np.testing.assert_array_equal(enc["attention_mask"][i], [0] * (24 - p) + [1] * p)
        np.testing.assert_array_equal(enc["position_ids"][i], [0] * (24 - p) + list(range(p)))
    with pytest.raises(ValueError, match="row 0 needs"):
        encode_prompts(tok, questions[:1], max_length=3)


def _toy(n):
    return {
        "input_ids": np.arange(n * 3, dtype=np.int32).reshape(n, 3) + 5,
        "attention_mask": np.ones((n, 3), np.int32),
        "loss_mask": np.ones((n, 3), np.float32),
        "fact_mask": np.ones((n, 3), np.float32),
    }


def test_batch_iterator_order_and_padding():
    enc = _toy(7)
    batches = list(batch_iterator(enc, 3))
    assert len(batches) == num_batches(7, 3) == 3
    for b in batches:
        assert b["input_ids"].shape == (3, 3) and b["weight"].shape == (3,)
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), [0, 1, 2, 3, 4, 5, 6, 0, 1])
    last = batches[-1]
    np.testing.assert_array_equal(last["weight"], [1, 0, 0])
    np.testing.assert_array_equal(last["input_ids"], enc["input_ids"][[6, 0, 1]])
    np.testing.assert_array_equal(last["attention_mask"], np.ones((3, 3)))  # copies, not empty rows
    np.testing.assert_array_equal(last["loss_mask"].sum(1), [3, 0, 0])
    np.testing.assert_array_equal(last["fact_mask"].sum(1), [3, 0, 0])
    assert enc["loss_mask"].sum() == 21  # the source arrays are untouched
    # Each real row's loss tokens are counted exactly once.
    assert sum(b["loss_mask"].sum() for b in batches) == enc["loss_mask"].sum()


def test_batch_iterator_shuffle_epochs_and_drop_last():
    enc = _toy(10)
    run = lambda: [b["index"].copy() for b in batch_iterator(enc, 4, shuffle=True, seed=5, epochs=2)]
    a, b = run(), run()
    assert len(a) == 2 * num_batches(10, 4) == 6
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    epoch0, epoch1 = np.concatenate(a[:3])[:10], np.concatenate(a[3:])[:10]
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10))
    assert not np.array_equal(epoch0, epoch1)
    other = [x["index"] for x in batch_iterator(enc, 4, shuffle=True, seed=6, epochs=2)]
    assert not all(np.array_equal(x, y) for x, y in zip(a, other))
    dropped = list(batch_iterator(enc, 4, drop_last=True, epochs=2))
    assert len(dropped) == 2 * num_batches(10, 4, drop_last=True) == 4
    assert all(d["weight"].sum() == 4 for d in dropped)


def test_batch_iterator_errors():
    enc = _toy(4)
    with pytest.raises(ValueError, match="empty"):
        batch_iterator({}, 2)
    with pytest.raises(ValueError, match="0 rows"):
        batch_iterator({k: v[:0] for k, v in enc.items()}, 2)
    with pytest.raises(ValueError, match="'loss_mask'.*3 rows"):
        batch_iterator({**enc, "loss_mask": enc["loss_mask"][:3]}, 2)
    with pytest.raises(ValueError, match="reserved"):
        batch_iterator({**enc, "weight": np.ones(4, np.float32)}, 2)
    with pytest.raises(ValueError, match="no batch"):
        batch_iterator(enc, 5, drop_last=True)
    with pytest.raises(ValueError, match="batch_size"):
        batch_iterator(enc, 0)
    with pytest.raises(ValueError, match="epochs"):
        batch_iterator(enc, 2, epochs=0)
    with pytest.raises(TypeError, match="numpy array"):
        batch_iterator({"input_ids": [[1, 2]]}, 1)
