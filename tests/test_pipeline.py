"""The demo's data preparation with MUSE data (jaxunlearn.pipeline): encodings, training and unlearning sets.

References are independent paths: the prompt encoding of the KnowMem evaluation
(``encode_prompts`` as ``jaxunlearn.eval.muse.knowmem`` calls it) and the decoded text of every
row (whose person it is about).
"""

import dataclasses

import numpy as np
import pytest

from jaxunlearn.data import encode_prompts, train_tokenizer
from jaxunlearn.data.muse import encode_passage_windows
from jaxunlearn.data.tokenizer import benchmark_texts
from jaxunlearn.eval.muse import knowmem_prompt
from jaxunlearn.pipeline import DemoConfig, encode_knowmem, prepare_data, training_sets, unlearning_sets

SMALL = DemoConfig(num_people=20, num_general=10, vocab_size=300, hidden_size=16, intermediate_size=32,
                   num_layers=1, num_heads=2, num_kv_heads=1, muse_qa=12)


@pytest.fixture(scope="module")
def data():
    return prepare_data(SMALL)


def _texts(tok, enc):
    return [tok.decode(ids[m > 0].tolist(), skip_special_tokens=True)
            for ids, m in zip(enc["input_ids"], enc["attention_mask"])]


def _people(data, split):
    return sorted(set(data.dataset[split]["person"]))


def test_knowmem_rows_answer_the_prompt_the_evaluation_decodes_from(data):
    tok, qa = data.tokenizer, data.muse.forget_qa
    assert len(qa) == SMALL.muse_qa and data.knowmem["forget"]["input_ids"].shape == (12, data.max_length)
    enc = encode_knowmem(tok, qa, max_length=None)
    prompts = encode_prompts(tok, [knowmem_prompt(q) for q in qa["question"]], max_length=None, separator="",
                             chat_template=False)
    for i, answer in enumerate(qa["answer"]):
        p, n = int(enc["prompt_lengths"][i]), int(enc["lengths"][i])
        want = prompts["input_ids"][i][prompts["attention_mask"][i] > 0]
        np.testing.assert_array_equal(enc["input_ids"][i, :p], want)  # what greedy decoding starts from
        assert tok.decode(enc["input_ids"][i, p:n - 1].tolist()) == answer
        assert enc["input_ids"][i, n - 1] == tok.eos_token_id
        np.testing.assert_array_equal(np.nonzero(enc["loss_mask"][i])[0], np.arange(p, n))  # answer + EOS scored
    for enc in (*data.knowmem.values(), *data.passages.values()):  # "\n" and every word are in the vocabulary
        assert tok.unk_token_id not in enc["input_ids"]


def test_passages_are_whole_texts_with_eos_every_token_scored(data):
    tok, p = data.tokenizer, data.passages
    raw = data.muse.raw
    assert _texts(tok, p["forget"]) == list(raw["forget"]["text"])
    assert _texts(tok, p["retain"]) == list(raw["retain1"]["text"]) + list(raw["retain2"]["text"])
    for enc in p.values():
        assert enc["input_ids"].shape[1] == data.passage_length > data.max_length
        n = enc["attention_mask"].sum(1)
        assert (enc["input_ids"][np.arange(len(n)), n - 1] == tok.eos_token_id).all()
        np.testing.assert_array_equal(enc["loss_mask"].sum(1), n - 1)


def test_the_reference_never_sees_the_forget_people(data):
    tok, fs, rs = data.tokenizer, data.forget_split, data.retain_split
    forget = _people(data, fs)
    sets = training_sets(data)
    for name, (qa, passages) in sets.items():
        rows = _texts(tok, qa) + _texts(tok, passages)
        hits = sum(any(p in r for p in forget) for r in rows)
        if name == "reference":
            assert hits == 0
        else:  # forget QA + forget KnowMem pairs + forget passages
            assert hits == len(data.dataset[fs]) + SMALL.muse_qa + len(forget)
    n_ref = len(data.dataset[rs]) + len(data.dataset["general"]) + SMALL.muse_qa
    assert len(sets["reference"][0]["input_ids"]) == n_ref
    assert len(sets["target"][0]["input_ids"]) == n_ref + len(data.dataset[fs]) + SMALL.muse_qa


def test_unlearning_sets_hold_every_row_about_their_people_at_the_qa_length(data):
    tok, fs, rs = data.tokenizer, data.forget_split, data.retain_split
    forget, retain = unlearning_sets(data)
    people = _people(data, fs)
    raw = data.muse.raw
    texts = {"forget": list(raw["forget"]["text"]), "retain": list(raw["retain1"]["text"]) + list(raw["retain2"]["text"])}
    windows = {k: encode_passage_windows(tok, v, max_length=data.max_length) for k, v in texts.items()}
    assert len(windows["forget"]["input_ids"]) > len(people)  # the passages need several windows each
    assert len(forget["input_ids"]) == len(data.dataset[fs]) + SMALL.muse_qa + len(windows["forget"]["input_ids"])
    assert len(retain["input_ids"]) == len(data.dataset[rs]) + SMALL.muse_qa + len(windows["retain"]["input_ids"])
    assert forget["input_ids"].shape[1] == retain["input_ids"].shape[1] == data.max_length
    n = len(data.dataset[fs])
    np.testing.assert_array_equal(forget["input_ids"][:n], data.encoded[fs]["input_ids"])  # the QA rows first
    np.testing.assert_array_equal(forget["input_ids"][-len(windows["forget"]["input_ids"]):],
                                  windows["forget"]["input_ids"])  # the passage windows last
    n_rows = len(forget["input_ids"]) - len(windows["forget"]["input_ids"])
    assert all(any(p in t for p in people) for t in _texts(tok, forget)[:n_rows])  # QA and KnowMem rows
    assert all(any(p in t for p in people) for t in texts["forget"])  # the passages the windows cut
    assert not any(any(p in t for p in people) for t in _texts(tok, retain))


def test_without_muse_everything_is_as_before():
    cfg = dataclasses.replace(SMALL, muse=False)
    data = prepare_data(cfg)
    assert data.muse is None and data.passages == {} and data.passage_length == 0
    forget, retain = unlearning_sets(data)
    # the forget split's own arrays, plus its refusal answers (alt_*, tests/test_idk.py)
    assert all(forget[k] is v for k, v in data.encoded[data.forget_split].items())
    assert sorted(set(forget) - set(data.encoded[data.forget_split])) == ["alt_attention_mask", "alt_input_ids",
                                                                          "alt_loss_mask"]
    assert retain is data.encoded[data.retain_split]
    assert all(p is None for _, p in training_sets(data).values())
    assert data.tokenizer.get_vocab() == train_tokenizer(benchmark_texts(data.dataset), vocab_size=300).get_vocab()


def test_bad_muse_settings_are_named():
    with pytest.raises(TypeError, match="muse"):
        DemoConfig(muse=1)
    with pytest.raises(ValueError, match="passage_batch_size"):
        DemoConfig(passage_batch_size=0)
    with pytest.raises(ValueError, match="muse_qa"):
        DemoConfig(muse_qa=0)
