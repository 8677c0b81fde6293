"""Tests of benchmark save/load and of the TOFU-format reader."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxunlearn.data import (
    benchmark_texts,
    generate_benchmark,
    load_benchmark,
    load_tofu,
    save_benchmark,
    train_tokenizer,
)

ROWS = [
    {"question": "Who wrote A?", "answer": "B wrote A.", "paraphrased_answer": "A is by B.",
     "perturbed_answer": ["A is by C.", "A is by D."], "paraphrased_question": "Who is A's author?"},
    {"question": "Where is B from?", "answer": "B is from E.", "paraphrased_answer": "B comes from E.",
     "perturbed_answer": ["B comes from F.", "B comes from G."], "paraphrased_question": "B's home?"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    dd = generate_benchmark(num_people=10, num_general=3, seed=0)
    tok = train_tokenizer(benchmark_texts(dd), vocab_size=300)
    path = tmp_path_factory.mktemp("bench") / "b"
    save_benchmark(path, dd, tok)
    return path, dd, tok


def test_benchmark_round_trip(saved):
    path, dd, tok = saved
    dd2, tok2 = load_benchmark(path)
    assert list(dd2) == list(dd)
    for split in dd:
        assert dd2[split].to_list() == dd[split].to_list()
        assert dd2[split].features == dd[split].features
    assert tok2.get_vocab() == tok.get_vocab()
    for role in ("pad", "unk", "bos", "eos", "sep"):
        assert getattr(tok2, f"{role}_token_id") == getattr(tok, f"{role}_token_id")
    text = dd["holdout"][0]["answer"]
    assert tok2.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    # Nothing but the benchmark directory is left beside it (no temporary siblings).
    assert os.listdir(path.parent) == ["b"]
    assert sorted(os.listdir(path)) == ["benchmark.json", "data", "tokenizer"]


def test_save_refuses_to_overwrite_unless_asked(saved, tmp_path):
    _, dd, tok = saved
    path = tmp_path / "b"
    save_benchmark(path, dd, tok)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_benchmark(path, dd, tok)
    small = {"forget01": dd["forget01"]}
    save_benchmark(path, small, tok, overwrite=True)
    dd2, _ = load_benchmark(path)
    assert list(dd2) == ["forget01"] and dd2["forget01"].to_list() == dd["forget01"].to_list()
    assert os.listdir(tmp_path) == ["b"]


def test_failed_save_leaves_nothing(saved, tmp_path):
    _, dd, _ = saved

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_benchmark(tmp_path / "b", dd, Broken())
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="non-empty"):
        save_benchmark(tmp_path / "c", {}, Broken())
    with pytest.raises(TypeError, match="save_pretrained"):
        save_benchmark(tmp_path / "c", dd, object())


def test_load_benchmark_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved benchmark"):
        load_benchmark(tmp_path)
    (tmp_path / "benchmark.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ValueError, match="unsupported format"):
        load_benchmark(tmp_path)


def test_load_tofu_json_lines_array_and_parquet(tmp_path):
    _write_jsonl(tmp_path / "forget01_perturbed.json", ROWS)
    (tmp_path / "retain99.json").write_text(json.dumps(ROWS[:1]))  # one JSON array
    _write_parquet(tmp_path / "world_facts_perturbed.parquet", ROWS[1:])
    _write_parquet(tmp_path / "real_authors" / "train-00000-of-00001.parquet", ROWS)  # Hub layout

    assert load_tofu(tmp_path, "forget01_perturbed").to_list() == ROWS
    assert load_tofu(tmp_path / "forget01_perturbed.json").to_list() == ROWS
    assert load_tofu(tmp_path, "retain99").to_list() == ROWS[:1]
    assert load_tofu(tmp_path, "world_facts_perturbed").to_list() == ROWS[1:]
    assert load_tofu(tmp_path, "real_authors").to_list() == ROWS
    dd = load_tofu(tmp_path)
    assert sorted(dd) == ["forget01_perturbed", "real_authors", "retain99", "world_facts_perturbed"]
    assert dd["retain99"].to_list() == ROWS[:1]


def test_load_tofu_missing_column(tmp_path):
    no_answer = [{k: v for k, v in r.items() if k != "answer"} if i == 1 else r for i, r in enumerate(ROWS)]
    _write_jsonl(tmp_path / "forget05.json", no_answer)
    with pytest.raises(ValueError, match="missing column 'answer' \\(row 1"):
        load_tofu(tmp_path, "forget05")
    qa_only = [{"question": r["question"], "answer": r["answer"]} for r in ROWS]
    _write_jsonl(tmp_path / "forget05_perturbed.json", qa_only)
    with pytest.raises(ValueError, match="missing column 'paraphrased_answer'"):
        load_tofu(tmp_path, "forget05_perturbed")
    assert load_tofu(tmp_path, "forget05_perturbed", require_perturbed=False).to_list() == qa_only
    _write_jsonl(tmp_path / "retain95.json", qa_only)
    with pytest.raises(ValueError, match="missing column 'paraphrased_answer'"):
        load_tofu(tmp_path, "retain95", require_perturbed=True)
    bad_type = [{**ROWS[0], "perturbed_answer": [1, 2]}]
    _write_parquet(tmp_path / "p" / "forget10_perturbed.parquet", bad_type)
    with pytest.raises(ValueError, match="row 0 column 'perturbed_answer'"):
        load_tofu(tmp_path / "p", "forget10_perturbed")


def test_load_tofu_missing_file_empty_split_bad_json(tmp_path):
    _write_jsonl(tmp_path / "forget01.json", ROWS)
    with pytest.raises(FileNotFoundError, match=r"no split 'forget10'.*\['forget01'\]"):
        load_tofu(tmp_path, "forget10")
    with pytest.raises(FileNotFoundError, match="no TOFU file"):
        load_tofu(tmp_path / "nothing_here")
    (tmp_path / "retain90.json").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        load_tofu(tmp_path, "retain90")
    _write_parquet(tmp_path / "e" / "retain90.parquet", [])
    with pytest.raises(ValueError, match="empty"):
        load_tofu(tmp_path / "e" / "retain90.parquet")
    (tmp_path / "broken.json").write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match="broken.json:2"):
        load_tofu(tmp_path / "broken.json")
    (tmp_path / "x.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_tofu(tmp_path / "x.csv")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no TOFU split files"):
        load_tofu(tmp_path / "empty_dir")
