"""Means and intervals over seeds (jaxunlearn.stats) and how the benchmark's table and plot show them.

The references are textbook Student-t quantiles (t_{0.975, n-1} from a printed table), not scipy.
"""

import math

import numpy as np
import pytest

from jaxunlearn.stats import aggregate_rows, format_interval, interval_of, intervals_separate, t_interval

# t_{0.975, df} from a printed table of Student's t (Fisher and Yates), df = 1, 2, 4, 9
T975 = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262}


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_t_interval_matches_the_textbook_formula(n):
    x = np.random.default_rng(n).normal(0.4, 0.1, n)
    s = math.sqrt(sum((v - sum(x) / n) ** 2 for v in x) / (n - 1))  # ddof 1, by hand
    iv = t_interval(list(x))
    assert iv.n == n
    np.testing.assert_allclose(iv.mean, sum(x) / n, rtol=1e-12)
    np.testing.assert_allclose(iv.std, s, rtol=1e-12)
    np.testing.assert_allclose(iv.half_width, T975[n - 1] * s / math.sqrt(n), rtol=5e-4)  # table rounding
    np.testing.assert_allclose([iv.low, iv.high], [iv.mean - iv.half_width, iv.mean + iv.half_width])


def test_t_interval_edge_cases():
    one = t_interval([0.3])
    assert one.mean == 0.3 and one.n == 1 and math.isnan(one.half_width)  # n = 1: no interval
    none = t_interval([])
    assert none.n == 0 and math.isnan(none.mean)
    assert t_interval([0.2, float("nan"), 0.4]).n == 2  # NaN counts as missing
    assert t_interval([0.5, 0.5, 0.5]).half_width == 0.0
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1.0, 2.0], confidence=1.0)


def test_aggregate_rows_takes_every_numeric_column_and_skips_failed_seeds():
    rows = [
        {"seed": 0, "forget_quality": 0.4, "model_utility": 0.5, "muse_verbmem": 0.1, "note": "x", "flag": True},
        {"seed": 1, "forget_quality": float("nan"), "model_utility": float("nan"), "error": "ValueError: boom"},
        {"seed": 2, "forget_quality": 0.2, "model_utility": 0.7, "muse_verbmem": 0.3},
    ]
    agg = aggregate_rows(rows)
    # a column nobody told the aggregator about flows through; strings, bools and the seed do not
    assert set(agg["ci95"]) == {"forget_quality", "model_utility", "muse_verbmem"}
    assert "seed" not in agg and "flag" not in agg and "note" not in agg
    assert agg["n"] == 2 and agg["n_seeds"] == 3 and agg["failed_seeds"] == {"1": "ValueError: boom"}
    assert "error" not in agg  # some seeds succeeded: the row is an aggregate, not a failure
    np.testing.assert_allclose(agg["forget_quality"], 0.3)
    np.testing.assert_allclose(agg["ci95"]["model_utility"], T975[1] * math.sqrt(0.02) / math.sqrt(2), rtol=5e-4)
    all_failed = aggregate_rows([{"seed": 0, "x": float("nan"), "error": "E: a"},
                                 {"seed": 1, "x": float("nan"), "error": "E: b"}])
    assert all_failed["error"] == "E: a" and all_failed["n"] == 0 and math.isnan(all_failed["x"])


def test_intervals_separate():
    hi = aggregate_rows([{"fq": v} for v in (0.40, 0.42, 0.41)])
    lo = aggregate_rows([{"fq": v} for v in (0.07, 0.09, 0.08)])
    wide = aggregate_rows([{"fq": v} for v in (0.05, 0.45, 0.25)])
    assert intervals_separate(hi, lo, "fq") and intervals_separate(lo, hi, "fq")
    assert not intervals_separate(hi, wide, "fq") and not intervals_separate(lo, wide, "fq")
    single = aggregate_rows([{"fq": 0.9}])
    assert not intervals_separate(hi, single, "fq")  # n = 1: no interval, no claim
    assert not intervals_separate(hi, {"fq": 0.9}, "fq")  # a plain row: likewise
    assert interval_of({"fq": 0.9}, "fq").n == 1


def test_format_interval():
    assert format_interval(0.4012, 0.0503, ".2f") == "0.40 ± 0.05"
    assert format_interval(0.012, 0.004, "+.3f") == "+0.012 ± 0.004"
    assert format_interval(0.4, float("nan"), ".2f") == "0.40"
    assert format_interval(float("nan"), 0.1, ".2f") == "-"


def _rows():
    ok = [{"seed": s, "forget_quality": fq, "model_utility": mu, "forget_probability": 0.1, "seconds": 2.0}
          for s, fq, mu in ((0, 0.40, 0.50), (1, 0.45, 0.52), (2, 0.35, 0.48))]
    part = ok[:1] + [{"seed": 1, "forget_quality": float("nan"), "error": "FloatingPointError: NaN"}] + ok[2:]
    return {"target": aggregate_rows([{"seed": None, "forget_quality": 1e-5, "model_utility": 0.6}]),
            "npo": aggregate_rows(ok), "ga": aggregate_rows(part),
            "diverge": aggregate_rows([{"seed": 0, "forget_quality": float("nan"), "error": "ValueError: NaN"}])}


def test_results_table_shows_intervals_n_and_failures():
    from jaxunlearn.benchmark import format_results_table

    text = format_results_table(_rows())
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["method", "n", "forget_q", "utility"]
    npo = next(line for line in lines if line.startswith("npo"))
    assert npo.split()[1] == "3" and "0.4 ± 0.124" in npo and "0.500 ± 0.050" in npo
    ga = next(line for line in lines if line.startswith("ga "))
    assert ga.split()[1] == "2/3"
    assert "ga: FAILED on seed 1 (FloatingPointError: NaN); aggregated over the other 2" in text
    assert "diverge: FAILED (ValueError: NaN)" in text
    assert "n = 1 (no interval): target" in text
    one = format_results_table({"npo": aggregate_rows([{"seed": 0, "forget_quality": 0.4}])})
    assert "one seed: no intervals" in one and "±" not in one.splitlines()[2]


def test_plot_draws_interval_bars(tmp_path):
    from jaxunlearn.benchmark import plot_forget_vs_utility

    path = plot_forget_vs_utility(_rows(), tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000 and path.endswith("p.png")
    # plain single-run rows (as experiments pass them) still plot
    plot_forget_vs_utility({"a": {"forget_quality": 0.1, "model_utility": 0.5}}, tmp_path / "q.png")


def test_muse_columns_go_into_the_row_the_aggregate_and_the_table():
    from jaxunlearn.benchmark import format_results_table, summarize
    from jaxunlearn.eval.runner import EvalResult

    res = EvalResult(splits={}, generations={}, roles={},
                     aggregates={"forget": {"probability": 0.2, "truth_ratio": 0.6}, "model_utility": 0.5})
    muse = [{"knowmem_forget": kf, "knowmem_retain": 0.9, "verbmem_forget": vf, "privleak": pl,
             "passage_min_k_auc": 0.7} for kf, vf, pl in ((0.1, 0.5, -20.0), (0.3, 0.7, -40.0))]
    rows = [{**summarize(res, None, 1.0, m), "seed": s} for s, m in enumerate(muse)]
    assert rows[0]["knowmem_forget"] == 0.1 and rows[0]["privleak_muse"] == -20.0 and rows[0]["muse_auc"] == 0.7
    assert "knowmem_forget" not in summarize(res, None, 1.0)  # no MUSE evaluation, no MUSE keys
    agg = aggregate_rows(rows)
    np.testing.assert_allclose([agg["knowmem_forget"], agg["verbmem_forget"], agg["privleak_muse"]], [0.2, 0.6, -30.0])
    # n = 2: half-width t_{0.975, 1} * s / sqrt(2), s = |x1 - x2| / sqrt(2)
    np.testing.assert_allclose(agg["ci95"]["privleak_muse"], T975[1] * 20.0 / math.sqrt(2) / math.sqrt(2), rtol=5e-4)
    failed = aggregate_rows([{"seed": 0, "forget_quality": float("nan"), "error": "E: x"}])
    lines = format_results_table({"npo": agg, "ga": failed}).splitlines()
    head = lines[0].split()
    assert head[-5:] == ["KnowMem_f", "KnowMem_r", "VerbMem_f", "PrivLeak", "time_s"]
    assert "-30.0 ± 127.1" in lines[2] and "0.200 ± 1.271" in lines[2]
    assert lines[3].split()[head.index("KnowMem_f")] == "-"  # a failed method has no MUSE numbers
    assert "KnowMem_f" not in format_results_table(_rows())  # rows without MUSE: no MUSE columns
    with pytest.raises(KeyError, match="passage_min_k_auc"):
        summarize(res, None, 1.0, {k: v for k, v in muse[0].items() if k != "passage_min_k_auc"})


def test_results_table_shows_retain_probability_when_utility_is_not_available():
    from jaxunlearn.benchmark import format_results_table

    rows = {"npo": aggregate_rows([{"seed": s, "forget_probability": 0.2 + s / 10, "retain_probability": 0.7 + s / 10}
                                   for s in (0, 1)])}
    na = {"model_utility": "needs columns paraphrased_answer, perturbed_answer in split 'retain90'"}
    text = format_results_table(rows, na)
    head, _, row = text.splitlines()[:3]
    assert head.split()[head.split().index("utility") + 1] == "retain_p"
    assert "0.750 ±" in row and "n/a" in row and "n/a: utility needs columns" in text
    assert "retain_p" not in format_results_table(rows)  # with utility available: no extra column
