"""Means and 95% intervals over seeds, for comparing unlearning methods.

A benchmark row is a flat mapping of numbers (:func:`jaxunlearn.results_table.summarize`). Run
with several seeds, a method has one row per seed; :func:`aggregate_rows` turns them into one
row of per-column means with a Student-t interval over seeds,

    mean +- t_{0.975, n-1} * s / sqrt(n),    s the sample standard deviation (ddof 1),

(:func:`t_interval`, ``scipy.stats.t``). Every numeric column is aggregated, whatever its
name, so columns added to the row later flow through. With n = 1 there is no interval
(the half-width is NaN). A seed whose row carries ``"error"`` (a failed run) is left out of
the aggregate and recorded with its reason.

Two methods are called different on a column only when their intervals separate
(:func:`intervals_separate`). Non-overlap of two 95% intervals is a conservative test
(for equal widths it corresponds to a two-sample p-value of about 0.006), so "overlap" is
"not shown to differ", not "equal".

>>> iv = t_interval([0.40, 0.45, 0.35])
>>> round(iv.mean, 3), round(iv.half_width, 3), iv.n
(0.4, 0.124, 3)
>>> format_interval(iv.mean, iv.half_width, ".2f")
'0.40 ± 0.12'
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

__all__ = ["Interval", "t_interval", "aggregate_rows", "numeric_columns", "interval_of", "intervals_separate",
           "format_interval", "CONFIDENCE", "DEFAULT_SEEDS"]

CONFIDENCE = 0.95
DEFAULT_SEEDS = 3  # seeds per comparison when none are named: the smallest n with a finite t-interval, plus one

# Row keys that are bookkeeping, not measurements: never aggregated.
_NOT_MEASURED = frozenset({"seed", "n", "n_seeds"})


class Interval(NamedTuple):
    """A mean with its Student-t interval over seeds.

    Attributes:
      mean: the sample mean (NaN when ``n == 0``).
      half_width: ``t_{(1+confidence)/2, n-1} * std / sqrt(n)`` (NaN when ``n < 2``: no interval).
      std: the sample standard deviation, ``ddof=1`` (NaN when ``n < 2``).
      n: the number of values.
    """

    mean: float
    half_width: float
    std: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The Student-t interval of the mean of ``values`` (NaN values are left out).

    ``mean +- t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard
    deviation (``ddof=1``) and ``t`` the quantile of Student's t with ``n - 1`` degrees of
    freedom (``scipy.stats.t.ppf``). With one value the half-width is NaN (no interval).

    Args:
      values: one number per seed.
      confidence: the interval's coverage, in (0, 1).

    Returns:
      An :class:`Interval`.

    >>> t_interval([1.0, 1.0]).half_width
    0.0
    >>> t_interval([2.0])
    Interval(mean=2.0, half_width=nan, std=nan, n=1)
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"t_interval: confidence must be in (0, 1), got {confidence!r}")
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    x = x[~np.isnan(x)]
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(np.mean(x))
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    from scipy.stats import t

    std = float(np.std(x, ddof=1))
    return Interval(mean, float(t.ppf(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)), std, n)


def _is_number(v: Any) -> bool:
    return isinstance(v, (numbers.Real, np.floating, np.integer)) and not isinstance(v, (bool, np.bool_))


def numeric_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The measured columns of ``rows``: keys holding a number in any row, in first-seen order
    (bookkeeping keys -- ``seed``, ``n``, ``n_seeds`` -- excluded)."""
    cols: dict[str, None] = {}
    for row in rows:
        for k, v in row.items():
            if k not in _NOT_MEASURED and _is_number(v):
                cols.setdefault(k)
    return list(cols)


def aggregate_rows(rows: Sequence[Mapping[str, Any]], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """One row from one row per seed: per-column means with their intervals.

    Rows with an ``"error"`` key are failed seeds: left out of the means and listed in
    ``failed_seeds``. Every numeric column (:func:`numeric_columns`) of any row is
    aggregated; within a successful row a NaN value counts as missing for that column.

    Args:
      rows: the per-seed rows; each may carry ``"seed"`` (an int, or None for a run that
        takes no seed).
      confidence: the intervals' coverage.

    Returns:
      ``{column: mean, ..., "n": successful seeds, "n_seeds": len(rows),
      "ci95": {column: half_width}, "std": {column: std}, "failed_seeds": {seed: error}}``
      (``ci95`` holds the half-widths at ``confidence``, NaN when fewer than two values);
      when every seed failed, also ``"error"`` (the first seed's reason) and NaN means.
    """
    ok = [r for r in rows if not r.get("error")]
    failed = {str(r.get("seed")): r["error"] for r in rows if r.get("error")}
    out: dict[str, Any] = {}
    ci: dict[str, float] = {}
    std: dict[str, float] = {}
    for col in numeric_columns(rows):
        iv = t_interval([r[col] for r in ok if _is_number(r.get(col))], confidence)
        out[col], ci[col], std[col] = iv.mean, iv.half_width, iv.std
    out.update(n=len(ok), n_seeds=len(rows), ci95=ci, std=std, failed_seeds=failed)
    if not ok and rows:
        out["error"] = next(iter(failed.values()))
    return out


def interval_of(row: Mapping[str, Any], column: str) -> Interval:
    """The interval of ``column`` in an aggregated row (:func:`aggregate_rows`); a plain
    single-run row gives ``n = 1`` and no interval."""
    mean = float(row.get(column, math.nan))
    if "ci95" not in row:
        return Interval(mean, math.nan, math.nan, 0 if math.isnan(mean) else 1)
    return Interval(mean, float(row["ci95"].get(column, math.nan)), float(row["std"].get(column, math.nan)),
                    int(row.get("n", 0)))


def intervals_separate(a: Mapping[str, Any], b: Mapping[str, Any], column: str) -> bool:
    """Whether two aggregated rows' intervals on ``column`` do not overlap.

    False whenever either row has no interval (fewer than two successful seeds, or a NaN
    mean): a difference is claimed only when both intervals exist and separate.

    >>> a = aggregate_rows([{"forget_quality": v} for v in (0.40, 0.42, 0.41)])
    >>> b = aggregate_rows([{"forget_quality": v} for v in (0.07, 0.09, 0.08)])
    >>> intervals_separate(a, b, "forget_quality")
    True
    """
    ia, ib = interval_of(a, column), interval_of(b, column)
    if not all(np.isfinite(v) for v in (ia.low, ia.high, ib.low, ib.high)):
        return False
    return ia.high < ib.low or ib.high < ia.low


def format_interval(mean: float, half_width: float | None, fmt: str = ".3g") -> str:
    """``"0.40 ± 0.05"``; just the mean when there is no interval; ``"-"`` for a NaN mean.

    The half-width is written with ``fmt`` less any sign flag (``"+.3f"`` gives
    ``"+0.012 ± 0.004"``).
    """
    if mean is None or not math.isfinite(float(mean)):
        return "-" if mean is None or math.isnan(float(mean)) else format(float(mean), fmt)
    text = format(float(mean), fmt)
    if half_width is None or not math.isfinite(float(half_width)):
        return text
    return f"{text} ± {format(float(half_width), fmt.replace('+', '').replace(' ', ''))}"
