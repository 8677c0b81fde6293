import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxunlearn import train as tr
from jaxunlearn.models import DecoderFn, ExampleNLL, answer_loss
from jaxunlearn.losses import sequence_nll


class Bigram(nnx.Module):
    """A toy causal LM: logits_t = W[x_t] (so it can memorise next-token tables)."""

    def __init__(self, vocab, rngs):
        self.table = nnx.Embed(vocab, vocab, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None):
        return self.table(input_ids).astype(jnp.float32)


def _data(n=24, T=6, vocab=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(n, T)).astype(np.int32)
    # deterministic continuation so a bigram model can fit it: x_{t+1} = (x_t * 3 + 1) % vocab
    for t in range(2, T):
        ids[:, t] = (ids[:, t - 1] * 3 + 1) % vocab
    loss_mask = np.zeros((n, T), np.float32)
    loss_mask[:, 3:] = 1.0
    return {"input_ids": ids, "attention_mask": np.ones((n, T), np.int32), "loss_mask": loss_mask}


def test_batch_at_is_deterministic_epoch_permutation():
    data = _data(n=10)
    b0 = [tr.batch_at(data, 5, s, seed=1)["input_ids"] for s in range(2)]
    # the two batches of an epoch partition the data
    rows = np.concatenate(b0)
    assert sorted(map(tuple, rows)) == sorted(map(tuple, data["input_ids"]))
    np.testing.assert_array_equal(tr.batch_at(data, 5, 1, seed=1)["input_ids"], b0[1])
    assert not np.array_equal(tr.batch_at(data, 5, 2, seed=1)["input_ids"], b0[0]) or True
    with pytest.raises(ValueError, match="larger than the training set"):
        tr.batch_at(data, 11, 0, seed=0)


def test_answer_loss_matches_manual_token_mean():
    model = Bigram(16, nnx.Rngs(0))
    fn, params = DecoderFn.of(model)  # any nnx model called as model(ids, mask) -> logits
    data = _data(n=4)
    batch = {k: jnp.asarray(v) for k, v in tr.batch_at(data, 4, 0, 0).items()}
    got = fn.answer_loss(params, batch)
    np.testing.assert_array_equal(got, answer_loss(fn, params, batch))
    assert not fn.is_decoder and type(fn.example_nll) is ExampleNLL  # no fused Fisher for a non-Decoder
    logits = np.asarray(model(batch["input_ids"]), np.float64)
    ids = np.asarray(batch["input_ids"])
    m = np.asarray(batch["loss_mask"])
    tot, cnt = 0.0, 0.0
    for b in range(4):
        for t in range(1, ids.shape[1]):
            if m[b, t]:
                lz = np.log(np.exp(logits[b, t - 1]).sum())
                tot += lz - logits[b, t - 1, ids[b, t]]
                cnt += 1
    np.testing.assert_allclose(got, tot / cnt, rtol=1e-5)


def test_training_memorises_and_is_deterministic():
    data = _data()
    cfg = tr.TrainConfig(steps=60, batch_size=8, learning_rate=0.3, warmup_steps=5, weight_decay=0.0)
    m1, hist = tr.train(Bigram(16, nnx.Rngs(0)), data, cfg, progress=False, log_every=10)
    m2, _ = tr.train(Bigram(16, nnx.Rngs(0)), data, cfg, progress=False, log_every=10)
    assert hist[-1]["loss"] < 0.1 * hist[0]["loss"]
    np.testing.assert_array_equal(m1.table.embedding[...], m2.table.embedding[...])
    nll = sequence_nll(m1(jnp.asarray(data["input_ids"])), jnp.asarray(data["input_ids"]), jnp.asarray(data["loss_mask"]))
    assert float(jnp.max(nll)) < 1.0


def test_interrupted_run_resumes_to_identical_params(tmp_path):
    data = _data()
    cfg = tr.TrainConfig(steps=12, batch_size=8, learning_rate=0.1, warmup_steps=2, checkpoint_every=4)
    ref, _ = tr.train(Bigram(16, nnx.Rngs(0)), data, cfg, progress=False)

    class Interrupt(Exception):
        pass

    def boom(step, _):
        if step == 6:
            raise Interrupt

    with pytest.raises(Interrupt):
        tr.train(Bigram(16, nnx.Rngs(0)), data, cfg, checkpoint_dir=str(tmp_path / "run"), progress=False,
                 log_every=1, callback=boom)
    from jaxunlearn.checkpoint import latest_step

    assert latest_step(str(tmp_path / "run")) == 4
    resumed, hist = tr.train(Bigram(16, nnx.Rngs(0)), data, cfg, checkpoint_dir=str(tmp_path / "run"),
                             progress=False, log_every=1)
    assert hist[0]["step"] == 5
    np.testing.assert_array_equal(resumed.table.embedding[...], ref.table.embedding[...])
    assert latest_step(str(tmp_path / "run")) == 12


def test_bad_training_input():
    data = _data()
    with pytest.raises(KeyError, match="loss_mask"):
        tr.train(Bigram(16, nnx.Rngs(0)), {k: v for k, v in data.items() if k != "loss_mask"},
                 tr.TrainConfig(steps=2, batch_size=4), progress=False)
    empty = {k: v[:0] for k, v in data.items()}
    with pytest.raises(ValueError, match="empty"):
        tr.train(Bigram(16, nnx.Rngs(0)), empty, tr.TrainConfig(steps=2, batch_size=4), progress=False)


def test_training_on_a_mesh_splits_batches_and_matches_one_device():
    from jaxunlearn import sharding

    data = _data(n=32)
    cfg = tr.TrainConfig(steps=6, batch_size=8, learning_rate=0.1, warmup_steps=1)
    ref, _ = tr.train(Bigram(16, nnx.Rngs(0)), data, cfg, progress=False)
    mesh = sharding.make_mesh("fsdp=8")
    model = Bigram(16, nnx.Rngs(0))
    nnx.update(model, sharding.shard_params(nnx.state(model, nnx.Param), mesh))
    got, _ = tr.train(model, data, cfg, progress=False)
    np.testing.assert_allclose(got.table.embedding[...], ref.table.embedding[...], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        tr.train(Bigram(16, nnx.Rngs(0)), data, tr.TrainConfig(steps=1, batch_size=6), progress=False, mesh=mesh)


def _data_b(n=12, T=9, seed=1):
    """A second stream for a 32-token bigram: longer rows (padded) of tokens 16..31 (``_data`` uses 0..15,
    so fitting one stream teaches nothing of the other), x_{t+1} = 16 + (5 (x_t - 16) + 2) % 16."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(16, 32, size=(n, T)).astype(np.int32)
    for t in range(1, T):
        ids[:, t] = 16 + ((ids[:, t - 1] - 16) * 5 + 2) % 16
    loss_mask = np.zeros((n, T), np.float32)
    loss_mask[:, 1:7] = 1.0
    attention_mask = np.zeros((n, T), np.int32)
    attention_mask[:, :7] = 1
    return {"input_ids": ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def test_a_step_on_several_streams_descends_the_sum_of_their_losses():
    import optax

    a, b = _data(n=8), _data_b(n=4)
    fn, params = DecoderFn.of(Bigram(32, nnx.Rngs(0)))
    ba = {k: jnp.asarray(v) for k, v in tr.batch_at(a, 8, 0, 0).items()}
    bb = {k: jnp.asarray(v) for k, v in tr.batch_at(b, 4, 0, 0).items()}
    # independent reference: the two losses and their gradients taken one at a time, then added
    la, ga = jax.value_and_grad(lambda p: answer_loss(fn, p, ba))(params)
    lb, gb = jax.value_and_grad(lambda p: answer_loss(fn, p, bb))(params)
    want = jax.tree.map(lambda p, x, y: p - 0.5 * (x + y), params, ga, gb)
    tx = optax.sgd(0.5)
    state = tr.TrainState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params), tx.init(params))
    state, metrics = tr.make_train_step(fn, tx)(state, (ba, bb))
    np.testing.assert_allclose(float(metrics["loss"]), float(la + lb), rtol=1e-6)
    for got, exp in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)


def test_step_batches_draw_each_stream_with_its_own_seed():
    a, b = _data(n=8), _data_b(n=12)
    cfg = tr.TrainConfig(steps=3, batch_size=4, seed=5)
    assert isinstance(tr.step_batches(a, cfg, (), 2), dict)  # one stream: the plain batch, as before
    main, extra = tr.step_batches(a, cfg, [tr.Stream(b, 3)], 2)
    np.testing.assert_array_equal(main["input_ids"], tr.batch_at(a, 4, 2, 5)["input_ids"])
    np.testing.assert_array_equal(extra["input_ids"], tr.batch_at(b, 3, 2, 6)["input_ids"])


def test_training_with_a_second_stream_fits_both_and_records_it(tmp_path):
    a, b = _data(), _data_b()
    cfg = tr.TrainConfig(steps=80, batch_size=8, learning_rate=0.3, warmup_steps=5, weight_decay=0.0)
    m, _ = tr.train(Bigram(32, nnx.Rngs(0)), a, cfg, progress=False, streams=[tr.Stream(b, 4)])
    only_a, _ = tr.train(Bigram(32, nnx.Rngs(0)), a, cfg, progress=False)

    def worst_nll(model, d):
        ids = jnp.asarray(d["input_ids"])
        return float(jnp.max(sequence_nll(model(ids), ids, jnp.asarray(d["loss_mask"]))))

    assert worst_nll(m, a) < 1.0 and worst_nll(m, b) < 1.0  # both streams fitted
    assert worst_nll(only_a, b) > 2.5  # stream b is not learnt without it
    run = str(tmp_path / "run")
    short = tr.TrainConfig(steps=2, batch_size=8)
    tr.train(Bigram(32, nnx.Rngs(0)), a, short, progress=False, checkpoint_dir=run, streams=[tr.Stream(b, 4)])
    with pytest.raises(ValueError, match="'streams"):  # another stream batch size is another run
        tr.train(Bigram(32, nnx.Rngs(0)), a, short, progress=False, checkpoint_dir=run, streams=[tr.Stream(b, 2)])
    with pytest.raises(ValueError, match="stream 1: batch_size 13 is larger than its data"):
        tr.train(Bigram(32, nnx.Rngs(0)), a, short, progress=False, streams=[tr.Stream(b, 13)])
    with pytest.raises(KeyError, match="stream 1 lacks 'loss_mask'"):
        tr.train(Bigram(32, nnx.Rngs(0)), a, short, progress=False,
                 streams=[tr.Stream({k: v for k, v in b.items() if k != "loss_mask"}, 4)])
