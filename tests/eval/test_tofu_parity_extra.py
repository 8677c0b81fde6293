"""The forget summary's paraphrased / perturbed probability and ROUGE, ROUGE-L F1 and the
generation budget, against a port of open-unlearning (github.com/locuslab/open-unlearning,
commit d3d7cf9e6b3c125d16687d4232680d8d83548f1a):

- ``configs/eval/tofu_metrics/forget_Q_A_{PARA,PERT}_{Prob,ROUGE}.yaml``: the ``probability``
  and ``rouge`` handlers (``rouge_type: rougeL_recall``) on the forget split with
  ``answer_key`` ``paraphrased_answer`` / ``perturbed_answer`` (a list: one item per answer);
- ``src/evals/metrics/memorization.py``: ``probability`` and ``rouge`` (values by index, then
  ``aggregate_to_1D`` and ``np.mean``);
- ``src/evals/metrics/utils.py``: ``run_batchwise_evals`` (a list answer gives
  ``{intra_item_idx: {index: stats}}``, then ``dict_transpose``), ``aggregate_to_1D``,
  ``evaluate_probability``, ``eval_text_similarity.eval_rouge_recall_batch`` (``rouge_score``);
- ``configs/generation/default.yaml``: ``max_new_tokens: 200``.

The reference's ROUGE generates once per perturbed answer from the same question (greedy: the
same text), so one generation scored against every target is the same computation.
"""

import inspect

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from rouge_score import rouge_scorer

from jaxunlearn.data import benchmark_texts, encode_split, generate_benchmark, train_tokenizer
from jaxunlearn.eval import FORGET_SUMMARY_KEYS, encode_eval_splits, evaluate_model, forget_summary
from jaxunlearn.models import Decoder, ModelConfig
from jaxunlearn.train import TrainConfig, train

IGNORE_INDEX = -100


# ------------------------------------------------------------------ the reference, ported
def ref_dict_transpose(evals):
    all_iidxs = list(evals.keys())
    all_idxs = list(evals[all_iidxs[0]].keys())
    all_stat_names = list(evals[all_iidxs[0]][all_idxs[0]].keys())
    return {idx: {stat: [evals[iidx][idx][stat] for iidx in all_iidxs] for stat in all_stat_names}
            for idx in all_idxs}


def ref_aggregate_to_1D(x):
    return np.mean(x, axis=tuple(range(1, x.ndim)))


def ref_run_batchwise_evals(per_answer):
    """``run_batchwise_evals`` on precomputed batch outputs: ``per_answer`` is a list (one entry
    per answer of an item; a single entry for a string answer) of ``[stats of example n]``."""
    evals = {str(k): dict(enumerate(stats)) for k, stats in enumerate(per_answer)}
    if len(evals) == 1:
        return next(iter(evals.values()))
    return ref_dict_transpose(evals)


def ref_probability_handler(scores_by_index):
    prob_values = np.array([e["prob"] for e in scores_by_index.values() if e["prob"] is not None])
    return np.mean(ref_aggregate_to_1D(prob_values))


def ref_rouge_handler(scores_by_index, rouge_type="rougeL_recall"):
    rouge_values = np.array([e[rouge_type] for e in scores_by_index.values() if e[rouge_type] is not None])
    return np.mean(ref_aggregate_to_1D(rouge_values))


def ref_eval_rouge_recall_batch(gen_outputs, ground_truths):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    evals = []
    for gen, gt in zip(gen_outputs, ground_truths):
        s = scorer.score(gt, gen)
        evals.append({"rouge1_recall": s["rouge1"].recall, "rougeL_f1": s["rougeL"].fmeasure,
                      "rougeL_recall": s["rougeL"].recall})
    return evals


def ref_evaluate_probability(logits, labels):
    """``evaluate_probability``: avg_loss = CE summed over labels[1:] / #labels; prob = exp(-avg)."""
    x = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
    lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    shifted = labels[:, 1:]
    out = []
    for i in range(len(labels)):
        keep = shifted[i] != IGNORE_INDEX
        avg = -lp[i, np.arange(shifted.shape[1])[keep], shifted[i][keep]].sum() / (labels[i] != IGNORE_INDEX).sum()
        out.append({"prob": float(np.exp(-avg)), "avg_loss": float(avg)})
    return out


# ------------------------------------------------------------------ aggregation on crafted values
WORDS = "Kalo Venn was born in Greyhollow writes epic poems novels the city of Dunmere crime".split()


def test_forget_summary_aggregates_like_open_unlearning_handlers():
    rng = np.random.default_rng(0)
    n, k = 9, 4
    loss = {name: rng.uniform(0.1, 4.0, shape) for name, shape in
            (("answer", (n,)), ("para", (n,)), ("pert", (n, k)))}
    text = lambda: " ".join(rng.choice(WORDS, size=rng.integers(1, 9)))  # noqa: E731
    gens, answers, paras = [text() for _ in range(n)], [text() for _ in range(n)], [text() for _ in range(n)]
    perts = [[text() for _ in range(k)] for _ in range(n)]

    def stats(avg):
        return [{"prob": float(np.exp(-a)), "avg_loss": float(a)} for a in avg]

    want = {
        "probability": ref_probability_handler(ref_run_batchwise_evals([stats(loss["answer"])])),
        "paraphrased_probability": ref_probability_handler(ref_run_batchwise_evals([stats(loss["para"])])),
        "perturbed_probability": ref_probability_handler(
            ref_run_batchwise_evals([stats(loss["pert"][:, j]) for j in range(k)])),
        "rouge_l": ref_rouge_handler(ref_run_batchwise_evals([ref_eval_rouge_recall_batch(gens, answers)])),
        "rouge_l_f1": ref_rouge_handler(ref_run_batchwise_evals([ref_eval_rouge_recall_batch(gens, answers)]),
                                        "rougeL_f1"),
        "paraphrased_rouge_l": ref_rouge_handler(ref_run_batchwise_evals([ref_eval_rouge_recall_batch(gens, paras)])),
        "perturbed_rouge_l": ref_rouge_handler(ref_run_batchwise_evals(
            [ref_eval_rouge_recall_batch(gens, [p[j] for p in perts]) for j in range(k)])),
    }
    from jaxunlearn.eval import rouge_l_f1, rouge_l_recall

    split = {
        "probability": np.exp(-loss["answer"]),
        "correct_probability": np.exp(-loss["para"]),
        "perturbed_probability": np.exp(-loss["pert"]),
        "rouge_l_recall": rouge_l_recall(gens, answers),
        "rouge_l_f1": rouge_l_f1(gens, answers),
        "paraphrased_rouge_l_recall": rouge_l_recall(gens, paras),
        "perturbed_rouge_l_recall": np.stack([rouge_l_recall(gens, [p[j] for p in perts]) for j in range(k)], 1),
    }
    got = forget_summary(split)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
        assert FORGET_SUMMARY_KEYS[key][0] in split
    assert 0 < got["perturbed_rouge_l"] < 1 and 0 < got["paraphrased_rouge_l"] < 1  # crafted: not trivial


def test_forget_summary_names_a_bad_array():
    with pytest.raises(ValueError, match="perturbed_rouge_l_recall"):
        forget_summary({"perturbed_rouge_l_recall": np.zeros((0, 3))})
    with pytest.raises(ValueError, match="NaN"):
        forget_summary({"perturbed_probability": np.array([[0.1, np.nan]])})


# ------------------------------------------------------------------ end to end through evaluate_model
# (a model trained for a few steps: the slow tier, as the other evaluate_model tests)
@pytest.fixture(scope="module")
def setup():
    dd = generate_benchmark(num_people=20, num_general=2, num_perturbed=3, seed=1,
                            attributes=("birthplace", "occupation", "genre"))
    dd = datasets.DatasetDict({"forget10": dd["forget10"], "holdout": dd["holdout"]})
    tok = train_tokenizer(benchmark_texts(dd), vocab_size=160)
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    untrained = Decoder(cfg, rngs=nnx.Rngs(3))
    # a few steps on the forget split: the greedy answers then share words with every target
    model, _ = train(Decoder(cfg, rngs=nnx.Rngs(3)), encode_split(tok, dd["forget10"], max_length=None),
                     TrainConfig(steps=60, batch_size=6, learning_rate=1e-2, warmup_steps=5), progress=False)
    res = evaluate_model(model, tok, dd, forget="forget10", rouge_examples=None, max_new_tokens=24, batch_size=8)
    return dd, tok, model, res, untrained


@pytest.mark.slow
def test_forget_rouge_matches_open_unlearning(setup):
    dd, _, _, res, _ = setup
    ds, f = dd["forget10"], res.splits["forget10"]
    gens = res.generations["forget10"]
    assert len(gens) == len(ds)
    by_answer = ref_run_batchwise_evals([ref_eval_rouge_recall_batch(gens, ds["answer"])])
    by_para = ref_run_batchwise_evals([ref_eval_rouge_recall_batch(gens, ds["paraphrased_answer"])])
    k = len(ds[0]["perturbed_answer"])
    by_pert = ref_run_batchwise_evals([ref_eval_rouge_recall_batch(gens, [p[j] for p in ds["perturbed_answer"]])
                                       for j in range(k)])
    np.testing.assert_allclose(f["rouge_l_recall"], [by_answer[i]["rougeL_recall"] for i in range(len(ds))])
    np.testing.assert_allclose(f["rouge_l_f1"], [by_answer[i]["rougeL_f1"] for i in range(len(ds))])
    np.testing.assert_allclose(f["paraphrased_rouge_l_recall"], [by_para[i]["rougeL_recall"] for i in range(len(ds))])
    assert f["perturbed_rouge_l_recall"].shape == (len(ds), k)
    np.testing.assert_allclose(f["perturbed_rouge_l_recall"], [by_pert[i]["rougeL_recall"] for i in range(len(ds))])
    agg = res.aggregates["forget"]
    assert agg["rouge_l"] == pytest.approx(ref_rouge_handler(by_answer))
    assert agg["rouge_l_f1"] == pytest.approx(ref_rouge_handler(by_answer, "rougeL_f1"))
    assert agg["paraphrased_rouge_l"] == pytest.approx(ref_rouge_handler(by_para))
    assert agg["perturbed_rouge_l"] == pytest.approx(ref_rouge_handler(by_pert))
    for key in ("paraphrased_rouge_l_recall", "perturbed_rouge_l_recall"):
        assert 0 < f[key].mean() < 1, key  # not trivial
    assert len(np.unique(f["perturbed_rouge_l_recall"])) > 1


@pytest.mark.slow
def test_forget_paraphrased_and_perturbed_probability_match_open_unlearning(setup):
    dd, tok, model, res, _ = setup
    enc = encode_eval_splits(tok, dict(dd), roles={"forget10": "forget", "holdout": "holdout"})["forget10"]
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda ids, mask: nnx.merge(graphdef, state)(ids, mask))

    def stats(arrays):
        ids, mask, lm = (np.asarray(arrays[key]) for key in ("input_ids", "attention_mask", "loss_mask"))
        logits = np.asarray(forward(jnp.asarray(ids), jnp.asarray(mask)), np.float64)
        return ref_evaluate_probability(logits, np.where(lm > 0, ids, IGNORE_INDEX))

    k = enc.perturbed["input_ids"].shape[1]
    para = ref_run_batchwise_evals([stats(enc.correct)])
    pert = ref_run_batchwise_evals([stats({key: v[:, j] for key, v in enc.perturbed.items() if v.ndim == 3})
                                    for j in range(k)])
    agg = res.aggregates["forget"]
    assert agg["paraphrased_probability"] == pytest.approx(ref_probability_handler(para), rel=1e-5)
    assert agg["perturbed_probability"] == pytest.approx(ref_probability_handler(pert), rel=1e-5)
    np.testing.assert_allclose(res.splits["forget10"]["perturbed_probability"],
                               [pert[i]["prob"] for i in range(len(pert))], rtol=1e-5)


@pytest.mark.slow
def test_generation_budget_defaults_to_open_unlearning_200(setup):
    assert inspect.signature(evaluate_model).parameters["max_new_tokens"].default == 200
    dd, tok, _, _, model = setup
    enc = encode_eval_splits(tok, dict(dd), roles={"forget10": "forget", "holdout": "holdout"})
    kw = dict(forget="forget10", rouge_examples=2, batch_size=8)
    res = evaluate_model(model, tok, enc, **kw)
    longest = max(len(tok(a, add_special_tokens=False)["input_ids"]) for a in dd["forget10"]["answer"]) + 1
    # the untrained model rarely says EOS: its text runs past the old budget of twice the longest answer
    n_tokens = [len(tok(g, add_special_tokens=False)["input_ids"]) for g in res.generations["forget10"]]
    assert max(n_tokens) > 2 * longest
    auto = evaluate_model(model, tok, enc, max_new_tokens=None, **kw)  # None: twice the longest answer
    for long, short in zip(res.generations["forget10"], auto.generations["forget10"]):
        assert long.startswith(short) and len(tok(short, add_special_tokens=False)["input_ids"]) <= 2 * longest
