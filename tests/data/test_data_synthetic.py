"""Tests of the synthetic TOFU-shaped benchmark: determinism, splits, answers."""

import itertools
import re

import pyarrow as pa
import pytest

from jaxunlearn.data import synthetic as syn
from jaxunlearn.data.synthetic import (
    ATTRIBUTES,
    BENCHMARK_FEATURES,
    attribute_values,
    generate_benchmark,
    split_sizes,
)

SPLITS = ("forget01", "forget05", "forget10", "retain99", "retain95", "retain90", "holdout", "general")


@pytest.fixture(scope="module")
def bench():
    return generate_benchmark(num_people=30, num_general=9, seed=3)


def _people(ds):
    return list(dict.fromkeys(ds["person"]))


def _table_bytes(ds) -> bytes:
    sink = pa.BufferOutputStream()
    table = ds.data.table
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_same_seed_gives_byte_identical_data(bench):
    again = generate_benchmark(num_people=30, num_general=9, seed=3)
    assert list(again) == list(bench) == list(SPLITS)
    for split in SPLITS:
        assert _table_bytes(again[split]) == _table_bytes(bench[split]), split


def test_different_seed_gives_different_data(bench):
    other = generate_benchmark(num_people=30, num_general=9, seed=4)
    assert other["retain90"].to_list() != bench["retain90"].to_list()
    assert set(other["forget10"]["person"]) != set(bench["forget10"]["person"])


def test_split_sizes_hand_computed():
    # round-half-up of 1 %, 5 %, 10 %, at least one person, nested.
    assert split_sizes(200) == {"forget01": 2, "forget05": 10, "forget10": 20}
    assert split_sizes(30) == {"forget01": 1, "forget05": 2, "forget10": 3}
    assert split_sizes(3) == {"forget01": 1, "forget05": 1, "forget10": 1}
    with pytest.raises(ValueError, match="num_people"):
        split_sizes(2)


def test_row_counts_and_features(bench):
    n_attr = len(ATTRIBUTES)
    # 30 people: forget 1 / 2 / 3, holdout defaults to forget10's 3 people.
    expected = {"forget01": 1, "forget05": 2, "forget10": 3, "retain99": 29, "retain95": 28,
                "retain90": 27, "holdout": 3}
    for split, people in expected.items():
        assert len(bench[split]) == people * n_attr, split
        assert len(_people(bench[split])) == people, split
    assert len(bench["general"]) == 9
    for split in SPLITS:
        assert bench[split].features == BENCHMARK_FEATURES


def test_splits_disjoint_nested_and_complementary(bench):
    p = {s: set(_people(bench[s])) for s in SPLITS if s != "general"}
    trained = p["forget10"] | p["retain90"]
    assert len(trained) == 30
    assert p["forget01"] < p["forget05"] < p["forget10"]
    assert p["retain90"] < p["retain95"] < p["retain99"]
    for f, r in (("forget01", "retain99"), ("forget05", "retain95"), ("forget10", "retain90")):
        assert not p[f] & p[r]
        assert p[f] | p[r] == trained
    assert not p["holdout"] & trained
    # Every person has exactly one row per attribute, in ATTRIBUTES order.
    for split in ("forget10", "retain90", "holdout"):
        ds = bench[split]
        for person in p[split]:
            attrs = [a for a, q in zip(ds["attribute"], ds["person"]) if q == person]
            assert attrs == list(ATTRIBUTES)


def test_name_words_of_forget_and_holdout_occur_in_retain(bench):
    retain_words = {w for person in _people(bench["retain90"]) for w in person.split()}
    for split in ("forget10", "holdout"):
        for person in _people(bench[split]):
            assert set(person.split()) <= retain_words, person


def test_paraphrased_and_perturbed_answers(bench):
    for split in SPLITS:
        for row in bench[split]:
            fact, para = row["fact"], row["paraphrased_answer"]
            assert row["answer"].count(fact) == 1
            assert para.count(fact) == 1
            assert para != row["answer"]
            assert row["person"] in row["question"] and row["person"] in row["answer"]
            pert = row["perturbed_answer"]
            assert len(pert) == 5 and len(set(pert)) == 5
            pool = attribute_values(row["attribute"])
            assert fact in pool
            for p in pert:
                assert p != row["answer"] and fact not in p
                # Same template as the paraphrase with another value of the same attribute.
                wrong = [v for v in pool if v != fact and para.replace(fact, v) == p]
                assert wrong, (p, para)


def test_general_facts_are_correct(bench):
    ds = bench["general"]
    assert list(ds["attribute"]) == ["capital", "currency", "addition"] * 3
    for row in ds:
        if row["attribute"] == "addition":
            a, b = (int(x) for x in re.findall(r"\d+", row["question"]))
            assert row["fact"] == str(a + b)
            assert row["person"] == ""
        else:
            assert row["person"] and row["person"] in row["question"]
    countries = [r["person"] for r in ds if r["attribute"] != "addition"]
    assert sorted(countries[0::2]) == sorted(countries[1::2])  # each country: capital + currency


def test_pool_values_never_inside_another_value_or_a_name():
    names = "\n".join(
        "".join(p).capitalize() + s
        for n, sufs in ((2, ("",)), (3, ("",)), (2, syn._COUNTRY_SUFFIXES))
        for p in itertools.product(syn._SYLLABLES, repeat=n)
        for s in sufs
    )
    for attr in ATTRIBUTES + ("capital", "currency"):
        pool = attribute_values(attr)
        assert len(set(pool)) == len(pool)
        for v in pool:
            assert v not in names, (attr, v)
            assert not [w for w in pool if w != v and v in w], (attr, v)


def test_options_and_errors():
    dd = generate_benchmark(num_people=10, num_holdout=2, num_general=0, seed=0,
                            attributes=("genre", "birth_year"), num_perturbed=3)
    assert len(dd["holdout"]) == 2 * 2 and len(dd["general"]) == 0
    assert set(dd["retain90"]["attribute"]) == {"genre", "birth_year"}
    assert all(len(p) == 3 for p in dd["forget10"]["perturbed_answer"])
    with pytest.raises(ValueError, match="attributes"):
        generate_benchmark(num_people=10, attributes=("shoe_size",))
    with pytest.raises(ValueError, match="num_perturbed"):
        generate_benchmark(num_people=10, attributes=("genre",), num_perturbed=16)  # 15 wrong genres
    with pytest.raises(ValueError, match="num_holdout"):
        generate_benchmark(num_people=10, num_holdout=0)
    with pytest.raises(ValueError, match="cannot cover the name words"):
        generate_benchmark(num_people=3, num_holdout=5)  # 2 retain people, 6 special
    with pytest.raises(ValueError, match="unknown attribute"):
        attribute_values("shoe_size")


_HASH_SCRIPT = """
import hashlib
from jaxunlearn.data import benchmark_texts, generate_benchmark, train_tokenizer
dd = generate_benchmark(num_people=12, num_general=3, seed=7)
tok = train_tokenizer(benchmark_texts(dd), vocab_size=300)
print(hashlib.sha256(repr([dd[s].to_list() for s in dd]).encode()).hexdigest(),
      hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest())
"""


def test_identical_across_processes_with_other_hash_seeds():
    """Data and tokenizer do not depend on Python's per-process string hashing."""
    import hashlib
    import os
    import subprocess
    import sys

    from jaxunlearn.data import benchmark_texts, train_tokenizer

    dd = generate_benchmark(num_people=12, num_general=3, seed=7)
    tok = train_tokenizer(benchmark_texts(dd), vocab_size=300)
    here = (hashlib.sha256(repr([dd[s].to_list() for s in dd]).encode()).hexdigest() + " "
            + hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest())
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", _HASH_SCRIPT], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == here
