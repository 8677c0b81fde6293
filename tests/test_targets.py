"""The benchmarks' cached target (jaxunlearn.targets) and the shared name-list check.

- ``check_names`` / ``check_qa_demo`` refuse what StreamConfig and DurabilityConfig refused by hand.
- ``load_cached_target`` takes the first directory whose record and vocabulary match, passing over
  missing, different, unreadable and damaged ones (hand-built directories).
- ``provide_target`` reuses a cached checkpoint without training (the copy is byte-equal and carries the
  record); the training path is covered end to end by the stream and durability tests.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxunlearn.data import train_tokenizer
from jaxunlearn.models import Decoder, ModelConfig, save_pretrained
from jaxunlearn.pipeline import DemoConfig
from jaxunlearn.targets import check_qa_demo, load_cached_target, provide_target, target_record
from jaxunlearn.validate import check_names


@pytest.mark.parametrize("value, error, match", [
    ("npo", TypeError, "X.methods must be a sequence of names"),
    (5, TypeError, "sequence of names"),
    (("npo", 3), TypeError, r"\(strings\)"),
    ((), ValueError, "must name at least one"),
    (("npo", "ga", "npo"), ValueError, r"\['npo'\] named twice or more"),
])
def test_check_names_refuses(value, error, match):
    with pytest.raises(error, match=match):
        check_names("X", "methods", value)


def test_check_names_returns_a_tuple():
    assert check_names("X", "methods", ["npo", "ga"]) == ("npo", "ga")
    assert check_names("X", "methods", (m for m in ("a",))) == ("a",)


def test_check_qa_demo():
    check_qa_demo("X", DemoConfig(muse=False), "why")
    with pytest.raises(TypeError, match="X.demo must be a DemoConfig, got dict"):
        check_qa_demo("X", {}, "why")
    with pytest.raises(ValueError, match="X.demo.muse must be False: because"):
        check_qa_demo("X", DemoConfig(muse=True), "because")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Four candidate directories: no record, another demo's record, a damaged checkpoint with the right
    record, a good one with another vocabulary, then the good one."""
    root = tmp_path_factory.mktemp("targets")
    tok = train_tokenizer(["alice likes apples", "bob likes bananas"] * 4, vocab_size=64)
    other = train_tokenizer(["zeta eta theta"] * 4, vocab_size=64)
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    demo = DemoConfig()
    rec = target_record("test", demo)
    dirs = {}
    for name, t, record in (("no_record", tok, None), ("other_demo", tok, target_record("test", DemoConfig(seed=1))),
                            ("damaged", tok, rec), ("other_vocab", other, rec), ("good", tok, rec)):
        d = root / name
        m = model if t is tok else Decoder(cfg.replace(vocab_size=len(other)), rngs=nnx.Rngs(0))
        save_pretrained(m, d, tokenizer=t)
        if record is not None:
            (d / "rec.json").write_text(json.dumps(record))
        dirs[name] = d
    (dirs["damaged"] / "config.json").write_text("{not json")
    return dirs, tok, demo, rec, model


def test_load_cached_target_takes_the_first_matching_directory(checkpoints):
    dirs, tok, _, rec, model = checkpoints
    order = [dirs[n] for n in ("no_record", "other_demo", "damaged", "other_vocab", "good")]
    got, where = load_cached_target(order + [dirs["no_record"]], "rec.json", rec, tok)
    assert where == dirs["good"]
    a, b = jax.tree.leaves(nnx.state(got, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert load_cached_target(order[:4], "rec.json", rec, tok) == (None, None)
    assert load_cached_target([], "rec.json", rec, tok) == (None, None)


def test_provide_target_reuses_without_training(checkpoints, tmp_path, monkeypatch):
    dirs, tok, demo, rec, _ = checkpoints

    def no_training(*a, **k):
        raise AssertionError("a cached target was retrained")

    monkeypatch.setattr("jaxunlearn.train.train", no_training)

    class Data:
        tokenizer = tok

    logged = []
    got = provide_target(tmp_path / "t", [dirs["other_demo"], dirs["good"]], Data, demo, kind="test",
                         record_file="rec.json", log=logged.append)
    assert got.reused_from == dirs["good"] and got.history is None and logged == [f"reusing the target in {dirs['good']}"]
    for f in dirs["good"].iterdir():
        if f.name != "rec.json":  # rewritten (same record, atomic writer's format)
                assert (tmp_path / "t" / f.name).read_bytes() == f.read_bytes(), f.name
    assert json.loads((tmp_path / "t" / "rec.json").read_text()) == rec
