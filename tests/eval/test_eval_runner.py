"""score_split / evaluate_model / quantization_recovery: consistency with direct computations on a
bigram "model" and on a tiny random Decoder over a tiny generated benchmark, and bad input."""

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxunlearn.data import benchmark_texts, generate_benchmark, train_tokenizer
from jaxunlearn.eval.metrics import answer_probability
from jaxunlearn.eval.mia import mia_auc, zlib_length
from jaxunlearn.eval.quant_recovery import quantization_recovery
from jaxunlearn.eval.rouge import rouge_l_recall
from jaxunlearn.eval.runner import EvalSplit, encode_eval_splits, evaluate_model, score_split
from jaxunlearn.eval.tofu import harmonic_mean
from jaxunlearn.losses import mean_token_nll
from jaxunlearn.models import Decoder, ModelConfig
from jaxunlearn.quant import fake_quantize

# ----------------------------------------------------------------- score_split on a bigram model


def bigram(w, input_ids, attention_mask):
    """logits[b, t] = w[input_ids[b, t]]: next-token log-probs depend on the current token only."""
    return w[input_ids]


def _np_mean_nll(w, ids, mask):
    lp = w - np.log(np.exp(w).sum(-1, keepdims=True))
    tok = lp[ids[..., :-1], ids[..., 1:]]
    m = mask[..., 1:]
    return -(tok * m).sum(-1) / m.sum(-1)


def _qa(rng, shape, v, t):
    ids = rng.integers(0, v, size=shape + (t,)).astype(np.int32)
    mask = np.zeros(shape + (t,), np.float32)
    mask[..., 3:] = 1.0
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": mask}


def test_score_split_matches_numpy_on_bigram_model_ragged_batches():
    rng = np.random.default_rng(0)
    v, t, n, k = 7, 6, 5, 3
    w = rng.normal(size=(v, v)).astype(np.float32)
    split = EvalSplit(
        answer=_qa(rng, (n,), v, t),
        prompts={"input_ids": np.zeros((n, 3), np.int32), "attention_mask": np.ones((n, 3), np.int32)},
        answers=tuple(f"answer number {i} " * (i + 1) for i in range(n)),
        correct=_qa(rng, (n,), v, t),
        perturbed=_qa(rng, (n, k), v, t),
    )
    out = score_split(bigram, jnp.asarray(w), split, batch_size=2)
    w64 = w.astype(np.float64)
    nll = _np_mean_nll(w64, split.answer["input_ids"], split.answer["loss_mask"])
    nll_c = _np_mean_nll(w64, split.correct["input_ids"], split.correct["loss_mask"])
    nll_p = _np_mean_nll(w64, split.perturbed["input_ids"], split.perturbed["loss_mask"])
    np.testing.assert_allclose(out["probability"], np.exp(-nll), rtol=1e-5)
    np.testing.assert_allclose(out["mia_loss"], nll, rtol=1e-5)
    np.testing.assert_allclose(out["mia_zlib"], nll / zlib_length(split.answers), rtol=1e-5)
    np.testing.assert_allclose(out["correct_nll"], nll_c, rtol=1e-5)
    np.testing.assert_allclose(out["perturbed_probability"], np.exp(-nll_p), rtol=1e-5)
    np.testing.assert_allclose(out["truth_ratio"], np.exp(-nll_p.mean(1)) / (np.exp(-nll_c) + 1e-10), rtol=1e-5)
    p, pp = np.exp(-nll), np.exp(-nll_p)
    np.testing.assert_allclose(out["normalized_probability"], p / (p + pp.sum(1) + 1e-10), rtol=1e-5)
    for key in ("extraction_strength", "exact_memorization", "mia_min_k", "mia_min_k_plus_plus", "token_acc"):
        assert out[key].shape == (n,) and np.all(np.isfinite(out[key]))
    # a token id outside the model's vocabulary
    small = jnp.asarray(w[:, :4])
    with pytest.raises(ValueError, match="vocabulary size 4"):
        score_split(bigram, small, split)


def test_eval_split_rejects_bad_shapes():
    ok = {"input_ids": np.zeros((2, 4), np.int32)}
    with pytest.raises(ValueError, match="empty"):
        EvalSplit(answer=ok, prompts=ok, answers=())
    with pytest.raises(ValueError, match=r"answer\['input_ids'\] has 2 rows, expected 3"):
        EvalSplit(answer=ok, prompts=ok, answers=("a", "b", "c"))
    with pytest.raises(ValueError, match="both"):
        EvalSplit(answer=ok, prompts=ok, answers=("a", "b"), correct=ok)


# ----------------------------------------------------------------- evaluate_model on a tiny Decoder

ROLES = dict(forget="forget10", retain="retain90", general="general", holdout="holdout")


@pytest.fixture(scope="module")
def setup():
    dd = generate_benchmark(num_people=20, num_general=4, num_perturbed=3, seed=0,
                            attributes=("birthplace", "occupation", "genre"))
    dd = datasets.DatasetDict({k: dd[k] for k in ROLES.values()})
    dd["retain90"] = dd["retain90"].select(range(8))
    tok = train_tokenizer(benchmark_texts(dd), vocab_size=200)
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    result = evaluate_model(model, tok, dd, **ROLES, rouge_examples=3, max_new_tokens=6, batch_size=8)
    return dd, tok, model, result


@pytest.fixture(scope="module")
def encoded(setup):
    """The same splits pre-encoded (same padded length as ``setup``'s run: compilations are reused)."""
    dd, tok, _, _ = setup
    return encode_eval_splits(tok, dict(dd), roles={v: k for k, v in ROLES.items()})


@pytest.fixture(scope="module")
def forward(setup):
    """A jitted direct forward of the model: ``forward(ids, mask) -> logits``."""
    graphdef, state = nnx.split(setup[2])
    fn = jax.jit(lambda ids, mask: nnx.merge(graphdef, state)(ids, mask))
    return lambda ids, mask: fn(jnp.asarray(ids), jnp.asarray(mask))


def test_evaluate_model_shapes_ranges_and_direct_probability(setup, encoded, forward):
    dd, tok, model, res = setup
    assert res.roles == {v: k for k, v in ROLES.items()}
    for name, arrays in res.splits.items():
        n = len(dd[name])
        for key in ("probability", "nll", "token_acc", "extraction_strength", "exact_memorization", "mia_loss",
                    "mia_zlib",
                    "mia_min_k", "mia_min_k_plus_plus", "truth_ratio", "normalized_probability"):
            assert arrays[key].shape == (n,), (name, key)
            assert np.all(np.isfinite(arrays[key])), (name, key)
        assert arrays["perturbed_probability"].shape == (n, 3)
        assert np.all((arrays["probability"] > 0) & (arrays["probability"] <= 1))
        assert np.all((arrays["extraction_strength"] >= 0) & (arrays["extraction_strength"] <= 1))
        assert np.all((arrays["exact_memorization"] >= 0) & (arrays["exact_memorization"] <= 1))
        assert np.all(arrays["truth_ratio"] > 0)
        if name != "holdout":
            assert arrays["rouge_l_recall"].shape == (3,) and len(res.generations[name]) == 3
            assert np.all((arrays["rouge_l_recall"] >= 0) & (arrays["rouge_l_recall"] <= 1))
    assert "rouge_l_recall" not in res.splits["holdout"] and "holdout" not in res.generations
    # the probability equals a direct, unbatched forward of the model on the same encoding
    enc = encoded["forget10"]
    ids, am, lm = (jnp.asarray(enc.answer[k]) for k in ("input_ids", "attention_mask", "loss_mask"))
    want = answer_probability(forward(ids, am), ids, lm)
    np.testing.assert_allclose(res.splits["forget10"]["probability"], want, rtol=1e-5)
    # ... and so does the truth ratio, from direct forwards of paraphrased and perturbed answers
    c = enc.correct
    nll_c = mean_token_nll(forward(c["input_ids"], c["attention_mask"]),
                           jnp.asarray(c["input_ids"]), jnp.asarray(c["loss_mask"]))
    p = {k: jnp.asarray(v.reshape(-1, v.shape[-1])) for k, v in enc.perturbed.items() if v.ndim == 3}
    nll_p = mean_token_nll(forward(p["input_ids"], p["attention_mask"]), p["input_ids"], p["loss_mask"])
    nll_p = np.asarray(nll_p, np.float64).reshape(len(dd["forget10"]), 3)
    want_r = np.exp(-nll_p.mean(1)) / (np.exp(-np.asarray(nll_c, np.float64)) + 1e-10)
    np.testing.assert_allclose(res.splits["forget10"]["truth_ratio"], want_r, rtol=1e-4)


def test_evaluate_model_generation_is_naive_greedy_decoding(setup, forward):
    dd, tok, model, res = setup
    length = 32  # fixed right-padded buffer: causal logits at position i ignore everything after i
    for i in range(2):
        seq = [tok.bos_token_id, *tok(dd["forget10"][i]["question"], add_special_tokens=False)["input_ids"],
               tok.sep_token_id]
        start = len(seq)
        for _ in range(6):  # re-run the full forward on the growing sequence, argmax of the last logits
            buf = np.full((1, length), tok.pad_token_id, np.int32)
            buf[0, :len(seq)] = seq
            nxt = int(np.argmax(forward(buf, (buf != tok.pad_token_id).astype(np.int32))[0, len(seq) - 1]))
            if nxt == tok.eos_token_id:
                break
            seq.append(nxt)
        assert res.generations["forget10"][i] == tok.decode(seq[start:], skip_special_tokens=True).strip()
    np.testing.assert_allclose(res.splits["forget10"]["rouge_l_recall"],
                               rouge_l_recall(res.generations["forget10"], dd["forget10"]["answer"][:3]))


def test_evaluate_model_aggregates(setup, encoded):
    dd, tok, model, res = setup
    agg = res.aggregates
    assert agg["model_utility"] == pytest.approx(harmonic_mean(list(agg["utility_components"].values())))
    assert set(agg["utility_components"]) == {f"{s}/{m}" for s in ("retain90", "general")
                                              for m in ("probability", "rouge_l", "truth_ratio")}
    assert agg["utility_components"]["general/probability"] == pytest.approx(
        np.mean(res.splits["general"]["normalized_probability"]))
    f, h = res.splits["forget10"], res.splits["holdout"]
    assert agg["mia_auc"]["min_k"] == mia_auc(f["mia_min_k"], h["mia_min_k"])
    assert agg["forget"]["probability"] == pytest.approx(np.mean(f["probability"]))
    assert agg["forget"]["exact_memorization"] == pytest.approx(np.mean(f["exact_memorization"]))
    # against itself as the reference: identical truth-ratio distributions, zero privleak
    again = evaluate_model(model, tok, encoded, **ROLES, rouge_examples=0, batch_size=8, reference=res)
    assert again.aggregates["forget_quality"] == 1.0
    assert again.aggregates["privleak"] == pytest.approx({a: 0.0 for a in agg["mia_auc"]})
    assert "model_utility" not in again.aggregates and again.generations == {}  # no generation
    assert again.to_dict()["aggregates"]["forget_quality"] == 1.0


def test_evaluate_model_zero_params_give_uniform_probability(setup, encoded):
    dd, tok, model, _ = setup
    params = nnx.split(model, nnx.Param, ...)[1]
    zero = jax.tree.map(jnp.zeros_like, params)  # all-zero weights: logits 0, p = 1 / V everywhere
    res = evaluate_model(model, tok, encoded, forget="forget10", params=zero, rouge_examples=0, batch_size=8)
    v = model.config.vocab_size
    f = res.splits["forget10"]
    np.testing.assert_allclose(f["probability"], 1.0 / v, rtol=1e-5)
    np.testing.assert_allclose(f["mia_min_k"], np.log(v), rtol=1e-5)
    np.testing.assert_allclose(f["truth_ratio"], 1.0, rtol=1e-5)


def test_encoded_splits_and_missing_paraphrase(setup, encoded):
    dd, tok, model, res = setup
    enc = encoded
    assert len({s.answer["input_ids"].shape[-1] for s in enc.values()}) == 1  # one padded length
    again = evaluate_model(model, tok, enc, **ROLES, rouge_examples=3, max_new_tokens=6, batch_size=8)
    for name in res.splits:
        for key, v in res.splits[name].items():
            np.testing.assert_allclose(again.splits[name][key], v, rtol=1e-6, err_msg=f"{name}/{key}")
    # a general set without paraphrases uses the answer itself as the truth ratio's correct answer
    general = dd["general"].remove_columns("paraphrased_answer")
    out = evaluate_model(model, tok, {"general": general}, general="general", rouge_examples=0, batch_size=8)
    np.testing.assert_allclose(out.splits["general"]["correct_nll"], out.splits["general"]["nll"], rtol=1e-6)


def test_quantization_recovery_matches_direct_evaluation(setup, encoded):
    dd, tok, model, _ = setup
    dd = encoded  # pre-encoded: the compilations of the fixture's run are reused
    kw = dict(forget="forget10", holdout="holdout", rouge_examples=2, max_new_tokens=6, batch_size=8)
    rec = quantization_recovery(model, tok, dd, schemes=("int8", "int4", "nf4"), **kw)
    params = nnx.split(model, nnx.Param, ...)[1]
    q4 = evaluate_model(model, tok, dd, params=fake_quantize(params, "int4"), **kw)
    assert rec["int4"]["metrics"]["probability"] == pytest.approx(q4.aggregates["forget"]["probability"], rel=1e-6)
    assert rec["int4"]["metrics"]["mia_auc/loss"] == q4.aggregates["mia_auc"]["loss"]
    assert {"extraction_strength", "exact_memorization"} <= set(rec["int4"]["recovery"])
    for s in ("int8", "int4", "nf4"):
        for m, r in rec[s]["recovery"].items():
            assert r == pytest.approx(rec[s]["metrics"][m] - rec["baseline"][m])
    assert rec["int8"]["metrics"] != rec["baseline"]  # quantisation did change the model
    with pytest.raises(ValueError, match="unknown quantisation scheme"):
        quantization_recovery(model, tok, dd, schemes=("int3",), **kw)


def test_answer_only_splits_give_every_answer_metric_and_name_the_rest(setup):
    """Splits with only question/answer: the answer metrics equal the full-schema run's, the truth-ratio
    family, forget quality and model utility are absent and named with the column they need."""
    dd, tok, model, full = setup
    qa = {k: dd[k].select_columns(["question", "answer"]) for k in dd}
    kw = dict(**ROLES, rouge_examples=3, max_new_tokens=6, batch_size=8)
    ref = evaluate_model(model, tok, qa, **kw)
    res = evaluate_model(model, tok, qa, reference=ref, **kw)
    for name in qa:
        for key in ("probability", "nll", "token_acc", "extraction_strength", "exact_memorization", "mia_loss",
                    "mia_min_k"):
            assert res.splits[name][key].shape == (len(qa[name]),), (name, key)
        assert "truth_ratio" not in res.splits[name] and "normalized_probability" not in res.splits[name]
    # one padded length is set by the longest encoded row: perturbed answers are longer, so compare the
    # per-example probability (padding-invariant) with the full run
    np.testing.assert_allclose(res.splits["forget10"]["probability"], full.splits["forget10"]["probability"],
                               rtol=1e-4)
    assert res.splits["forget10"]["rouge_l_recall"].shape == (3,)
    assert "mia_auc" in res.aggregates and "privleak" in res.aggregates
    assert "forget_quality" not in res.aggregates and "model_utility" not in res.aggregates
    na = res.not_available
    assert na["forget_quality"] == "needs columns paraphrased_answer, perturbed_answer in split 'forget10'"
    assert "perturbed_answer in split 'general'" in na["model_utility"]
    assert na["forget10/truth_ratio"] == "needs columns paraphrased_answer, perturbed_answer"
    assert na["general/normalized_probability"] == "needs column perturbed_answer"
    assert na["forget10/paraphrased_rouge_l_recall"] == "needs column paraphrased_answer"
    assert res.to_dict()["not_available"] == na
    assert full.not_available == {}
    # a forget split with the paraphrase but no perturbed answers: its paraphrased ROUGE still comes
    no_pert = dd["forget10"].remove_columns("perturbed_answer")
    part = evaluate_model(model, tok, {"forget10": no_pert}, forget="forget10", rouge_examples=2, max_new_tokens=4)
    assert "paraphrased_rouge_l_recall" in part.splits["forget10"]
    assert set(part.not_available) == {"forget10/truth_ratio", "forget10/normalized_probability",
                                       "forget10/correct_probability", "forget10/perturbed_probability",
                                       "forget10/perturbed_rouge_l_recall"}


def test_bad_inputs(setup):
    dd, tok, model, _ = setup
    no_answer = dd["forget10"].remove_columns("answer")
    with pytest.raises(KeyError, match=r"'forget10' \(role 'forget'\) is missing column\(s\) \['answer'\]"):
        evaluate_model(model, tok, {"forget10": no_answer}, forget="forget10")
    small = Decoder(model.config.replace(vocab_size=len(tok) - 10), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="vocab_size"):
        evaluate_model(small, tok, dd, forget="forget10")
    with pytest.raises(ValueError, match="'holdout' is empty"):
        evaluate_model(model, tok, {"holdout": dd["holdout"].select([])}, holdout="holdout")
    with pytest.raises(KeyError, match=r"\['retain99'\] not in the data"):
        evaluate_model(model, tok, dd, forget="forget10", retain="retain99")
    with pytest.raises(ValueError, match="two roles"):
        evaluate_model(model, tok, dd, forget="forget10", retain="forget10")
    with pytest.raises(ValueError, match="at least one split"):
        evaluate_model(model, tok, dd)
    with pytest.raises(TypeError, match="Decoder"):
        evaluate_model(bigram, tok, dd, forget="forget10")
