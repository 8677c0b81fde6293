"""IdkNLL and IdkDPO: refusal answers as the preferred completion (TOFU's IDK objectives).

References written independently of the library: a numpy port of open-unlearning's
``compute_dpo_loss`` / ``compute_batch_nll`` (``src/trainer/utils.py``: Hugging Face labels, -100
off the answer, cross-entropy summed per sequence), per-example gradients of per-position loops,
and the refusal pairing checked row by row.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxunlearn.data.refusal import (REFUSALS, RefusalSet, encode_refusals, exact_phrases, refusal_answers,
                                     with_refusals)
from jaxunlearn.losses import ALT_KEYS, dpo, npo
from jaxunlearn.methods import UnlearnContext, run_method
from jaxunlearn.train import batch_at
from jaxunlearn.unlearn import UnlearnConfig
from jaxunlearn.unlearn_step import Reference, forget_loss_fn, forget_references, reference_logp, unlearner
from toy_lm import bigram_apply as apply
from toy_lm import bigram_params, lm_batch

V, T = 11, 6
SGD = dict(optimizer="sgd", learning_rate=0.1, grad_clip=0.0, steps=1)


def _params(seed=0):
    return bigram_params(V, 5, seed=seed, bias=True)


def _pref_batch(n, seed):
    """Forget rows and alternate rows sharing each row's 2-token prompt, ragged answers."""
    b = lm_batch(n, seed, vocab=V, seq=T, prompt=2)
    alt = lm_batch(n, seed + 100, vocab=V, seq=T, prompt=2)
    alt["input_ids"][:, :2] = b["input_ids"][:, :2]
    for i in range(n):
        b["loss_mask"][i, : 2 + i % 3] = 0
        alt["loss_mask"][i, T - 1 - i % 2:] = 0      # shorter refusals, padded
        alt["attention_mask"][i, T - 1 - i % 2:] = 0
    out = {**b, **{"alt_" + k: v for k, v in alt.items()}}
    return jax.tree.map(jnp.asarray, out)


# ------------------------------------------------ the reference: open-unlearning's code, in numpy


def _hf_labels(ids, loss_mask):
    return np.where(np.asarray(loss_mask) > 0, np.asarray(ids), -100)


def _batch_nll_np(params, ids, attention_mask, loss_mask):
    """compute_batch_nll: logits[..., :-1] vs labels[..., 1:], CE(ignore_index=-100) summed per sequence."""
    logits = np.asarray(apply(params, jnp.asarray(ids)), np.float64)
    labels = _hf_labels(ids, loss_mask)
    out = []
    for b in range(ids.shape[0]):
        total = 0.0
        for t in range(ids.shape[1] - 1):
            y = labels[b, t + 1]
            if y == -100:
                continue
            z = logits[b, t]
            total += np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[y]
        out.append(total)
    return np.array(out)


def _logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def _dpo_np(params, ref, batch, beta):
    """compute_dpo_loss(model, ref_model, win_inputs=alternate, lose_inputs=forget, beta)."""
    def nll(p, prefix):
        return _batch_nll_np(p, *(np.asarray(batch[prefix + k]) for k in ("input_ids", "attention_mask",
                                                                          "loss_mask")))
    win_log_ratio = -(nll(params, "alt_") - nll(ref, "alt_"))
    lose_log_ratio = -(nll(params, "") - nll(ref, ""))
    return -2 / beta * _logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()


def _seq_logp(p, ids, mask):
    """log p(answer) of one row, by a loop over positions (jax, for gradients)."""
    lp = jax.nn.log_softmax(apply(p, ids), axis=-1)
    return sum(lp[t - 1, ids[t]] * mask[t] for t in range(1, ids.shape[0]))


def _token_nll_loop(p, ids, mask):
    """Every scored token of the batch pooled (Hugging Face's model(**batch).loss)."""
    total, count = 0.0, 0.0
    for b in range(ids.shape[0]):
        total -= _seq_logp(p, ids[b], mask[b])
        count += float(np.sum(np.asarray(mask[b])[1:]))
    return total / count


# ------------------------------------------------ the losses


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_idk_dpo_loss_is_open_unlearnings_compute_dpo_loss(beta):
    p, ref, fb = _params(0), _params(3), _pref_batch(5, 1)
    u = UnlearnConfig(method="idk_dpo", beta=beta, alpha=0.0, **SGD).build(apply)
    _, m = u.step(u.init(p), fb, None, ref)
    want = _dpo_np(p, ref, fb, beta)
    assert abs(want - 2 / beta * np.log(2)) > 1e-2          # theta != ref: not the trivial value
    np.testing.assert_allclose(float(m["forget_loss"]), want, rtol=1e-5)
    # the loss of losses.dpo on the summed log-likelihoods, and NPO as its rejected-only case
    lw, ll = jnp.asarray([0.3, -1.0]), jnp.asarray([-2.0, 0.5])
    rw, rl = jnp.asarray([0.1, -0.4]), jnp.asarray([-1.0, 0.7])
    z = (lw - rw) - (ll - rl)
    np.testing.assert_allclose(float(dpo(lw, rw, ll, rl, beta=beta)),
                               -2 / beta * np.mean(_logsigmoid(beta * np.asarray(z))), rtol=1e-6)
    np.testing.assert_allclose(float(dpo(rw, rw, ll, rl, beta=beta)), float(npo(ll, rl, beta=beta)), rtol=1e-6)


def test_idk_dpo_reference_is_read_by_the_shared_mechanism():
    refs = forget_references(apply, "idk_dpo")
    assert [(r.split, r.key) for r in refs] == [("forget", "ref_logp"), ("forget", "ref_alt_logp")]
    assert [r.key for r in forget_references(apply, "npo")] == ["ref_logp"]
    assert forget_references(apply, "idk_nll") == ()
    p, fb = _params(), _pref_batch(3, 2)
    got = refs[1].fn(p, fb)
    want = -_batch_nll_np(p, *(np.asarray(fb["alt_" + k]) for k in ("input_ids", "attention_mask", "loss_mask")))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    u = UnlearnConfig(method="idk_dpo").build(apply)
    assert u.needs_reference and set(ALT_KEYS) <= set(u.forget_keys)
    with pytest.raises(ValueError, match="forget loss reads ref_logp and the forget loss reads ref_alt_logp"):
        u.step(u.init(p), fb, fb)


def test_idk_dpo_sgd_step_matches_hand_gradients():
    """dL/dtheta = -(2 / B) sum_n sigmoid(-beta z_n) (grad log p(w_n) - grad log p(l_n)), z_n the
    margin; plus alpha times the pooled retain NLL gradient; one SGD step."""
    p, ref, fb = _params(0), _params(4), _pref_batch(4, 5)
    rb = jax.tree.map(jnp.asarray, lm_batch(6, 7, vocab=V, seq=T, prompt=3))
    beta, gamma, alpha, lr = 0.5, 0.7, 2.0, 0.1
    cfg = UnlearnConfig(method="idk_dpo", beta=beta, gamma=gamma, alpha=alpha, **SGD)
    u = cfg.build(apply)
    state, m = u.step(u.init(p), fb, rb, ref)
    g = jax.tree.map(jnp.zeros_like, p)
    n = fb["input_ids"].shape[0]
    for i in range(n):
        w = (fb["alt_input_ids"][i], fb["alt_loss_mask"][i])
        lo = (fb["input_ids"][i], fb["loss_mask"][i])
        z = (_seq_logp(p, *w) - _seq_logp(ref, *w)) - (_seq_logp(p, *lo) - _seq_logp(ref, *lo))
        s = float(jax.nn.sigmoid(-beta * z))
        gw, gl = jax.grad(_seq_logp)(p, *w), jax.grad(_seq_logp)(p, *lo)
        g = jax.tree.map(lambda a, x, y: a - 2.0 / n * s * (x - y), g, gw, gl)
    gr = jax.grad(_token_nll_loop)(p, rb["input_ids"], rb["loss_mask"])
    want = jax.tree.map(lambda x, a, b: x - lr * (gamma * a + alpha * b), p, g, gr)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), state.params, want)
    np.testing.assert_allclose(float(m["retain_loss"]), float(_token_nll_loop(p, rb["input_ids"], rb["loss_mask"])),
                               rtol=1e-5)


def test_idk_nll_step_is_nll_descent_on_the_refusals():
    p, fb = _params(1), _pref_batch(5, 3)
    u = UnlearnConfig(method="idk_nll", alpha=0.0, **SGD).build(apply)
    assert not u.needs_reference and not u.uses_retain
    state, m = u.step(u.init(p), fb)
    nll = lambda q: _token_nll_loop(q, fb["alt_input_ids"], fb["alt_loss_mask"])  # noqa: E731
    g = jax.grad(nll)(p)
    jax.tree.map(lambda a, b, c: np.testing.assert_allclose(a, b - 0.1 * c, rtol=1e-5, atol=1e-6), state.params, p, g)
    np.testing.assert_allclose(float(m["forget_loss"]), float(nll(p)), rtol=1e-5)
    # the forget answers do not enter: changing them changes nothing
    other = {**fb, "input_ids": (fb["input_ids"] + 1) % V}
    state2, _ = u.step(u.init(p), other)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state.params, state2.params)


@pytest.mark.parametrize("method", ["idk_nll", "idk_dpo"])
def test_a_short_run_raises_the_refusals_likelihood(method):
    p, fb = _params(2), _pref_batch(8, 11)
    rb = jax.tree.map(jnp.asarray, lm_batch(8, 12, vocab=V, seq=T, prompt=2))
    u = UnlearnConfig(method=method, learning_rate=0.05, steps=15).build(apply)
    state = u.init(p)
    for _ in range(15):
        state, _ = u.step(state, fb, rb, p)

    def logp(q, prefix):
        return sum(float(_seq_logp(q, fb[prefix + "input_ids"][i], fb[prefix + "loss_mask"][i])) for i in range(8))

    assert logp(state.params, "alt_") > logp(p, "alt_") + 1.0
    if method == "idk_dpo":  # the preference margin grows: the forget answers lose likelihood relative to it
        assert logp(state.params, "alt_") - logp(state.params, "") > logp(p, "alt_") - logp(p, "") + 2.0


def test_idk_methods_name_the_missing_refusal_answers():
    p, fb = _params(), _pref_batch(3, 1)
    plain = {k: fb[k] for k in ("input_ids", "attention_mask", "loss_mask")}
    for method in ("idk_nll", "idk_dpo"):
        u = UnlearnConfig(method=method, alpha=0.0).build(apply)
        with pytest.raises(KeyError, match="forget batch lacks 'alt_input_ids'.*with_refusals"):
            u.step(u.init(p), plain, None, p)
        with pytest.raises(KeyError, match="alt_input_ids"):
            forget_loss_fn(apply, method)(p, {**plain, "ref_logp": jnp.zeros(3)})
    ctx = UnlearnContext(apply, p, jax.tree.map(np.asarray, plain), jax.tree.map(np.asarray, plain))
    cfg = {"kind": "gradient", "batch_size": 2, "unlearn": {"method": "idk_dpo", "steps": 1}}
    with pytest.raises(KeyError, match="method 'idk_dpo' reads the forget set's 'alt_input_ids'"):
        run_method(ctx, cfg)
    with pytest.raises(ValueError, match="shape"):
        dpo(jnp.zeros(2), jnp.zeros(2), jnp.zeros(3), jnp.zeros(3))


def test_reference_declarations_are_checked():
    p, fb = _params(), _pref_batch(3, 1)
    loss = forget_loss_fn(apply, "ga")
    with pytest.raises(ValueError, match="two references \\(or a reference and forget_keys\\) store 'ref_logp'"):
        unlearner(loss, optax.sgd(0.1), apply_fn=apply, forget_ref_logp=True, references=(reference_logp(apply),))
    with pytest.raises(ValueError, match="reference 'x' of the retain batch needs a retain_loss"):
        unlearner(loss, optax.sgd(0.1), references=(Reference("retain", "x", lambda q, b: b["input_ids"]),))
    with pytest.raises(ValueError, match="references\\[0\\].key must be a new batch key"):
        unlearner(loss, optax.sgd(0.1), references=(Reference("forget", "loss_mask", lambda q, b: 0.0),))
    with pytest.raises(ValueError, match="forget_keys must include"):
        unlearner(loss, optax.sgd(0.1), forget_keys=("input_ids",))
    # a declared reference output reaches the loss, without gradient, from ref_params
    seen = {}

    def custom(q, b):
        seen["shape"] = b["ref_sum"].shape
        return -jnp.mean(b["ref_sum"] * jnp.sum(apply(q, b["input_ids"]), axis=(1, 2)))

    u = unlearner(custom, optax.sgd(0.1), references=(Reference("forget", "ref_sum", lambda q, b: jnp.sum(
        apply(q, b["input_ids"]), axis=(1, 2))),))
    assert u.needs_reference
    state, m = u.step(u.init(p), fb, None, _params(5))
    ref_sum = jnp.sum(apply(_params(5), fb["input_ids"]), axis=(1, 2))
    np.testing.assert_allclose(float(m["forget_loss"]), float(custom(p, {**fb, "ref_sum": ref_sum})), rtol=1e-5)


# ------------------------------------------------ the refusal set


def test_refusal_answers_are_seeded_and_fit_their_rows():
    a, b = refusal_answers(50, seed=3), refusal_answers(50, seed=3)
    assert a == b and a != refusal_answers(50, seed=4) and set(a) <= set(REFUSALS)
    assert len(set(refusal_answers(2000, seed=0))) == len(REFUSALS)     # every phrasing is drawn
    phrases, lengths = ["a b c d.", "a.", "a b."], [4, 1, 2]
    room = np.array([1, 2, 4, 3, 1, 2] * 20)
    got = refusal_answers(len(room), seed=1, phrases=phrases, lengths=lengths, room=room)
    for g, r in zip(got, room):
        assert lengths[phrases.index(g)] <= r
    assert {g for g, r in zip(got, room) if r == 4} == set(phrases)
    with pytest.raises(ValueError, match="row 0 has room for 0 answer tokens"):
        refusal_answers(1, phrases=phrases, lengths=lengths, room=[0])
    with pytest.raises(ValueError, match="phrases\\[1\\] must be a non-empty string"):
        RefusalSet(("ok", " "))


def test_batch_at_returns_the_same_rows_for_any_keys():
    data = {**lm_batch(10, 0, vocab=V, seq=T, prompt=2),
            **{"alt_" + k: v for k, v in lm_batch(10, 1, vocab=V, seq=T, prompt=2).items()}}
    data["alt_input_ids"] = data["input_ids"] * 100 + np.arange(T)   # a function of the row
    for step in (0, 3, 7):
        b = batch_at(data, 4, step, seed=5, keys=("input_ids", "alt_input_ids"))
        np.testing.assert_array_equal(b["alt_input_ids"], b["input_ids"] * 100 + np.arange(T))
        assert set(batch_at(data, 4, step, seed=5)) == {"input_ids", "attention_mask", "loss_mask"}


def test_the_benchmark_forget_set_pairs_every_row_with_a_refusal():
    """The demo tokenizer reproduces every phrasing (it is not trained on them); every forget row
    (QA, KnowMem, passage window) gets an alternate row with its own prompt and a refusal answer."""
    from jaxunlearn.pipeline import DemoConfig, prepare_data, unlearning_sets

    data = prepare_data(DemoConfig())
    tok = data.tokenizer
    assert exact_phrases(tok) == REFUSALS and data.refusals.phrases == REFUSALS
    for p in REFUSALS:
        assert tok.decode(tok.encode(p, add_special_tokens=False)) == p
    forget, retain = unlearning_sets(data)
    assert not any(k.startswith("alt_") for k in retain)
    n = len(forget["input_ids"])
    assert forget["alt_input_ids"].shape == forget["input_ids"].shape and n > 200
    kinds = set()
    for i in range(n):
        p = int(np.argmax(forget["loss_mask"][i] > 0))
        assert int(np.argmax(forget["alt_loss_mask"][i] > 0)) == p
        np.testing.assert_array_equal(forget["alt_input_ids"][i, :p], forget["input_ids"][i, :p])
        length = int(forget["alt_attention_mask"][i].sum())
        answer = forget["alt_input_ids"][i, p:length]
        assert answer[-1] == tok.eos_token_id and forget["alt_loss_mask"][i, p:length].all()
        assert tok.decode(answer[:-1]) in REFUSALS
        kinds.add(p == 1)
    assert kinds == {True, False}            # passage windows (prompt = BOS) and question rows
    again, _ = unlearning_sets(data)
    np.testing.assert_array_equal(again["alt_input_ids"], forget["alt_input_ids"])   # seeded
    data.refusals = None                      # no refusal set: no alternate rows
    assert not any(k.startswith("alt_") for k in unlearning_sets(data)[0])


def test_encode_refusals_and_with_refusals_check_alignment():
    def enc(q, a):
        return {"input_ids": np.zeros((len(q), 4), np.int32), "attention_mask": np.ones((len(q), 4), np.int32),
                "loss_mask": np.ones((len(q), 4), np.float32)}

    alt = encode_refusals(enc, ["q1", "q2"], ["No.", "No."])
    assert sorted(alt) == sorted(ALT_KEYS)
    forget = enc(["a", "b"], None)
    assert sorted(with_refusals(forget, alt)) == sorted(list(forget) + list(ALT_KEYS))
    with pytest.raises(ValueError, match="alt\\['alt_input_ids'\\] has shape"):
        with_refusals(enc(["a", "b", "c"], None), alt)
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        encode_refusals(enc, ["q1", "q2"], ["No."])
