"""jaxunlearn.eval.durability: deployment precisions, FA / RA, recovery ratio, the (epsilon, P)
certificate and its table, against independent references.

- ``deploy`` vs a hand composition (bf16 cast, then ``fake_quantize``), vs a plain numpy loop
  of blockwise absmax int4 over the bitsandbytes layout, and vs bitsandbytes' own NF4;
- FA / RA of ``evaluate_precisions`` vs exact memorisation by a numpy loop over the argmax of
  a tiny (briefly trained) decoder's logits at each deployed precision;
- one compilation of the evaluation passes across precisions (jit cache sizes);
- ``certificate`` / ``recovery_ratio`` / the table on hand cases, and bad input.
"""

import functools
import json
import logging
import math

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats as sps

from jaxunlearn.data import benchmark_texts, generate_benchmark, train_tokenizer
from jaxunlearn.eval.durability import (
    DEFAULT_EPSILON,
    DEFAULT_PRECISIONS,
    PRECISIONS,
    certificate,
    deploy,
    evaluate_precisions,
    recovery_ratio,
)
from jaxunlearn.eval.durability_table import durability_summary, format_durability_table
from jaxunlearn.eval.splits import encode_eval_splits
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig
from jaxunlearn.quant import fake_quantize
from jaxunlearn.train import TrainConfig, train
from jaxunlearn.tree import leaves_with_paths

FORGET, RETAIN = "forget10", "retain90"
ROLES = {FORGET: "forget", RETAIN: "retain"}


@pytest.fixture(scope="module")
def setup():
    """A tiny decoder trained briefly on the forget + retain answers (so exact memorisation is
    far from 0), its tokenizer, the raw splits and their encoding."""
    dd = generate_benchmark(num_people=20, num_general=2, num_perturbed=2, seed=0,
                            attributes=("birthplace", "occupation"))
    dd = datasets.DatasetDict({FORGET: dd[FORGET], RETAIN: dd[RETAIN].select(range(8))})
    tok = train_tokenizer(benchmark_texts(dd), vocab_size=64)
    assert len(tok) <= 64
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    enc = encode_eval_splits(tok, dict(dd), roles=ROLES)
    data = {k: np.concatenate([enc[s].answer[k] for s in (FORGET, RETAIN)])
            for k in ("input_ids", "attention_mask", "loss_mask")}
    model, _ = train(Decoder(cfg, rngs=nnx.Rngs(0)), data,
                     TrainConfig(steps=70, batch_size=12, learning_rate=1e-2, warmup_steps=2), progress=False)
    return dd, tok, model, enc


def _pure(tree):
    return {p: np.asarray(jnp.asarray(x).astype(jnp.float32)) for p, x in leaves_with_paths(tree)}


def _is_block_kernel(path: str) -> bool:
    return path.startswith("layers/") and path.endswith("kernel")


# ----------------------------------------------------------------------------------------- deploy


def test_deploy_is_bf16_cast_then_fake_quantize(setup):
    _, _, model, _ = setup
    _, params = DecoderFn.of(model)
    orig = _pure(params)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert deploy(params, "fp32") is params
    for p in PRECISIONS[1:]:
        d = deploy(params, p)
        assert jax.tree.structure(d) == jax.tree.structure(params)
        # same dtypes (float32 holding the deployed values): one compilation downstream
        assert [x.dtype for x in jax.tree.leaves(d)] == [x.dtype for x in jax.tree.leaves(params)]
        want = _pure(bf16 if p == "bf16" else jax.jit(functools.partial(fake_quantize, scheme=p))(bf16))
        got = _pure(d)
        n_changed = 0
        for path in orig:
            np.testing.assert_array_equal(got[path], want[path], err_msg=f"{p} {path}")
            bf = np.asarray(jnp.asarray(orig[path]).astype(jnp.bfloat16).astype(jnp.float32))
            if p == "bf16" or not _is_block_kernel(path):  # only block kernels are quantised
                np.testing.assert_array_equal(got[path], bf, err_msg=f"{p} {path}")
            else:
                n_changed += not np.array_equal(got[path], bf)
        assert n_changed == (0 if p == "bf16" else 7 * model.config.num_layers)


def _int4_blocks_numpy(kernel: np.ndarray, block: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric absmax int4 of a (in, out) kernel in bitsandbytes' layout, by a loop over blocks:
    W = kernel.T (out, in) flattened row-major, blocks of ``block`` consecutive values (running on
    across rows), s = max|W_b| / 7, code = clip(round_half_even(W_b / s), -7, 7), value = code * s.

    Returns ``(codes, scales, near_tie)`` per value, shaped like ``kernel``; ``near_tie`` marks
    quotients within 1e-4 of a half-integer, where a one-ulp difference in the float32 division
    (XLA:CPU's is not always correctly rounded) may pick the other neighbour."""
    w = np.ascontiguousarray(kernel.T).reshape(-1).astype(np.float32)
    codes, scales, tie = np.empty_like(w), np.empty_like(w), np.zeros(w.shape, bool)
    for start in range(0, w.size, block):
        b = w[start:start + block]
        s = np.float32(np.max(np.abs(b))) / np.float32(7.0)
        s = s if s > 0 else np.float32(1.0)
        q = b.astype(np.float64) / np.float64(s)
        codes[start:start + block] = np.clip(np.round(q), -7, 7)
        scales[start:start + block] = s
        tie[start:start + block] = np.abs(np.abs(q - np.floor(q)) - 0.5) < 1e-4
    back = lambda a: a.reshape(kernel.shape[::-1]).T  # noqa: E731
    return back(codes), back(scales), back(tie)


def test_deploy_int4_equals_numpy_blockwise_loop(setup):
    _, _, model, _ = setup
    _, params = DecoderFn.of(model)
    got = _pure(deploy(params, "int4"))
    checked = 0
    for path, x in _pure(params).items():
        if not _is_block_kernel(path):
            continue
        bf = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))  # the bf16 checkpoint
        codes, scales, tie = _int4_blocks_numpy(bf)
        # the deployed value is bf16(code * s): recover its code (bf16 keeps 8 bits, codes need 3)
        got_codes = np.round(got[path] / scales)
        np.testing.assert_array_equal(got_codes[~tie], codes[~tie], err_msg=path)
        assert np.all(np.abs(got_codes[tie] - codes[tie]) <= 1), path
        want = np.asarray(jnp.asarray(got_codes * scales).astype(jnp.bfloat16).astype(jnp.float32))
        np.testing.assert_allclose(got[path], want, rtol=2.0 ** -8, atol=0, err_msg=path)  # one bf16 ulp
        checked += 1
    # q/k/v/o (in 32, 16 or 32 wide) and down_proj (in 48): blocks straddle rows of W
    assert checked == 14


def test_deploy_nf4_equals_bitsandbytes(setup):
    from test_quant_bnb import _bnb_4bit  # bitsandbytes' quantize_4bit, its codes decoded

    _, _, model, _ = setup
    _, params = DecoderFn.of(model)
    got = _pure(deploy(params, "nf4"))
    for name in ("layers/0/mlp/down_proj/kernel", "layers/1/attn/q_proj/kernel"):
        x = _pure(params)[name]
        w_hf = np.ascontiguousarray(np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)).T)
        ref = _bnb_4bit(w_hf, "bfloat16", "nf4")  # transformers: the bf16 weight, Params4bit
        ref16 = np.asarray(jnp.asarray(ref).astype(jnp.bfloat16).astype(jnp.float32))
        np.testing.assert_array_equal(got[name].T, ref16, err_msg=name)


def test_deploy_bad_input():
    p = {"layers": [{"mlp": {"up_proj": {"kernel": jnp.ones((4, 2))}}}]}
    with pytest.raises(ValueError, match=r"unknown precision 'int3'"):
        deploy(p, "int3")
    with pytest.raises(ValueError, match="unknown precision"):
        deploy(p, "BF16")
    with pytest.raises(ValueError, match="block_size"):
        deploy(p, "int4", block_size=0)
    bad = {"layers": [{"mlp": {"up_proj": {"kernel": jnp.array([[1.0, jnp.nan], [0.0, 1.0]])}}}]}
    with pytest.raises(ValueError, match="NaN values at 'layers/0/mlp/up_proj/kernel'"):
        deploy(bad, "int8")
    # a bf16 tree stays bf16; bf16 deployment of it is the identity
    b = jax.tree.map(lambda x: (x * 0.3).astype(jnp.bfloat16), p)
    assert deploy(b, "int4")["layers"][0]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(deploy(b, "bf16")["layers"][0]["mlp"]["up_proj"]["kernel"],
                                  b["layers"][0]["mlp"]["up_proj"]["kernel"])


# ----------------------------------------------------------------------------------------- FA / RA


def _em_numpy(logits: np.ndarray, ids: np.ndarray, loss_mask: np.ndarray, exact: bool = False) -> float:
    """Mean over rows of (1/n) sum [argmax logits[t-1] == ids[t]] over the answer tokens t (the
    masked positions) except the last one of the row (the closing EOS); rows with n = 0 skipped.
    ``exact``: the fraction of rows with every such token right."""
    per_row = []
    for r in range(ids.shape[0]):
        pos = [t for t in range(1, ids.shape[1]) if loss_mask[r, t] > 0]
        pos = pos[:-1]  # drop the EOS prediction
        if not pos:
            continue
        hits = [int(np.argmax(logits[r, t - 1])) == int(ids[r, t]) for t in pos]
        per_row.append(float(all(hits)) if exact else sum(hits) / len(hits))
    return float(np.mean(per_row))


def test_evaluate_precisions_fa_ra_match_numpy_reference(setup):
    _, tok, model, enc = setup
    fn, params = DecoderFn.of(model)
    forward = jax.jit(fn)
    out = evaluate_precisions(model, tok, enc, forget=FORGET, retain=RETAIN, precisions=PRECISIONS, batch_size=8)
    assert list(out["precisions"]) == list(PRECISIONS)
    strict = []
    for p in PRECISIONS:
        row = out["precisions"][p]
        d = deploy(params, p)
        for key, split in (("fa", FORGET), ("ra", RETAIN)):
            a = enc[split].answer
            logits = np.asarray(forward(d, jnp.asarray(a["input_ids"]), jnp.asarray(a["attention_mask"])))
            want = _em_numpy(logits, a["input_ids"], a["loss_mask"])
            exact = _em_numpy(logits, a["input_ids"], a["loss_mask"], exact=True)
            assert row[f"{key}_token"] == pytest.approx(want, rel=1e-6), (p, key)  # float32 per-row EM
            assert row[f"{key}_exact_match"] == pytest.approx(exact, abs=1e-12), (p, key)
            assert row[key] == row[f"{key}_exact_match"]  # the default FA
            assert exact <= want
            strict.append(exact < want)
        assert row["forget"]["exact_memorization"] == pytest.approx(row["fa_token"])
        assert 0.0 < row["forget_probability"] <= 1.0 and 0.0 < row["retain_probability"] <= 1.0
        assert "forget_rouge_l" not in row and "model_utility" not in row  # no generation by default
    fa = {p: out["precisions"][p]["fa"] for p in PRECISIONS}
    fa_token_bf16 = out["precisions"]["bf16"]["fa_token"]
    assert any(strict)  # some answers are partly right: the two scorings differ on this model
    assert fa["fp32"] > 0.05 and out["precisions"]["fp32"]["ra"] > 0.05  # the model did memorise some answers
    assert out["q_int4"] == fa["int4"]
    assert out["recovery_delta"] == pytest.approx(fa["int4"] - fa["bf16"])
    assert out["recovery_ratio"] == pytest.approx(fa["int4"] / fa["bf16"])
    json.dumps(out, allow_nan=False)  # NaN-free
    # a subset without bf16: Q-INT4 but no ratio; without int4: neither
    sub = evaluate_precisions(model, tok, enc, forget=FORGET, retain=[RETAIN], precisions=("int4",), batch_size=8)
    assert sub["q_int4"] == fa["int4"] and "recovery_ratio" not in sub
    assert set(evaluate_precisions(model, tok, enc, forget=FORGET, retain=RETAIN, precisions=("bf16",),
                                   batch_size=8)) == {"fa_metric", "precisions"}
    tok_fa = evaluate_precisions(model, tok, enc, forget=FORGET, retain=RETAIN, precisions=("bf16",), batch_size=8,
                                 fa_metric="token")
    assert tok_fa["fa_metric"] == "token" and tok_fa["precisions"]["bf16"]["fa"] == fa_token_bf16


def test_one_compilation_across_precisions_with_generation(setup, caplog):
    dd, tok, model, enc = setup
    kw = dict(forget=FORGET, retain=RETAIN, rouge_examples=2, max_new_tokens=4, batch_size=8)
    first = evaluate_precisions(model, tok, enc, precisions=("bf16",), **kw)
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):   # jax logs every compilation by name
        out = evaluate_precisions(model, tok, enc, precisions=("int8", "int4", "nf4", "fp4", "fp32"), **kw)

        def _log_probe(x):  # a fresh function: compiled here, so the log is known to be captured
            return x * 3.0

        jax.jit(_log_probe)(jnp.ones(3))
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling ")]
    assert [m for m in compiled if "jit(_log_probe)" in m], "jax.log_compiles was not captured: the check is vacuous"
    for name in ("_answer_pass", "_nll_pass", "_generate_jit"):   # the scoring and generation passes
        assert not [m for m in compiled if f"jit({name})" in m], (name, compiled)
    for row in (*first["precisions"].values(), *out["precisions"].values()):
        assert 0.0 <= row["forget_rouge_l"] <= 1.0 and row["model_utility"] is not None
    # raw datasets (encoded once inside) give the same numbers as the pre-encoded splits
    raw = evaluate_precisions(model, tok, dict(dd), precisions=("bf16",), **kw)
    assert raw["precisions"]["bf16"]["fa"] == first["precisions"]["bf16"]["fa"]
    assert raw["precisions"]["bf16"]["forget_rouge_l"] == first["precisions"]["bf16"]["forget_rouge_l"]


def test_evaluate_precisions_bad_input(setup):
    _, tok, model, enc = setup
    with pytest.raises(ValueError, match=r"unknown precision 'int2'"):
        evaluate_precisions(model, tok, enc, forget=FORGET, retain=RETAIN, precisions=("bf16", "int2"))
    with pytest.raises(ValueError, match="repeated precision"):
        evaluate_precisions(model, tok, enc, forget=FORGET, retain=RETAIN, precisions=("int4", "int4"))
    with pytest.raises(TypeError, match="sequence of precision names"):
        evaluate_precisions(model, tok, enc, forget=FORGET, retain=RETAIN, precisions="int4")
    with pytest.raises(ValueError, match="retain"):
        evaluate_precisions(model, tok, enc, forget=FORGET, retain=[])


# ----------------------------------------------------------------------------------------- recovery ratio


def test_recovery_ratio():
    assert recovery_ratio(0.3, 0.15) == pytest.approx(2.0)
    assert recovery_ratio(0.0, 0.2) == 0.0
    assert recovery_ratio(0.0, 0.0) == 1.0
    assert recovery_ratio(0.01, 0.0) is None  # +inf, JSON-safe
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="fa_int4"):
            recovery_ratio(bad, 0.1)
        with pytest.raises(ValueError, match="fa_bf16"):
            recovery_ratio(0.1, bad)


# ----------------------------------------------------------------------------------------- certificate


def _run(method, seed, **fa):
    return {"method": method, "seed": seed, "precisions": {p: {"fa": v, "ra": 0.9} for p, v in fa.items()}}


EPS = DEFAULT_EPSILON
ABOVE = float(np.nextafter(EPS, 1.0))

RUNS = [
    _run("npo", 0, bf16=0.0, int8=0.01, int4=EPS),  # boundary: certifies
    _run("npo", 1, bf16=0.0, int8=0.0, int4=ABOVE),  # one ulp above at int4: fails
    _run("npo", 2, bf16=0.02, int8=0.02, int4=0.03, nf4=0.9),  # nf4 is not in P: certifies
    _run("ga", 7, bf16=0.5, int8=0.0, int4=0.0),  # fails at bf16
]


def test_certificate_hand_cases():
    assert DEFAULT_PRECISIONS == ("bf16", "int8", "int4") and DEFAULT_EPSILON == 0.047
    c = certificate(RUNS)
    assert list(c) == ["npo", "ga"]
    npo = c["npo"]
    assert npo["seeds"] == [0, 1, 2] and npo["certified_seeds"] == [0, 2]
    assert npo["cert_rate"] == pytest.approx(2 / 3)
    assert npo["worst_fa"] == [EPS, ABOVE, 0.03]
    assert npo["epsilon"] == EPS and npo["precisions"] == ["bf16", "int8", "int4"]
    assert c["ga"]["cert_rate"] == 0.0 and c["ga"]["certified_seeds"] == [] and c["ga"]["seeds"] == [7]
    # P without int4: seed 1 certifies too; with nf4: seed 2 fails
    assert certificate(RUNS, precisions=("bf16", "int8"))["npo"]["certified_seeds"] == [0, 1, 2]
    assert certificate(RUNS[2:3], precisions=("bf16", "nf4"))["npo"]["cert_rate"] == 0.0
    # epsilon = 0: only exact zeros certify; a large epsilon certifies everything
    assert certificate(RUNS, epsilon=0, precisions=("bf16", "int8"))["npo"]["certified_seeds"] == [1]
    assert certificate(RUNS, epsilon=1.0)["ga"]["cert_rate"] == 1.0
    json.dumps(c, allow_nan=False)


def test_certificate_errors():
    with pytest.raises(ValueError, match="no runs"):
        certificate([])
    with pytest.raises(ValueError, match=r"run 1 \(method 'npo', seed 5\) lacks precision\(s\) \['int4'\]"):
        certificate([_run("npo", 4, bf16=0, int8=0, int4=0), _run("npo", 5, bf16=0, int8=0)])
    with pytest.raises(ValueError, match=r"unknown precision 'int3'"):
        certificate(RUNS, precisions=("bf16", "int3"))
    with pytest.raises(ValueError, match="empty"):
        certificate(RUNS, precisions=())
    with pytest.raises(TypeError, match="sequence"):
        certificate(RUNS, precisions="int4")
    for bad in (-0.01, math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="certificate.epsilon must be a finite number >= 0"):
            certificate(RUNS, epsilon=bad)
    with pytest.raises(TypeError, match="epsilon"):
        certificate(RUNS, epsilon="0.05")
    with pytest.raises(ValueError, match=r"method 'ga', seed 1\) has no finite FA at precision 'int8'"):
        certificate([_run("ga", 1, bf16=0.0, int8=math.nan, int4=0.0)])
    with pytest.raises(ValueError, match="has no finite FA at precision 'bf16'"):
        certificate([{"method": "ga", "seed": 1, "precisions": {"bf16": {"ra": 1.0}, "int8": {"fa": 0.0},
                                                                "int4": {"fa": 0.0}}}])
    with pytest.raises(ValueError, match="seed 0 of method 'npo' appears twice"):
        certificate([RUNS[0], RUNS[0]])
    with pytest.raises(ValueError, match="run 0 has no 'method'"):
        certificate([{"seed": 0, "precisions": {}}])


# ----------------------------------------------------------------------------------------- table


def _t_half(values):
    x = np.asarray(values, np.float64)
    return sps.t.ppf(0.975, len(x) - 1) * np.std(x, ddof=1) / np.sqrt(len(x))


def test_summary_and_table():
    runs = [_run("npo", s, bf16=b, int8=b, int4=q) for s, (b, q) in enumerate([(0.1, 0.3), (0.2, 0.2), (0.3, 0.4)])]
    runs += [_run("ga", 0, bf16=0.0, int8=0.0, int4=0.0), _run("ga", 1, bf16=0.0, int8=0.0, int4=0.2)]
    runs += [_run("rmu", 3, bf16=0.01, int8=0.02, int4=0.02)]
    s = durability_summary(runs)
    json.dumps(s, allow_nan=False)
    npo = s["npo"]
    assert npo["n"] == 3
    assert npo["fa"]["bf16"]["mean"] == pytest.approx(0.2)
    assert npo["fa"]["bf16"]["ci95"] == pytest.approx(_t_half([0.1, 0.2, 0.3]))
    assert npo["q_int4"]["mean"] == pytest.approx(0.3)
    assert npo["recovery_ratio"]["mean"] == pytest.approx(np.mean([3.0, 1.0, 4 / 3]))
    assert npo["recovery_ratio"]["ci95"] == pytest.approx(_t_half([3.0, 1.0, 4 / 3]))
    assert npo["ra"]["int4"]["mean"] == pytest.approx(0.9) and npo["ra"]["int4"]["ci95"] == pytest.approx(0.0)
    # ga: ratios 1 (0/0) and inf (0.2/0) -> an infinite mean
    assert s["ga"]["recovery_ratio"] == {"mean": None, "ci95": None, "n": 2, "n_infinite": 1}
    # rmu: one seed, no interval
    assert s["rmu"]["fa"]["int4"] == {"mean": 0.02, "ci95": None, "n": 1, "n_infinite": 0}
    assert s["rmu"]["certificate"]["cert_rate"] == 1.0

    text = format_durability_table(runs)
    lines = text.splitlines()
    assert lines[0].split() == ["method", "n", "FA@bf16", "FA@int8", "FA@int4", "RA@bf16", "RA@int8", "RA@int4",
                                "Q-INT4", "rec", "cert"]
    npo_line = next(line for line in lines if line.startswith("npo"))
    assert f"0.200 ± {_t_half([0.1, 0.2, 0.3]):.3f}" in npo_line and npo_line.rstrip().endswith("0/3")
    ga_line = next(line for line in lines if line.startswith("ga"))
    assert "inf (1/2)" in ga_line and ga_line.rstrip().endswith("1/2")
    rmu_line = next(line for line in lines if line.startswith("rmu"))
    assert "0.020" in rmu_line and "±" not in rmu_line and rmu_line.rstrip().endswith("1/1")
    assert "FA <= 0.047" in text and "bf16, int8, int4" in text
    md = format_durability_table(runs, markdown=True, show=("bf16", "int4"), epsilon=0.25)
    head, sep = md.splitlines()[:2]
    assert head.startswith("| method | n | FA@bf16 | FA@int4 | RA@bf16 | RA@int4 |")
    assert set(sep) <= set("|-:")
    assert next(line for line in md.splitlines() if line.startswith("| npo")).endswith("| 1/3 |")
    with pytest.raises(ValueError, match="lacks precision"):
        format_durability_table(runs, precisions=("bf16", "nf4"))
    with pytest.raises(ValueError, match="unknown precision"):
        format_durability_table(runs, show=("bf16", "q4"))
