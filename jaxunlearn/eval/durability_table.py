"""Durability results over seeds: per-method means and 95% intervals of FA / RA per precision,
Q-INT4, the recovery ratio and the certificate rate, as JSON and as a table.

The run records and definitions are those of :mod:`jaxunlearn.eval.durability` (FA, RA,
Q-INT4, the recovery ratio ``FA_int4 / FA_bf16`` with ``None`` for +inf, the (epsilon, P)
certificate). Intervals are Student-t over seeds (:func:`jaxunlearn.stats.t_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from jaxunlearn.eval.durability import (DEFAULT_EPSILON, DEFAULT_PRECISIONS, certificate, check_precisions,
                                        recovery_ratio)
from jaxunlearn.stats import CONFIDENCE, format_interval, t_interval
from jaxunlearn.validate import check_bool

__all__ = ["durability_summary", "format_durability_table"]


def _finite_or_none(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _interval(values: list[float | None]) -> dict[str, Any]:
    """Mean and t half-width over seeds; a ``None`` value is +inf (an infinite recovery ratio)."""
    n_inf = sum(v is None for v in values)
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite) + n_inf
    if n_inf:
        return {"mean": None, "ci95": None, "n": n, "n_infinite": n_inf}
    iv = t_interval(finite, CONFIDENCE)
    return {"mean": _finite_or_none(iv.mean), "ci95": _finite_or_none(iv.half_width), "n": n, "n_infinite": 0}


def _metric(per: Mapping[str, Any], p: str, key: str) -> float | None:
    v = per.get(p, {}).get(key) if isinstance(per.get(p), Mapping) else None
    return None if v is None else float(v)


def durability_summary(
    runs: Sequence[Mapping[str, Any]],
    *,
    epsilon: float = DEFAULT_EPSILON,
    precisions: Sequence[str] = DEFAULT_PRECISIONS,
    show: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per method: FA and RA at each shown precision, Q-INT4 and the recovery ratio as a mean
    with its 95% Student-t interval over seeds, and the (epsilon, P) certificate.

    Each interval is ``mean +- t_{0.975, n-1} s / sqrt(n)`` over the method's seeds
    (:func:`jaxunlearn.stats.t_interval`; no half-width with one seed). The recovery ratio of
    a seed is ``FA_int4 / FA_bf16`` (:func:`~jaxunlearn.eval.durability.recovery_ratio`); when some seed's ratio is
    infinite the mean is infinite (``"mean": None`` with ``"n_infinite" > 0``).

    Args:
      runs: run records as for :func:`~jaxunlearn.eval.durability.certificate`.
      epsilon, precisions: the certificate's threshold and set P.
      show: the precisions whose FA / RA are summarised (default ``precisions``).

    Returns:
      ``{method: {"n": seeds, "fa": {p: iv}, "ra": {p: iv}, "q_int4": iv, "recovery_ratio": iv,
      "certificate": certificate(...)[method]}}`` with ``iv = {"mean", "ci95", "n",
      "n_infinite"}`` (``mean`` / ``ci95`` ``None`` where undefined: no value, one seed, or an
      infinite mean). JSON-ready.

    Raises:
      ValueError / TypeError: as :func:`~jaxunlearn.eval.durability.certificate`; an unknown precision in ``show``.

    References:
      DurableUn, "Quantization-Induced Recovery Attacks in Machine Unlearning", 2026;
      Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025.
    """
    cert = certificate(runs, epsilon=epsilon, precisions=precisions)
    show = check_precisions("durability_summary", precisions if show is None else show)
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run["precisions"])
    out: dict[str, dict[str, Any]] = {}
    for method, pers in by_method.items():
        def values(p, key):
            return [v for v in (_metric(per, p, key) for per in pers) if v is not None]

        ratios = []
        for per in pers:
            q, b = _metric(per, "int4", "fa"), _metric(per, "bf16", "fa")
            if q is not None and b is not None:
                ratios.append(recovery_ratio(q, b))
        out[method] = {
            "n": len(pers),
            "fa": {p: _interval(values(p, "fa")) for p in show},
            "ra": {p: _interval(values(p, "ra")) for p in show},
            "q_int4": _interval(values("int4", "fa")),
            "recovery_ratio": _interval(ratios),
            "certificate": cert[method],
        }
    return out


def _cell(iv: Mapping[str, Any], fmt: str) -> str:
    if iv["n_infinite"]:
        return f"inf ({iv['n_infinite']}/{iv['n']})"
    mean = math.nan if iv["mean"] is None else iv["mean"]
    return format_interval(mean, iv["ci95"], fmt)


def _layout(table: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        rows = ["| " + " | ".join(r) + " |" for r in table]
        rows.insert(1, "|" + "|".join("---" if i == 0 else "---:" for i in range(len(table[0]))) + "|")
        return rows
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def format_durability_table(
    runs: Sequence[Mapping[str, Any]],
    *,
    epsilon: float = DEFAULT_EPSILON,
    precisions: Sequence[str] = DEFAULT_PRECISIONS,
    show: Sequence[str] | None = None,
    markdown: bool = False,
    fmt: str = ".3f",
) -> str:
    """The durability table: one row per method (order of first appearance).

    Columns: ``n`` (seeds), ``FA@p`` for each shown precision, ``RA@p``, ``Q-INT4``
    (``FA_int4``), ``rec`` (the recovery ratio ``FA_int4 / FA_bf16``) -- each the mean over
    seeds with its 95% Student-t half-width (``"0.040 ± 0.012"``,
    :func:`jaxunlearn.stats.format_interval`; the mean alone with one seed, ``-`` when absent,
    ``inf (k/n)`` when k of n seeds have an infinite ratio) -- and ``cert``, the certificate
    rate ``k/n`` of :func:`~jaxunlearn.eval.durability.certificate`. A note under the table states epsilon and P.

    Args:
      runs: run records as for :func:`~jaxunlearn.eval.durability.certificate`.
      epsilon, precisions: the certificate's threshold and set P.
      show: the precisions whose FA / RA columns are shown (default ``precisions``).
      markdown: a Markdown pipe table instead of fixed-width text.
      fmt: number format of the means and half-widths.

    Returns:
      The table, a string (lines joined by newlines).

    Raises:
      ValueError / TypeError: as :func:`durability_summary`.

    References:
      DurableUn, "Quantization-Induced Recovery Attacks in Machine Unlearning", 2026;
      Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025.
    """
    markdown = check_bool("format_durability_table", "markdown", markdown)
    summary = durability_summary(runs, epsilon=epsilon, precisions=precisions, show=show)
    shown = check_precisions("format_durability_table", precisions if show is None else show)
    head = ["method", "n"] + [f"FA@{p}" for p in shown] + [f"RA@{p}" for p in shown] + ["Q-INT4", "rec", "cert"]
    table = [head]
    for method, s in summary.items():
        c = s["certificate"]
        table.append([method, str(s["n"])] + [_cell(s["fa"][p], fmt) for p in shown]
                     + [_cell(s["ra"][p], fmt) for p in shown]
                     + [_cell(s["q_int4"], fmt), _cell(s["recovery_ratio"], fmt),
                        f"{len(c['certified_seeds'])}/{len(c['seeds'])}"])
    cert = next(iter(summary.values()))["certificate"]
    pset = ", ".join(cert["precisions"])
    notes = [f"cert: seeds with FA <= {cert['epsilon']:g} at every precision of P = {{{pset}}}; "
             "rec = FA_int4 / FA_bf16 (1 when both are 0; inf when FA_bf16 = 0 < FA_int4)",
             "x ± h: mean over n seeds ± the 95% Student-t half-width t(0.975, n-1)*s/sqrt(n)"]
    return "\n".join(_layout(table, markdown) + ([""] if markdown else []) + notes)
