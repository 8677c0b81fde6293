"""Streams of deletion requests (jaxunlearn/stream.py, stream_cli.py): the request split against a loop,
the state carried between requests (a fake method recording its inputs), the reports, the CLI's bad
input, and one tiny end-to-end stream."""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_lm import bigram_apply, bigram_params, lm_batch

from jaxunlearn import continual as C
from jaxunlearn import stream as S
from jaxunlearn import stream_cli
from jaxunlearn.methods import UnlearnContext
from jaxunlearn.pipeline import DemoConfig
from jaxunlearn.train import TrainConfig


def _loop_split(labels, num_requests, seed):
    """The reference: subjects in first-appearance order, dealt in a seeded order into runs of
    ceil(G/R) (the first G mod R runs) or floor(G/R) subjects."""
    uniq = []
    for x in labels:
        if x not in uniq:
            uniq.append(x)
    order = list(np.random.default_rng(seed).permutation(len(uniq)))
    sizes = [len(uniq) // num_requests + (1 if r < len(uniq) % num_requests else 0) for r in range(num_requests)]
    out, start = [], 0
    for size in sizes:
        chosen = {uniq[i] for i in order[start:start + size]}
        out.append([i for i, x in enumerate(labels) if x in chosen])
        start += size
    return out


@pytest.mark.parametrize("seed", [0, 3])
def test_split_requests_matches_a_loop_keeps_subjects_together_and_covers_the_forget_set(seed):
    rng = np.random.default_rng(seed)
    labels = [f"p{int(i)}" for i in rng.integers(0, 7, size=40)]
    reqs = S.split_requests(len(labels), 3, seed=seed, groups=labels)
    assert [r.tolist() for r in reqs] == _loop_split(labels, 3, seed)
    flat = np.concatenate(reqs)
    assert sorted(flat.tolist()) == list(range(40))  # disjoint and covering
    owner = {}
    for r, rows in enumerate(reqs):
        assert len(rows) > 0
        for i in rows:
            assert owner.setdefault(labels[i], r) == r  # a subject's rows in one request
    by_rows = S.split_requests(10, 4, seed=seed)
    assert [r.tolist() for r in by_rows] == _loop_split(list(range(10)), 4, seed)


def test_split_requests_bad_input():
    with pytest.raises(ValueError, match="cannot split 2 subjects into 3 requests"):
        S.split_requests(4, 3, groups=["a", "a", "b", "b"])
    with pytest.raises(ValueError, match="num_requests must be an int >= 2"):
        S.split_requests(4, 1)
    with pytest.raises(ValueError, match="3 labels for 4 rows"):
        S.split_requests(4, 2, groups=["a", "b", "c"])


def _ctx():
    params = bigram_params(6, 4, seed=0)
    return UnlearnContext(bigram_apply, params, lm_batch(12, 1, vocab=6, seq=5, prompt=2),
                          lm_batch(8, 2, vocab=6, seq=5, prompt=2), seed=5)


_GA = {"kind": "gradient", "batch_size": 4, "unlearn": {"method": "ga", "steps": 1, "learning_rate": 0.01}}


class FakeMethod:
    """Records what every request got and returns ``params + (call number)``."""

    def __init__(self):
        self.calls = []

    def __call__(self, ctx, cfg, regularizer=None):
        self.calls.append({"params": jax.tree.map(np.asarray, ctx.params), "forget": dict(ctx.forget),
                           "retain": dict(ctx.retain),
                           "seed": ctx.seed, "regularizer": regularizer, "cfg": cfg})
        return jax.tree.map(lambda x: x + float(len(self.calls)), ctx.params)


@pytest.mark.parametrize("cumulative", [False, True])
def test_each_request_starts_from_the_previous_result_on_its_own_rows(cumulative):
    ctx, fake = _ctx(), FakeMethod()
    reqs = [np.array([0, 3, 4]), np.array([1, 2]), np.array([5, 9, 11])]
    run = S.run_requests(ctx, reqs, _GA, cumulative=cumulative, unlearn=fake, evaluate=lambda r, p: {"seen": r})
    expected = jax.tree.map(np.asarray, ctx.params)
    for r, call in enumerate(fake.calls):
        for k in expected:
            np.testing.assert_array_equal(call["params"][k], expected[k])
        expected = jax.tree.map(lambda x, r=r: x + float(r + 1), expected)
        rows = np.sort(np.concatenate(reqs[:r + 1])) if cumulative else reqs[r]
        np.testing.assert_array_equal(call["forget"]["input_ids"], ctx.forget["input_ids"][rows])
        assert call["seed"] == ctx.seed + r and call["regularizer"] is None
    for k in expected:
        np.testing.assert_array_equal(np.asarray(run.params[k]), expected[k])
    assert [rep["request"] for rep in run.reports] == [0, 1, 2]
    assert [rep["seen"] for rep in run.reports] == [0, 1, 2]
    assert [rep["rows"] for rep in run.reports] == ([3, 5, 8] if cumulative else [3, 2, 3])
    assert all({"request", "rows", "seconds", "continual", "seen"} <= set(rep) for rep in run.reports)
    assert run.state is None


def test_the_fisher_state_is_carried_between_requests():
    ctx, fake = _ctx(), FakeMethod()
    reqs = [np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7]), np.array([8, 9, 10, 11])]
    c = C.ContinualConfig(kind="lwf", strength=2.0, fisher_examples=8, fisher_batch_size=4)
    run = S.run_requests(ctx, reqs, _GA, continual=c, unlearn=fake)
    outputs = [jax.tree.map(lambda x, i=i: np.asarray(x) + sum(range(1, i + 1)), ctx.params) for i in range(4)]
    for r, call in enumerate(fake.calls):
        start = jax.tree.map(jnp.asarray, call["params"])
        state = call["regularizer"](start).init(start)
        assert isinstance(state, C.FisherPenaltyState)
        for k in start:  # the anchor is the previous request's result (the target for the first)
            np.testing.assert_allclose(np.asarray(state.anchor[k]), outputs[r][k], rtol=1e-6)
        # the carried Fisher: the running mean of the retain Fishers at the target and each result so far
        ref = [C.request_fisher(ctx, ctx.retain, jax.tree.map(jnp.asarray, outputs[j]), max_examples=8, batch_size=4,
                                seed=ctx.seed + max(j - 1, 0) if j else ctx.seed) for j in range(r + 1)]
        for k in start:
            np.testing.assert_allclose(np.asarray(state.fisher[k]), np.mean([np.asarray(f[k]) for f in ref], 0),
                                       rtol=1e-5, atol=1e-7)
        assert run.reports[r]["continual"]["fisher_count"] == r + 1
    assert int(run.state.count) == 4
    with pytest.raises(ValueError, match="needs a gradient method"):
        S.run_requests(ctx, reqs, {"kind": "ssd"}, continual="lwf", unlearn=fake)
    with pytest.raises(ValueError, match=r"request\(s\) \[1\]"):
        S.run_requests(ctx, [np.array([0]), np.array([], int)], _GA, unlearn=fake)


def test_fit_plans_the_top_layers_and_masks_the_update():
    from test_continual import _layered, layered_apply

    params = _layered(n_layers=4)
    ctx = UnlearnContext(layered_apply, params, lm_batch(6, 1, vocab=7, seq=6, prompt=2),
                         lm_batch(6, 2, vocab=7, seq=6, prompt=2))
    fake = FakeMethod()
    run = S.run_requests(ctx, [np.array([0, 1, 2]), np.array([3, 4, 5])], _GA, continual="fit", unlearn=fake)
    for r, call in enumerate(fake.calls):
        info = run.reports[r]["continual"]
        scores = {int(k): v for k, v in info["layer_scores"].items()}
        assert info["layers"] == [max(scores, key=scores.get)]  # a quarter of 4 layers
        start = jax.tree.map(jnp.asarray, call["params"])
        tx = call["regularizer"](start)
        out, _ = tx.update(jax.tree.map(jnp.ones_like, start), tx.init(start))
        for i in range(4):
            assert float(out["layers"][i]["mlp"]["w"].sum()) == (25.0 if i in info["layers"] else 0.0)
        assert info["importance"] > 0 and info["tier"] in C.FIT_TIERS and not info["tier_applied"]


@pytest.mark.parametrize("thresholds,tier", [((1e9, 1e9), "rl"), ((0.0, 1e9), "npo"), ((0.0, 0.0), "npo_kl")])
def test_fit_importance_tiers_choose_the_objective(thresholds, tier):
    from test_continual import _layered, layered_apply

    params = _layered(n_layers=2)
    ctx = UnlearnContext(layered_apply, params, lm_batch(4, 1, vocab=7, seq=6, prompt=2),
                         lm_batch(4, 2, vocab=7, seq=6, prompt=2))
    fake = FakeMethod()
    c = C.ContinualConfig(kind="fit", select_algorithm=True, thresholds=thresholds)
    run = S.run_requests(ctx, [np.array([0, 1]), np.array([2, 3])], _GA, continual=c, unlearn=fake)
    assert [r["continual"]["tier"] for r in run.reports] == [tier, tier]
    u = fake.calls[1]["cfg"]["unlearn"]
    assert u["method"] == {"rl": "grad_diff", "npo": "npo", "npo_kl": "npo"}[tier]
    retain = fake.calls[1]["retain"]
    if tier == "rl":  # descent on the request with random answers: the prompts kept, the answers redrawn
        assert u["gamma"] == 0.0
        np.testing.assert_array_equal(retain["input_ids"][:, :2], ctx.forget["input_ids"][2:4, :2])
        assert (retain["input_ids"][:, 2:] != ctx.forget["input_ids"][2:4, 2:]).any()
    else:
        np.testing.assert_array_equal(retain["input_ids"], ctx.retain["input_ids"])
        assert (u["retain_loss"] == "kl") if tier == "npo_kl" else (u["alpha"] == 0.0)


def test_summarize_split_hand_case():
    stats = {"exact_memorization": np.array([1.0, 0.5, np.nan, 1.0], np.float32),
             "probability": np.array([0.9, 0.5, 0.1, 0.7]), "fact_acc": np.array([1.0, 0.0, 0.0, 1.0])}
    s = S.summarize_split(stats)
    assert s["fa"] == pytest.approx(2 / 3) and s["fa_token"] == pytest.approx(2.5 / 3)
    assert s["probability"] == pytest.approx(0.55) and s["fact_acc"] == pytest.approx(0.5)


# ------------------------------------------------------------------ the CLI


def _args(*argv):
    p = argparse.ArgumentParser()
    stream_cli.add_stream_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["stream", *argv])


@pytest.fixture
def no_work(monkeypatch):
    """Any data preparation fails the test: bad input must be refused before any work."""
    import jaxunlearn.pipeline as pipeline

    def boom(*a, **k):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(pipeline, "prepare_data", boom)


def test_cli_refuses_bad_input_before_any_work(tmp_path, no_work, capsys):
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="--requests must be >= 2"):
        stream_cli.run_stream_cli(_args("--out", out, "--requests", "1"))
    with pytest.raises(ValueError, match="unknown method 'nope'.*available: .*npo"):
        stream_cli.run_stream_cli(_args("--out", out, "--methods", "npo", "nope"))
    with pytest.raises(ValueError, match="unknown continual method 'ewc'"):
        stream_cli.run_stream_cli(_args("--out", out, "--methods", "npo+ewc"))
    with pytest.raises(ValueError, match="--continual takes one value or one per method"):
        stream_cli.run_stream_cli(_args("--out", out, "--methods", "npo", "saf", "ga", "--continual", "lwf", "fit"))
    with pytest.raises(ValueError, match="continual method 'lwf' needs a gradient method config"):
        stream_cli.run_stream_cli(_args("--out", out, "--methods", "ssd+lwf"))
    os.makedirs(out)
    (tmp_path / "out" / "mine.txt").write_text("a user's file")
    with pytest.raises(FileExistsError, match="not written by jaxunlearn"):
        stream_cli.run_stream_cli(_args("--out", out, "--overwrite"))
    assert (tmp_path / "out" / "mine.txt").read_text() == "a user's file"
    assert stream_cli.main(["--out", out, "--requests", "0"]) == 2
    assert "--requests must be >= 2" in capsys.readouterr().err
    c = stream_cli.config_from_args(_args("--out", out, "--methods", "npo", "saf", "--continual", "lwf", "none",
                                          "--quick", "--lwf-strength", "5"))
    assert c.methods == ("npo+lwf", "saf") and c.max_steps == stream_cli.QUICK_MAX_STEPS
    assert c.continual_config("lwf").strength == 5.0 and c.demo == S.STREAM_SIZES["quick"]


# ------------------------------------------------------------------ end to end

TINY = DemoConfig(num_people=20, num_general=10, vocab_size=200, hidden_size=16, intermediate_size=32, num_layers=2,
                  num_heads=2, num_kv_heads=1, muse=False,
                  train=TrainConfig(steps=30, batch_size=32, learning_rate=1e-2, warmup_steps=3))


@pytest.mark.slow  # about 50 s on 2 CPU cores: a target trained, two methods compiled, every evaluation pass
def test_a_tiny_stream_end_to_end(tmp_path):
    cfg = S.StreamConfig(demo=TINY, methods=("ga", "ga+lwf"), requests=2, max_steps=2, eval_rows=16,
                         relearn_steps=1, continual={"lwf": {"fisher_examples": 8}})
    res = S.run_stream(tmp_path / "s", cfg, progress=False)
    assert res["complete"] and not res["failed"]
    for f in ("results.json", "table.md", "stream.png", ".jaxunlearn-output.json", "models/target/stream_target.json"):
        assert (tmp_path / "s" / f).is_file(), f
    assert json.loads((tmp_path / "s" / "results.json").read_text())["complete"]
    assert len(res["requests"]) == 2 and all(len(r["subjects"]) == 1 for r in res["requests"])
    for m in ("ga", "ga+lwf"):
        reps = res["runs"][m]
        assert [r["request"] for r in reps] == [0, 1]
        assert reps[0]["earlier"] is None and reps[0]["quant"] is None and reps[0]["relearn"] is None
        assert set(reps[1]["quant"]) == {"bf16", "int4", "recovery_ratio", "recovery_delta"}
        assert set(reps[1]["utility"]) == {res["data"]["retain_split"], "general"}
        assert len(reps[1]["by_request"]) == 2 and {"fa", "probability", "fact_acc"} <= set(reps[1]["current"])
        assert reps[1]["relearn"]["split_by"] == "row"  # one earlier person: the attack splits rows
        # one earlier request: pooled == that request's own summary; current == the last request's
        assert reps[1]["earlier"] == reps[1]["by_request"][0] and reps[1]["current"] == reps[1]["by_request"][1]
        q = reps[1]["quant"]
        if q["bf16"]["fa"] > 0:
            assert q["recovery_ratio"] == pytest.approx(q["int4"]["fa"] / q["bf16"]["fa"])
        assert q["recovery_delta"] == pytest.approx(q["int4"]["fa"] - q["bf16"]["fa"])
    assert res["runs"]["ga+lwf"][1]["continual"]["anchored"]
    assert "| ga+lwf | 2 |" in res["table"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        S.run_stream(tmp_path / "s", cfg, progress=False)
    again = S.run_stream(tmp_path / "t", S.StreamConfig(demo=TINY, methods=("ga",), requests=2, max_steps=1,
                                                        eval_rows=8), progress=False, reuse_from=tmp_path / "s")
    assert again["runs"]["ga"][0]["request"] == 0
