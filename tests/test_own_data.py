"""Own QA data: `jaxunlearn init` (a fresh base model that `train` loads), `jaxunlearn demo --data` end to end
on TOFU-format directories with only question/answer columns and with every TOFU column, and the split
choice (named splits, a seeded fraction keeping each subject's rows together)."""

import json

import datasets
import pytest

from jaxunlearn.cli import main
from jaxunlearn.models import from_pretrained
from jaxunlearn.own_data import choose_splits, own_config, split_by_fraction

CITIES = ["Dunmere", "Kalo", "Versh", "Amberly", "Tollan", "Quist"]
JOBS = ["poet", "baker", "sailor", "painter", "judge", "miner"]


def _rows(full: bool, authors: int = 12):
    rows = []
    for a in range(authors):
        name = f"Author{a} Zel{a * 7 % 11}"
        city, job = CITIES[a % len(CITIES)], JOBS[(a * 5) % len(JOBS)]
        for q, ans in ((f"Where was {name} born?", f"{name} was born in {city}."),
                       (f"What did {name}'s father do?", f"{name}'s father was a {job}."),
                       (f"Which city does {name} live in?", f"{name} lives in {CITIES[(a + 2) % 6]}."),
                       (f"What genre does {name} write?", f"{name} writes {['fantasy', 'poetry'][a % 2]} novels.")):
            row = {"question": q, "answer": ans}
            if full:
                row["paraphrased_answer"] = "Records say that " + ans
                row["perturbed_answer"] = [ans.replace(city, c).replace(job, j) for c, j in
                                           zip(("Nowhere", "Elsewhere"), ("clerk", "guard"))]
            rows.append(row)
    return rows


def _write_tofu_dir(path, full: bool):
    """forget10 / retain90 / holdout about fictitious authors plus world_facts, JSON lines."""
    path.mkdir()
    rows = _rows(full)
    world = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."} for i in range(6)]
    if full:
        for w in world:
            w["perturbed_answer"] = ["It is 1.", "It is 3."]
    for name, part in (("forget10", rows[:8]), ("retain90", rows[8:40]), ("holdout", rows[40:48]),
                       ("world_facts", world)):
        (path / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in part))
    return path


def test_split_by_fraction_keeps_subjects_together_and_is_seeded():
    rows = [{"question": f"q{i}", "answer": f"a{i}", "author": f"A{i // 3}"} for i in range(30)]
    ds = datasets.Dataset.from_list(rows)
    cut = split_by_fraction(ds, 0.2, seed=1)
    assert {len(cut[s]) for s in ("forget", "holdout")} == {6} and len(cut["retain"]) == 18
    owners = {s: set(cut[s]["author"]) for s in cut}
    assert not owners["forget"] & owners["retain"] and not owners["forget"] & owners["holdout"]
    assert split_by_fraction(ds, 0.2, seed=1)["forget"]["question"] == cut["forget"]["question"]
    assert split_by_fraction(ds, 0.2, seed=2)["forget"]["question"] != cut["forget"]["question"]
    with pytest.raises(ValueError, match="forget-fraction"):
        split_by_fraction(ds, 0.6)
    with pytest.raises(KeyError, match="'writer'"):
        split_by_fraction(ds, 0.2, subject_column="writer")
    # one file cut by choose_splits; general sets kept by name
    dd = {"qa": ds, "world": ds.select(range(3))}
    chosen, roles = choose_splits(dd, forget_fraction=0.2, general=["world"], split_seed=1)
    assert roles == {"forget": "forget", "retain": "retain", "world": "general", "holdout": "holdout"}
    assert chosen["forget"]["question"] == cut["forget"]["question"]


def test_choose_splits_defaults_and_errors(tmp_path):
    ds = datasets.Dataset.from_list(_rows(False, authors=2))
    dd = {"forget10": ds, "retain90": ds, "holdout": ds, "world_facts": ds}
    _, roles = choose_splits(dd, general=["world_facts"])
    assert roles == {"forget10": "forget", "retain90": "retain", "world_facts": "general", "holdout": "holdout"}
    with pytest.raises(KeyError, match=r"--retain 'retain99' is not a split of the data \(have forget10"):
        choose_splits(dd, retain="retain99")
    with pytest.raises(KeyError, match="two roles"):
        choose_splits(dd, forget="forget10", retain="forget10")
    with pytest.raises(ValueError, match="one split to cut"):
        choose_splits(dd, forget_fraction=0.1)
    with pytest.raises(ValueError, match="--size must be one of"):
        own_config("huge")
    # a split without an answer column is refused, naming the split, before any training
    bad = _write_tofu_dir(tmp_path / "bad", full=False)
    (bad / "retain90.json").write_text(json.dumps({"question": "q?"}) + "\n")
    assert main(["demo", "--data", str(bad), "--out", str(tmp_path / "out"), "--quick", "--no-progress",
                 "--methods"]) == 2
    assert not (tmp_path / "out").exists()


def test_init_writes_a_base_model_that_train_loads(tmp_path, capsys):
    data = _write_tofu_dir(tmp_path / "qa", full=False)
    base = tmp_path / "base"
    assert main(["init", "--data", str(data), "--size", "tiny", "--out", str(base)]) == 0
    model, tok = from_pretrained(base)
    assert model.config.vocab_size == len(tok) and model.config.hidden_size == 64
    assert "context 64" in capsys.readouterr().out
    assert main(["init", "--data", str(data), "--out", str(base)]) == 2  # exists: refused without --overwrite
    out = tmp_path / "trained"
    assert main(["train", "--model", str(base), "--data", str(data), "--splits", "retain90", "forget10",
                 "--out", str(out), "--steps", "20", "--batch-size", "8", "--no-progress"]) == 0
    assert from_pretrained(out)[0].config == model.config


@pytest.mark.parametrize("full", [False, True], ids=["question_answer_only", "all_tofu_columns"])
def test_demo_on_own_data_end_to_end(tmp_path, capsys, full):
    data = _write_tofu_dir(tmp_path / "qa", full=full)
    out = tmp_path / "run"
    assert main(["demo", "--data", str(data), "--general", "world_facts", "--size", "tiny", "--quick",
                 "--steps", "30", "--methods", "ga", "idk_nll", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert (out / "forget_vs_utility.png").stat().st_size > 0
    assert res["source"]["roles"] == {"forget10": "forget", "retain90": "retain", "world_facts": "general",
                                      "holdout": "holdout"}
    assert set(res["metrics"]["target"]) == {"forget10", "retain90", "world_facts", "holdout"}
    table = res["benchmark"]["table"]
    assert set(table) == {"reference", "target", "ga", "idk_nll"}
    assert res["benchmark"]["failed"] == {}  # IdkNLL's refusal answers exist for QA data of one's own too
    # the probes: relearning and REMIND run on any QA data; the overlap splits need the benchmark's columns
    assert 0.0 <= table["ga"]["relearn_p"] <= 1.0 and 0.0 <= table["ga"]["remind_auc"] <= 1.0
    assert "person" in res["benchmark"]["probes_not_available"]["overlap"]
    assert 0.0 <= table["ga"]["forget_probability"] <= 1.0 and 0.0 <= table["target"]["mia_auc_min_k"] <= 1.0
    na = res["benchmark"]["not_available"]
    if full:
        assert na == {} and 0.0 <= table["ga"]["forget_quality"] <= 1.0 and "n/a" not in printed
    else:
        assert na["forget_quality"] == "needs columns paraphrased_answer, perturbed_answer in split 'forget10'"
        assert "perturbed_answer in split 'world_facts'" in na["model_utility"]
        assert "n/a: forget_q needs columns paraphrased_answer, perturbed_answer" in printed
    model, tok = from_pretrained(out / "models" / "target")
    assert model.config.vocab_size == len(tok)
