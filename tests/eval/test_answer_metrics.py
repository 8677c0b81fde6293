import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.eval.metrics import answer_probability, answer_stats, exact_memorization, token_accuracy
from jaxunlearn.eval.runner import evaluate_encoded, fixed_batches


def _case():
    # one sequence of 4 tokens, vocab 3; answer = tokens 2 and 3.
    logits = np.log(np.array([[[0.2, 0.5, 0.3],     # predicts token 1 (x1 = 1)
                               [0.6, 0.3, 0.1],     # predicts x2 = 0 with p 0.6 (argmax 0: hit)
                               [0.1, 0.2, 0.7],     # predicts x3 = 1 with p 0.2 (argmax 2: miss)
                               [1 / 3, 1 / 3, 1 / 3]]]))
    ids = np.array([[2, 1, 0, 1]])
    loss_mask = np.array([[0, 0, 1, 1]], np.float32)
    return jnp.asarray(logits, jnp.float32), jnp.asarray(ids), jnp.asarray(loss_mask)


def test_probability_is_geometric_mean_of_answer_token_probs():
    logits, ids, lm = _case()
    np.testing.assert_allclose(answer_probability(logits, ids, lm), [np.sqrt(0.6 * 0.2)], rtol=1e-6)


def test_token_accuracy_hand_case_and_empty_mask():
    logits, ids, lm = _case()
    np.testing.assert_allclose(token_accuracy(logits, ids, lm), [0.5])
    fact = jnp.asarray([[0, 0, 1, 0]], jnp.float32)
    np.testing.assert_allclose(token_accuracy(logits, ids, fact), [1.0])
    np.testing.assert_allclose(token_accuracy(logits, ids, jnp.zeros_like(lm)), [0.0])
    out = answer_stats(logits, {"input_ids": ids, "loss_mask": lm, "fact_mask": fact})
    np.testing.assert_allclose(out["nll"], [-(np.log(0.6) + np.log(0.2)) / 2], rtol=1e-6)


def test_exact_memorization_leaves_out_the_last_masked_token():
    # loss_mask = answer token x2 + closing token x3: token_accuracy scores both (hit, miss) -> 0.5;
    # exact memorisation (open-unlearning) drops the last prediction -> 1.0; nothing left -> NaN
    logits, ids, lm = _case()
    np.testing.assert_allclose(exact_memorization(logits, ids, lm), [1.0])
    assert np.isnan(exact_memorization(logits, ids, jnp.asarray([[0, 0, 0, 1]], jnp.float32))).all()


def test_evaluate_encoded_matches_unbatched_with_ragged_last_batch():
    rng = np.random.default_rng(0)
    V, T, N = 7, 5, 11
    W = jnp.asarray(rng.normal(size=(V, V)), jnp.float32)
    apply = lambda p, ids, mask: p[ids]  # noqa: E731 - bigram "model"
    data = {"input_ids": rng.integers(0, V, size=(N, T)).astype(np.int32),
            "attention_mask": np.ones((N, T), np.int32),
            "loss_mask": (rng.random((N, T)) > 0.3).astype(np.float32)}
    got = evaluate_encoded(apply, W, data, batch_size=4)
    want = answer_stats(W[data["input_ids"]], {k: jnp.asarray(v) for k, v in data.items()})
    for k in want:
        assert got[k].shape == (N,)
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5)


def test_fixed_batches_static_shapes_and_empty():
    data = {"x": np.arange(5)}
    out = list(fixed_batches(data, 2))
    assert [b["x"].shape for b, _ in out] == [(2,)] * 3 and [n for _, n in out] == [2, 2, 1]
    with pytest.raises(ValueError, match="empty"):
        list(fixed_batches({"x": np.arange(0)}, 2))
