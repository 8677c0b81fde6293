"""The relearning attack: the split, the fine-tune against a hand-written AdamW loop, the
recovered fraction by hand, and recovery on a toy model that only had its forget rows pushed
down (gradient ascent): fine-tuning on half of them brings the other half back."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxunlearn.eval.relearn import RelearnConfig, recovered_fraction, relearn, split_for_relearning
from toy_lm import bigram_apply, bigram_params, lm_batch


def test_split_partitions_rows_and_keeps_groups_together():
    groups = [f"p{i // 3}" for i in range(12)]  # 4 people x 3 questions
    a, h = split_for_relearning(12, 0.5, seed=3, groups=groups)
    assert sorted(a.tolist() + h.tolist()) == list(range(12)) and len(a) == 6
    assert not {groups[i] for i in a} & {groups[i] for i in h}
    np.testing.assert_array_equal(a, split_for_relearning(12, 0.5, seed=3, groups=groups)[0])
    a2, h2 = split_for_relearning(5, 0.99)
    assert len(a2) == 4 and len(h2) == 1  # never an empty held-out part
    with pytest.raises(ValueError, match="fraction"):
        split_for_relearning(5, 1.0)
    with pytest.raises(ValueError, match="cannot split"):
        split_for_relearning(3, 0.5, groups=["x"] * 3)
    with pytest.raises(ValueError, match="labels"):
        split_for_relearning(3, 0.5, groups=["x", "y"])


def test_recovered_fraction_by_hand():
    assert recovered_fraction(0.2, 0.2, 0.8) == 0.0
    assert recovered_fraction(0.2, 0.8, 0.8) == pytest.approx(1.0)
    assert recovered_fraction(0.2, 0.35, 0.8) == pytest.approx(0.25)
    assert np.isnan(recovered_fraction(0.5, 0.6, 0.5))


def test_relearn_equals_a_hand_written_adamw_loop():
    params = bigram_params(8, 4, seed=1)
    data = lm_batch(6, 0, vocab=8, seq=5, prompt=2)
    cfg = RelearnConfig(steps=5, learning_rate=1e-2, batch_size=4, eval_every=2, seed=7)
    curve = relearn(bigram_apply, params, data, cfg, evaluate=lambda p: {"w": p["W"][1, 2], "e": p["E"][3, 0]})
    assert [c["step"] for c in curve] == [0, 2, 4, 5]

    def loss(p, ids, lm):  # the pooled answer NLL, written out
        lp = jax.nn.log_softmax(bigram_apply(p, ids), -1)[:, :-1]
        picked = jnp.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
        return -jnp.sum(picked * lm[:, 1:]) / jnp.sum(lm[:, 1:])

    tx, p = optax.adamw(1e-2), params
    opt = tx.init(p)
    for s in range(5):  # one batch of 4 per epoch (6 rows): a new permutation every step
        rows = np.random.default_rng([7, s]).permutation(6)[:4]
        g = jax.grad(loss)(p, jnp.asarray(data["input_ids"][rows]), jnp.asarray(data["loss_mask"][rows]))
        u, opt = tx.update(g, opt, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(curve[-1]["w"], float(p["W"][1, 2]), rtol=1e-5)
    np.testing.assert_allclose(curve[-1]["e"], float(p["E"][3, 0]), rtol=1e-5)
    assert curve[0]["w"] == pytest.approx(float(params["W"][1, 2]))  # step 0: the model as given


def test_suppressed_knowledge_comes_back():
    V, T = 6, 6
    rng = np.random.default_rng(0)
    ids = np.tile(rng.permutation(V)[:T], (8, 1)).astype(np.int32)  # one fact, asked 8 times
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones(ids.shape, np.float32)}
    attack, held = split_for_relearning(8, 0.5, seed=0)

    def nll(p, rows):  # mean token NLL of the rows
        x = jnp.asarray(ids[rows])
        lp = jax.nn.log_softmax(bigram_apply(p, x), -1)[:, :-1]
        return -jnp.mean(jnp.take_along_axis(lp, x[:, 1:, None], -1))

    prob = lambda p: {"p": float(jnp.exp(-nll(p, held)))}  # noqa: E731
    learned, tx = bigram_params(V, 4), optax.adamw(5e-2)
    opt = tx.init(learned)
    for _ in range(60):  # the target: the fact learned
        u, opt = tx.update(jax.grad(nll)(learned, np.arange(8)), opt, learned)
        learned = optax.apply_updates(learned, u)
    unlearned = learned
    for _ in range(400):  # gradient ascent pushes it down
        if prob(unlearned)["p"] < 0.2:
            break
        unlearned = jax.tree.map(lambda x, d: x + 0.5 * d, unlearned, jax.grad(nll)(unlearned, np.arange(8)))
    p_target, p_unlearned = prob(learned)["p"], prob(unlearned)["p"]
    assert p_target > 0.5 > 0.2 > p_unlearned
    sub = {k: v[attack] for k, v in data.items()}
    curve = relearn(bigram_apply, unlearned, sub, RelearnConfig(steps=20, learning_rate=5e-2, batch_size=4,
                                                                  eval_every=5), prob)
    assert curve[0]["p"] == pytest.approx(p_unlearned)
    assert recovered_fraction(p_unlearned, curve[-1]["p"], p_target) > 0.5


def test_bad_inputs():
    with pytest.raises(ValueError, match="fraction"):
        RelearnConfig(fraction=1.0)
    with pytest.raises(KeyError, match="loss_mask"):
        relearn(bigram_apply, bigram_params(4, 2), {"input_ids": np.zeros((2, 3), np.int32),
                                                    "attention_mask": np.ones((2, 3))}, RelearnConfig(), lambda p: {})
