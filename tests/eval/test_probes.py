"""The benchmark's probes: the overlap splits against their definition checked row by row, the
fact scores against a loop over tokens, the relearning probe against the attack run by hand, and
the probe table."""

import dataclasses

import datasets
import jax
import numpy as np
import pytest

from jaxunlearn.data.overlap import overlap_splits
from jaxunlearn.data.synthetic import generate_benchmark
from jaxunlearn.eval.probes import benchmark_probes, fact_scores, relearn_probe
from jaxunlearn.eval.relearn import RelearnConfig, relearn, split_for_relearning
from jaxunlearn.results_table import format_probe_table
from toy_lm import bigram_apply, bigram_params, lm_batch


@pytest.fixture(scope="module")
def bench():
    return generate_benchmark(num_people=40, num_general=10, seed=3)


def test_overlap_splits_follow_their_definition(bench):
    out = overlap_splits(bench, "forget10", "retain90", seed=1)
    f, r = bench["forget10"], bench["retain90"]
    f_rows = {(f[i]["person"], f[i]["attribute"]): f[i] for i in range(len(f))}
    r_rows = {(r[i]["person"], r[i]["attribute"]): r[i] for i in range(len(r))}
    mf, mr = out["mixed_forget"], out["mixed_retain"]
    assert len(mf) == len(mr) > 0.9 * len(f)  # nearly every forget row finds a partner
    first = 0
    for a, b in zip(mf, mr):
        assert a["question"] == b["question"] and a["answer"] == b["answer"]
        assert a["partner"] == b["person"] and b["partner"] == a["person"] and a["attribute"] == b["attribute"]
        fr, rr = f_rows[(a["person"], a["attribute"])], r_rows[(b["person"], b["attribute"])]
        assert a["fact"] == fr["fact"] and b["fact"] == rr["fact"] and a["fact"] != b["fact"]
        assert a["answer"] in (f"{fr['answer']} {rr['answer']}", f"{rr['answer']} {fr['answer']}")
        assert a["answer"].count(a["fact"]) == 1 and a["answer"].count(b["fact"]) == 1
        first += a["answer"].startswith(fr["answer"])
    assert 0.25 < first / len(mf) < 0.75  # both orders occur
    forgotten = {(f[i]["attribute"], f[i]["fact"]) for i in range(len(f))}
    shared = [r[i]["question"] for i in range(len(r)) if (r[i]["attribute"], r[i]["fact"]) in forgotten]
    assert list(out["retain_shared"]["question"]) == shared
    assert len(out["retain_shared"]) + len(out["retain_unshared"]) == len(r)
    again = overlap_splits(bench, "forget10", "retain90", seed=1)
    assert list(again["mixed_forget"]["partner"]) == list(mf["partner"])
    assert list(overlap_splits(bench, "forget10", "retain90", seed=2)["mixed_forget"]["partner"]) != list(
        mf["partner"])


def test_overlap_splits_bad_input(bench):
    with pytest.raises(KeyError, match="nope"):
        overlap_splits(bench, "nope", "retain90")
    bare = {"f": bench["forget10"].remove_columns(["fact"]), "r": bench["retain90"]}
    with pytest.raises(KeyError, match=r"split 'f' lacks \['fact'\]"):
        overlap_splits(bare, "f", "r")


def test_fact_scores_against_a_token_loop():
    params = bigram_params(9, 4, seed=2)
    data = lm_batch(5, 1, vocab=9, seq=7, prompt=2)
    fm = np.zeros_like(data["loss_mask"])
    fm[:, 3:5] = 1
    fm[4, 6] = 1
    data["fact_mask"] = fm
    got = fact_scores(bigram_apply, params, data, batch_size=2)
    logp = np.asarray(jax.nn.log_softmax(bigram_apply(params, data["input_ids"]), axis=-1))
    for i in range(5):
        nll, hits, n = 0.0, 0, 0
        for t in range(1, 7):
            if fm[i, t]:
                nll -= logp[i, t - 1, data["input_ids"][i, t]]
                hits += int(np.argmax(logp[i, t - 1]) == data["input_ids"][i, t])
                n += 1
        assert got["fact_p"][i] == pytest.approx(np.exp(-nll / n), rel=1e-5)
        assert got["fact_acc"][i] == pytest.approx(hits / n)
    with pytest.raises(KeyError, match="fact_mask"):
        fact_scores(bigram_apply, params, {k: v for k, v in data.items() if k != "fact_mask"})


def test_relearn_probe_is_the_attack_on_the_held_out_people():
    target = bigram_params(8, 4, seed=0)
    unlearned = jax.tree.map(lambda x: x * 0.5, target)
    data = lm_batch(12, 0, vocab=8, seq=6, prompt=2)
    groups = [i // 3 for i in range(12)]
    cfg = RelearnConfig(steps=4, learning_rate=1e-2, batch_size=3, fraction=0.5, eval_every=4, seed=1)
    got = relearn_probe(bigram_apply, data, groups, target, cfg, min_gap=-np.inf)(unlearned)  # the bare formula

    attack, held = split_for_relearning(12, 0.5, 1, groups)

    def mean_p(p):  # exp(-mean answer NLL) per row, averaged, by hand
        logp = np.asarray(jax.nn.log_softmax(bigram_apply(p, data["input_ids"][held]), axis=-1))
        ids = data["input_ids"][held]
        nll = -np.array([logp[i, t - 1, ids[i, t]] for i in range(len(held)) for t in range(2, 6)]).reshape(-1, 4)
        return float(np.mean(np.exp(nll.mean(1) * -1)))

    curve = relearn(bigram_apply, unlearned, {k: data[k][attack] for k in data}, cfg, lambda p: {"p": mean_p(p)})
    assert got["relearn_p0"] == pytest.approx(mean_p(unlearned), rel=1e-5)
    assert got["relearn_p"] == pytest.approx(curve[-1]["p"], rel=1e-4)
    want = (curve[-1]["p"] - mean_p(unlearned)) / (mean_p(target) - mean_p(unlearned))
    assert got["relearn_rec"] == pytest.approx(want, rel=1e-3)
    if mean_p(target) - mean_p(unlearned) < 0.05:  # the default: no ratio of two tiny differences
        assert np.isnan(relearn_probe(bigram_apply, data, groups, target, cfg)(unlearned)["relearn_rec"])
    with pytest.raises(KeyError, match="loss_mask"):
        relearn_probe(bigram_apply, {k: v for k, v in data.items() if k != "loss_mask"}, groups, target, cfg)


def test_benchmark_probes_name_what_the_data_cannot_support(bench):
    class Data:  # the PreparedData fields benchmark_probes reads
        dataset = {"forget10": bench["forget10"].remove_columns(["fact"]), "retain90": bench["retain90"]}
        forget_split, retain_split, tokenizer, encoded = "forget10", "retain90", None, {}

    probes, missing = benchmark_probes(Data, bigram_apply, None, ["overlap"])
    assert probes == {} and "fact" in missing["overlap"]
    with pytest.raises(ValueError, match="unknown probe"):
        benchmark_probes(Data, bigram_apply, None, ["remind2"])


def test_probe_table_shows_only_present_columns():
    rows = {"npo": {"relearn_p": 0.5, "relearn_rec": 0.25, "mixed_forget_fa": 0.1},
            "target": {"relearn_p": 0.9, "mixed_forget_fa": 0.8}}
    text = format_probe_table(rows)
    head = text.splitlines()[0].split()
    assert head == ["method", "n", "relearn_p", "relearn_rec", "mixF_FA"]
    assert "+0.250" in text and "0.800" in text
    assert format_probe_table({"npo": {"forget_quality": 0.1}}) is None


def test_mixed_rows_round_trip_a_dataset():
    ds = datasets.Dataset.from_list([{"question": "q?", "answer": "a b.", "person": "x", "attribute": "k",
                                      "fact": "b"}])
    out = overlap_splits({"f": ds, "r": ds}, "f", "r")
    assert "mixed_forget" not in out  # the only partner is the same person with the same value
    assert len(out["retain_shared"]) == 1 and "retain_unshared" not in out


def test_remind_probe_is_remind_evaluate_on_seeded_subsets():
    from jaxunlearn.eval.probes import remind_probe
    from jaxunlearn.eval.remind import RemindConfig, embedding_neighbours, remind_evaluate

    params = bigram_params(12, 4, seed=3)
    f, o = lm_batch(14, 1, vocab=12, seq=6, prompt=3), lm_batch(11, 2, vocab=12, seq=6, prompt=3)
    nb = embedding_neighbours(params["E"], 1)
    cfg = RemindConfig(num_variants=4, strengths=(0.2, 0.4))
    got = remind_probe(bigram_apply, f, o, nb, cfg=cfg, max_examples=10, seed=5, batch_size=3)(params)
    fr = np.sort(np.random.default_rng(5).permutation(14)[:10])
    orows = np.sort(np.random.default_rng(6).permutation(11)[:10])
    want = remind_evaluate(bigram_apply, params, {k: v[fr] for k, v in f.items()}, {k: v[orows] for k, v in o.items()},
                           key=jax.random.key(5), cfg=cfg, neighbours=nb, seed=5)["auc"]
    assert got == {"remind_auc": pytest.approx(want, abs=1e-12)}


def test_relearn_curve_columns_and_plot(tmp_path):
    from jaxunlearn.results_table import plot_relearn

    target = bigram_params(8, 4, seed=0)
    data = lm_batch(12, 0, vocab=8, seq=6, prompt=2)
    cfg = RelearnConfig(steps=4, learning_rate=1e-2, batch_size=3, fraction=0.5, eval_every=2, seed=1)
    row = relearn_probe(bigram_apply, data, [i // 3 for i in range(12)], target, cfg)(
        jax.tree.map(lambda x: x * 0.5, target))
    assert [k for k in row if k.startswith("relearn_p_step")] == ["relearn_p_step0", "relearn_p_step2",
                                                                  "relearn_p_step4"]
    assert row["relearn_p_step0"] == row["relearn_p0"] and row["relearn_p_step4"] == row["relearn_p"]
    from jaxunlearn.stats import aggregate_rows

    agg = aggregate_rows([row, {k: v + 0.01 for k, v in row.items()}])  # a row with intervals: a band
    path = plot_relearn({"m": row, "reference": agg}, tmp_path / "r.png")
    assert path is not None and (tmp_path / "r.png").stat().st_size > 1000
    assert plot_relearn({"m": {"forget_quality": 1.0}}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_relearn_data_modes_choose_the_attack_rows(bench):
    """``relearn_data``: "facts" holds out whole attributes of the same people, "paraphrase" fine-tunes on
    the attack rows' paraphrased answers (the probe equals relearn_probe with that attack source), and a
    missing column is named."""
    from jaxunlearn.data import encode_split, train_tokenizer
    from jaxunlearn.data.tokenizer import benchmark_texts

    tok = train_tokenizer(benchmark_texts(bench), vocab_size=256)
    fs = "forget10"
    enc = encode_split(tok, bench[fs], max_length=None)

    class Data:
        dataset, forget_split, retain_split, holdout_split, tokenizer = bench, fs, "retain90", None, tok
        encoded = {fs: enc}

    params = bigram_params(len(tok), 4, seed=1)
    cfg = RelearnConfig(steps=2, learning_rate=1e-2, batch_size=4, fraction=0.5, eval_every=2)
    for mode in ("facts", "paraphrase"):
        probes, missing = benchmark_probes(Data, bigram_apply, params, ["relearn"], seed=3, relearn_data=mode,
                                           relearn=cfg)
        assert missing == {}
        got = probes["relearn"](params)
        c = dataclasses.replace(cfg, seed=3)
        if mode == "facts":
            attrs = list(bench[fs]["attribute"])
            a, h = split_for_relearning(len(attrs), 0.5, 3, attrs)
            assert {attrs[i] for i in a}.isdisjoint({attrs[i] for i in h})
            people = list(bench[fs]["person"])
            assert {people[i] for i in a} == {people[i] for i in h}  # the same people on both sides
            want = relearn_probe(bigram_apply, enc, attrs, params, c)(params)
        else:
            para = encode_split(tok, bench[fs], max_length=None, answer_column="paraphrased_answer", fact_column=None)
            want = relearn_probe(bigram_apply, enc, list(bench[fs]["person"]), params, c, attack_source=para)(params)
            plain = relearn_probe(bigram_apply, enc, list(bench[fs]["person"]), params, c)(params)
            assert got["relearn_p"] != plain["relearn_p"]  # the paraphrases are what was fine-tuned on
        np.testing.assert_equal(got, want)  # NaN-aware: relearn_rec is NaN where nothing was forgotten
    bare = dict(bench)
    bare[fs] = bench[fs].remove_columns(["paraphrased_answer"])

    class Bare(Data):
        dataset = bare

    _, missing = benchmark_probes(Bare, bigram_apply, params, ["relearn"], relearn_data="paraphrase")
    assert "paraphrased_answer" in missing["relearn"]
    with pytest.raises(ValueError, match="relearn_data"):
        benchmark_probes(Data, bigram_apply, params, ["relearn"], relearn_data="other")
