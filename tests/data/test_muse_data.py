"""MUSE-format data: the loader on every file layout it reads, its errors, the passage encoding,
and the embedded MUSE-shaped data (determinism, content, format)."""

import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxunlearn.data import generate_benchmark, train_tokenizer
from jaxunlearn.data.muse import (MUSE_SPLITS, MuseData, encode_passage_windows, encode_passages, load_muse,
                                 save_muse)
from jaxunlearn.data.synthetic_muse import generate_muse_benchmark, person_facts


@pytest.fixture(scope="module")
def bench():
    return generate_benchmark(num_people=20, num_general=0, seed=3)


@pytest.fixture(scope="module")
def muse(bench):
    return generate_muse_benchmark(bench, num_icl=2, seed=1)


def _write_reference_layout(root, rows_by_file):
    """Files as muse_bench's load_data.py writes them: JSON arrays (strings for text splits)."""
    for rel, rows in rows_by_file.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(rows), encoding="utf-8")


def _minimal_rows():
    qa = [{"question": "Who?", "answer": "Kalo"}, {"question": "Where?", "answer": "Dunmere"}]
    return {
        "knowmem/forget_qa.json": qa,
        "knowmem/forget_qa_icl.json": qa[:1],
        "knowmem/retain_qa.json": qa[::-1],
        "knowmem/retain_qa_icl.json": qa[1:],
        "verbmem/forget.json": [{"prompt": "Kalo was", "gt": "born in Dunmere."}],
        "privleak/forget.json": ["Kalo was born in Dunmere."],
        "privleak/holdout.json": ["Bero was born in Ostrelm."],
    }


# --------------------------------------------------------------------------- loader


def test_round_trip_of_the_embedded_data(tmp_path, muse):
    save_muse(muse, tmp_path)
    back = load_muse(tmp_path)
    for field in MUSE_SPLITS:
        a, b = getattr(muse, field), getattr(back, field)
        for col in MUSE_SPLITS[field][2]:
            assert a[col] == b[col], (field, col)
    assert {k: v["text"] for k, v in back.raw.items()} == {k: v["text"] for k, v in muse.raw.items()}
    # the files are the reference layout: JSON arrays of objects / of strings
    assert json.loads((tmp_path / "privleak" / "forget.json").read_text())[0] == muse.privleak_forget[0]["text"]
    assert set(json.loads((tmp_path / "verbmem" / "forget.json").read_text())[0]) == {"prompt", "gt"}
    with pytest.raises(FileExistsError, match="overwrite"):
        save_muse(muse, tmp_path)
    save_muse(muse, tmp_path, overwrite=True)
    assert len(load_muse(tmp_path, raw=False).raw) == 0


def test_reads_the_reference_layout_and_optional_parts(tmp_path):
    _write_reference_layout(tmp_path, _minimal_rows())
    data = load_muse(tmp_path)
    assert data.forget_qa["answer"] == ["Kalo", "Dunmere"]
    assert data.retain_qa_icl["question"] == ["Where?"]
    assert data.verbmem_forget[0] == {"prompt": "Kalo was", "gt": "born in Dunmere."}
    assert data.privleak_retain is None and data.raw == {}


def test_reads_jsonl_parquet_hub_shards_and_retain2_names(tmp_path):
    rows = _minimal_rows()
    root = tmp_path
    (root / "knowmem").mkdir()
    (root / "verbmem").mkdir()
    (root / "privleak").mkdir()
    # JSON lines; text rows given as objects
    (root / "knowmem" / "forget_qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows["knowmem/forget_qa.json"]))
    # JSON lines in a .json file (TOFU's habit)
    (root / "knowmem" / "forget_qa_icl.json").write_text(json.dumps(rows["knowmem/forget_qa_icl.json"][0]) + "\n")
    # older Hub names: retain2_qa as Hub shards
    for name in ("retain2_qa", "retain2_qa_icl"):
        qa = rows[f"knowmem/{name.replace('2', '')}.json"]
        half = max(1, len(qa) // 2)
        for i, part in enumerate([qa[:half], qa[half:]] if len(qa) > 1 else [qa]):
            pq.write_table(pa.Table.from_pylist(part), root / "knowmem" / f"{name}-0000{i}-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows["verbmem/forget.json"]), root / "verbmem" / "forget.parquet")
    # Hub parquet-converter layout: <split>/ directory
    (root / "privleak" / "forget").mkdir()
    pq.write_table(pa.Table.from_pylist([{"text": t} for t in rows["privleak/forget.json"]]),
                   root / "privleak" / "forget" / "0000.parquet")
    (root / "privleak" / "holdout.jsonl").write_text(json.dumps({"text": "Bero was born in Ostrelm."}))
    data = load_muse(root)
    assert data.forget_qa["question"] == ["Who?", "Where?"]
    assert data.forget_qa_icl["answer"] == ["Kalo"]
    assert data.retain_qa["answer"] == ["Dunmere", "Kalo"]
    assert data.retain_qa_icl["answer"] == ["Dunmere"]
    assert data.verbmem_forget["gt"] == ["born in Dunmere."]
    assert data.privleak_forget["text"] == ["Kalo was born in Dunmere."]
    assert data.privleak_holdout["text"] == ["Bero was born in Ostrelm."]


def test_empty_icl_is_allowed_but_empty_scored_splits_are_not(tmp_path):
    rows = _minimal_rows()
    rows["knowmem/forget_qa_icl.json"] = []
    _write_reference_layout(tmp_path, rows)
    assert len(load_muse(tmp_path).forget_qa_icl) == 0
    (tmp_path / "privleak" / "holdout.json").write_text("[]")
    with pytest.raises(ValueError, match=r"holdout\.json: the split is empty"):
        load_muse(tmp_path)


@pytest.mark.parametrize("rel,content,match", [
    ("knowmem/forget_qa.json", [{"question": "Who?"}], r"forget_qa\.json: row 0 has no key 'answer'"),
    ("knowmem/retain_qa.json", [{"question": "Who?", "answer": 7}], r"retain_qa\.json: row 0 key 'answer' is a int"),
    ("verbmem/forget.json", [{"prompt": "a", "gt": "b"}, "c"],
     r"verbmem/forget\.json: row 1 is a str, expected an object"),
    ("privleak/forget.json", [3], r"privleak/forget\.json: row 0 is a int"),
    ("privleak/holdout.json", {"text": ["a"]}, r"holdout\.json: row 0 key 'text' is a list"),
    ("privleak/holdout.json", 5, r"holdout\.json: row 0 is a int, expected an object or a string"),
])
def test_bad_rows_name_the_file_row_and_key(tmp_path, rel, content, match):
    rows = _minimal_rows()
    rows[rel] = content
    _write_reference_layout(tmp_path, rows)
    with pytest.raises(ValueError, match=match):
        load_muse(tmp_path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MUSE corpus directory"):
        load_muse(tmp_path / "nowhere")
    rows = _minimal_rows()
    del rows["verbmem/forget.json"]
    _write_reference_layout(tmp_path, rows)
    with pytest.raises(FileNotFoundError, match=r"no MUSE split verbmem/forget for verbmem_forget"):
        load_muse(tmp_path)
    (tmp_path / "verbmem").mkdir()
    (tmp_path / "verbmem" / "forget.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"forget\.parquet is corrupt"):
        load_muse(tmp_path)
    (tmp_path / "verbmem" / "forget.parquet").unlink()
    (tmp_path / "verbmem" / "forget.json").write_text('[{"prompt": "a", "gt": ')
    with pytest.raises(ValueError, match=r"forget\.json: invalid JSON \("):
        load_muse(tmp_path)
    (tmp_path / "verbmem" / "forget.json").unlink()
    (tmp_path / "verbmem" / "forget.jsonl").write_text('{"prompt": "a", "gt": "b"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"forget\.jsonl:2: invalid JSON line"):
        load_muse(tmp_path)


def test_muse_data_checks_its_datasets(muse):
    qa = datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]})
    text = datasets.Dataset.from_dict({"text": ["t"]})
    verb = datasets.Dataset.from_dict({"prompt": ["p"], "gt": ["g"]})
    ok = dict(forget_qa=qa, forget_qa_icl=qa, retain_qa=qa, retain_qa_icl=qa, verbmem_forget=verb,
              privleak_forget=text, privleak_holdout=text)
    MuseData(**ok)
    with pytest.raises(KeyError, match=r"verbmem_forget is missing column\(s\) \['gt'\]"):
        MuseData(**{**ok, "verbmem_forget": datasets.Dataset.from_dict({"prompt": ["p"]})})
    with pytest.raises(ValueError, match="privleak_holdout is empty"):
        MuseData(**{**ok, "privleak_holdout": text.select([])})
    with pytest.raises(TypeError, match="forget_qa is list"):
        MuseData(**{**ok, "forget_qa": [("q", "a")]})
    with pytest.raises(ValueError, match=r"raw\['forget'\] row 0 column 'text' is int"):
        MuseData(**ok, raw={"forget": datasets.Dataset.from_dict({"text": [1]})})


# --------------------------------------------------------------------------- passages


def test_encode_passages_masks_every_text_token():
    tok = train_tokenizer(["Kalo was born in Dunmere.", "Bero writes poems."], vocab_size=60, min_frequency=1)
    texts = ["Kalo was born in Dunmere.", "Bero writes poems."]
    enc = encode_passages(tok, texts)
    for i, t in enumerate(texts):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        n = len(ids) + 1
        assert enc["input_ids"][i, :n].tolist() == [tok.bos_token_id, *ids]
        assert enc["loss_mask"][i].tolist() == [0.0] + [1.0] * (n - 1) + [0.0] * (enc["input_ids"].shape[1] - n)
        assert enc["attention_mask"][i].sum() == n == enc["lengths"][i]
    eos = encode_passages(tok, texts, add_eos=True, max_tokens=2, max_length=6)
    assert eos["input_ids"].shape == (2, 6)
    assert eos["input_ids"][0, :4].tolist()[-1] == tok.eos_token_id and eos["loss_mask"][0].sum() == 3
    with pytest.raises(ValueError, match="passage 0 needs"):
        encode_passages(tok, texts, max_length=2)
    with pytest.raises(ValueError, match="empty passage"):
        encode_passages(tok, ["Kalo", ""])
    with pytest.raises(TypeError, match="single string"):
        encode_passages(tok, "Kalo")


@pytest.mark.parametrize("max_length", [2, 4, 7, 40])
def test_passage_windows_cut_the_passage_tokens_in_order(max_length):
    texts = ["Kalo was born in Dunmere.", "Bero writes poems.", "Kalo."]
    tok = train_tokenizer(texts, vocab_size=60, min_frequency=1)
    win = encode_passage_windows(tok, texts, max_length=max_length)
    whole = encode_passages(tok, texts, add_eos=True)  # the reference: [BOS] text [EOS], uncut
    width = max_length - 1
    assert win["input_ids"].shape[1] == max_length
    for i in range(len(texts)):
        body = whole["input_ids"][i, 1:whole["lengths"][i]].tolist()  # text tokens + EOS
        rows = np.nonzero(win["passage"] == i)[0]
        assert len(rows) == -(-len(body) // width)  # ceil(n' / W) windows
        assert (win["input_ids"][rows, 0] == tok.bos_token_id).all()
        got = [t for r in rows for t in win["input_ids"][r, 1:win["lengths"][r]].tolist()]
        assert got == body  # consecutive, no overlap, nothing dropped
        for r in rows:
            n = win["lengths"][r]
            assert win["loss_mask"][r].tolist() == [0.0] + [1.0] * (n - 1) + [0.0] * (max_length - n)
    assert np.all(np.diff(win["passage"]) >= 0)
    assert tok.eos_token_id not in encode_passage_windows(tok, texts, max_length=5, add_eos=False)["input_ids"]
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        encode_passage_windows(tok, texts, max_length=1)
    with pytest.raises(ValueError, match="empty passage"):
        encode_passage_windows(tok, ["Kalo", ""], max_length=4)


# --------------------------------------------------------------------------- embedded data


def test_generation_is_deterministic_and_seeded(bench, muse):
    again = generate_muse_benchmark(bench, num_icl=2, seed=1)
    for field in MUSE_SPLITS:
        assert getattr(again, field).to_dict() == getattr(muse, field).to_dict()
    other = generate_muse_benchmark(bench, num_icl=2, seed=2)
    assert other.raw["retain1"]["text"] != muse.raw["retain1"]["text"]


def test_passages_state_the_benchmark_facts(bench, muse):
    forget, retain, holdout = (person_facts(bench[s]) for s in ("forget10", "retain90", "holdout"))
    assert len(muse.raw["forget"]) == len(forget) and len(muse.raw["holdout"]) == len(holdout)
    assert len(muse.raw["retain1"]) + len(muse.raw["retain2"]) == len(retain)
    assert muse.privleak_forget["text"] == muse.raw["forget"]["text"]
    assert muse.privleak_holdout["text"] == muse.raw["holdout"]["text"]
    for people, texts in ((forget, muse.raw["forget"]["text"]), (holdout, muse.raw["holdout"]["text"])):
        for (person, facts), text in zip(people.items(), texts):
            assert person in text and all(f in text for f in facts.values())
    # verbatim pairs split each forget passage at a sentence boundary
    for row, text in zip(muse.verbmem_forget, muse.raw["forget"]["text"]):
        assert row["prompt"] + " " + row["gt"] == text and row["prompt"].endswith(".")
    # every QA answer is a fact stated in the passage of the person asked about
    passages = dict(zip(forget, muse.raw["forget"]["text"]))
    qa = list(zip(muse.forget_qa["question"], muse.forget_qa["answer"]))
    icl = list(zip(muse.forget_qa_icl["question"], muse.forget_qa_icl["answer"]))
    assert len(qa) + len(icl) == sum(len(f) for f in forget.values()) and not set(qa) & set(icl)
    for q, a in qa + icl:
        person = next(p for p in forget if p in q)
        assert a in forget[person].values() and a in passages[person]
    retain2 = set(list(retain)[len(retain) // 2:])
    assert all(any(p in q for p in retain2) for q in muse.retain_qa["question"])


def test_embedded_data_is_what_the_loader_reads(tmp_path, muse):
    save_muse(muse, tmp_path)
    back = load_muse(tmp_path)
    assert back.verbmem_forget.to_dict() == muse.verbmem_forget.to_dict()
    assert back.privleak_retain["text"] == muse.privleak_retain["text"]


def test_generator_errors(bench):
    with pytest.raises(KeyError, match="'forget99' not in the benchmark"):
        generate_muse_benchmark(bench, forget="forget99")
    with pytest.raises(ValueError, match="share people"):
        generate_muse_benchmark(bench, forget="forget10", retain="retain95")
    with pytest.raises(ValueError, match="too few for num_icl"):
        generate_muse_benchmark(bench, num_icl=16)
    with pytest.raises(ValueError, match="prompt_fraction"):
        generate_muse_benchmark(bench, prompt_fraction=1.0)
    one_attr = generate_benchmark(num_people=20, num_general=0, attributes=["birthplace"])
    with pytest.raises(ValueError, match="VerbMem needs >= 2"):
        generate_muse_benchmark(one_attr, num_icl=0)
    with pytest.raises(KeyError, match="missing column"):
        person_facts(datasets.Dataset.from_dict({"question": ["q"]}))
    capped = generate_muse_benchmark(bench, num_icl=0, max_qa=3)
    assert len(capped.forget_qa) == 3 and len(capped.forget_qa_icl) == 0
    assert np.all([len(t) > 0 for t in capped.retain_qa["answer"]])
