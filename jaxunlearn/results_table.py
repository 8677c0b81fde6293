"""The benchmark's results table: one row per evaluated model, its printed form and its plot.

- :func:`summarize`: the row of one evaluation -- TOFU forget quality, model utility, forget
  probability and truth ratio, Min-k MIA AUC and PrivLeak on the QA rows, the INT4 recovery, the
  wall time, and with a MUSE evaluation (:func:`jaxunlearn.eval.muse.muse_eval`) MUSE's columns;
- :func:`failed_row`: the row of a run that failed;
- :func:`format_results_table`: the printed table of rows aggregated over seeds
  (:func:`jaxunlearn.stats.aggregate_rows`), every number a mean with its 95% interval;
- :func:`plot_forget_vs_utility`: forget quality against model utility.

Re-exported by :mod:`jaxunlearn.benchmark`, which fills these rows.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np

from jaxunlearn.eval.quant_recovery import forget_metrics
from jaxunlearn.eval.runner import EvalResult
from jaxunlearn.stats import format_interval, interval_of

__all__ = ["summarize", "failed_row", "format_results_table", "format_probe_table", "plot_forget_vs_utility", "plot_relearn", "plot_pareto", "MUSE_ROW_KEYS",
           "row_not_available"]

#: Row key -> :func:`~jaxunlearn.eval.muse.muse_eval` key of the MUSE columns: KnowMem on the
#: forget and retain QA, VerbMem on the forget passages (ROUGE-L F1 in [0, 1]), PrivLeak (%) of
#: the passage Min-k AUC against the reference's, and that AUC (``1 -`` MUSE's orientation).
MUSE_ROW_KEYS: dict[str, str] = {"knowmem_forget": "knowmem_forget", "knowmem_retain": "knowmem_retain",
                                 "verbmem_forget": "verbmem_forget", "privleak_muse": "privleak",
                                 "muse_auc": "passage_min_k_auc"}


def row_not_available(result: EvalResult) -> dict[str, str]:
    """The row columns an evaluation could not give for lack of data columns.

    Args:
      result: an :class:`~jaxunlearn.eval.runner.EvalResult`.

    Returns:
      ``{row column: "needs column(s) ..."}`` for ``forget_quality``, ``model_utility`` and
      ``forget_truth_ratio`` (from ``result.not_available``); empty with the full TOFU columns.
    """
    na = dict(result.not_available)
    out = {key: na[key] for key in ("forget_quality", "model_utility") if key in na}
    forget = next((name for name, role in result.roles.items() if role == "forget"), None)
    if forget is not None and f"{forget}/truth_ratio" in na:
        out["forget_truth_ratio"] = f"{na[f'{forget}/truth_ratio']} in split {forget!r}"
    return out


def summarize(result: EvalResult, recovery: Mapping[str, Any] | None, seconds: float | None,
              muse: Mapping[str, float] | None = None) -> dict[str, Any]:
    """One table row: the headline numbers of an evaluation (and its INT4 recovery).

    With ``muse`` (a :func:`~jaxunlearn.eval.muse.muse_eval` result) the row also holds the MUSE
    columns under the keys of :data:`MUSE_ROW_KEYS`. ``retain_probability`` is the mean answer
    probability of the first retain split (the plot's utility axis when model utility is not
    available). A number the data's columns cannot give is NaN and named, with the column it
    needs, under ``"not_available"`` (:func:`row_not_available`; only when there is one).

    Raises:
      KeyError: ``muse`` lacks one of the ``muse_eval`` keys (named).
    """
    agg = result.aggregates
    fm = forget_metrics(result)
    retain = next((name for name, role in result.roles.items() if role == "retain"), None)
    row = {
        "forget_quality": float(agg.get("forget_quality", float("nan"))),
        "model_utility": float(agg.get("model_utility", float("nan"))),
        "forget_probability": float(fm["probability"]),
        "forget_truth_ratio": float(fm.get("truth_ratio", float("nan"))),
        "retain_probability": (float(np.mean(result.splits[retain]["probability"])) if retain is not None
                               else float("nan")),
        "mia_auc_min_k": float(agg.get("mia_auc", {}).get("min_k", float("nan"))),
        "privleak_min_k": float(agg.get("privleak", {}).get("min_k", float("nan"))),
        "seconds": float("nan") if seconds is None else float(seconds),
    }
    if recovery is not None and "int4" in recovery:
        row["int4_recovery"] = float(recovery["int4"]["recovery"]["probability"])
    else:
        row["int4_recovery"] = float("nan")
    if muse is not None:
        missing = [k for k in MUSE_ROW_KEYS.values() if k not in muse]
        if missing:
            raise KeyError(f"the MUSE result lacks {missing} (a muse_eval result has them; got {sorted(muse)})")
        row.update({key: float(muse[src]) for key, src in MUSE_ROW_KEYS.items()})
    na = row_not_available(result)
    if na:
        row["not_available"] = na
    return row


def failed_row(error: BaseException, seconds: float | None) -> dict[str, Any]:
    """The table row of a method that failed: every number NaN, ``error`` the reason."""
    row: dict[str, Any] = {key: float("nan") for key, _, _ in _COLUMNS[1:]}
    row["seconds"] = float("nan") if seconds is None else float(seconds)
    row["error"] = f"{type(error).__name__}: {error}".splitlines()[0]
    return row


_COLUMNS = (("method", "method", "s"), ("forget_quality", "forget_q", ".3g"), ("model_utility", "utility", ".3f"),
            ("forget_probability", "forget_p", ".3f"), ("mia_auc_min_k", "MIA_AUC", ".3f"),
            ("int4_recovery", "int4_rec", "+.3f"), ("seconds", "time_s", ".1f"))
# shown (before time_s) when some row has MUSE numbers
_MUSE_COLUMNS = (("knowmem_forget", "KnowMem_f", ".3f"), ("knowmem_retain", "KnowMem_r", ".3f"),
                 ("verbmem_forget", "VerbMem_f", ".3f"), ("privleak_muse", "PrivLeak", "+.1f"))


# the probes' columns (jaxunlearn.eval.probes), shown by format_probe_table
_PROBE_COLUMNS = (("relearn_p0", "relearn_p0", ".3f"), ("relearn_p", "relearn_p", ".3f"),
                  ("relearn_rec", "relearn_rec", "+.3f"), ("remind_auc", "REMIND_AUC", ".3f"),
                  ("mixed_forget_fa", "mixF_FA", ".3f"), ("mixed_retain_fa", "mixR_FA", ".3f"),
                  ("retain_shared_fa", "shrR_FA", ".3f"), ("retain_unshared_fa", "unshR_FA", ".3f"))


def format_results_table(rows: Mapping[str, Mapping[str, Any]],
                         not_available: Mapping[str, str] | None = None) -> str:
    """A fixed-width text table, one row per method (the order of ``rows``).

    Columns: forget quality, model utility, forget probability, Min-k MIA AUC, INT4 recovery,
    then -- when any row has them -- MUSE's KnowMem (forget, retain), VerbMem (forget) and
    PrivLeak (%), then the wall time. When model utility is not available, the retain answer
    probability (``retain_p``) follows it, the utility-side number the data allows.

    Each number is the mean over seeds with its 95% interval half-width (``"0.40 ± 0.05"``,
    :func:`jaxunlearn.stats.format_interval`); column ``n`` is the number of seeds aggregated
    (of the seeds run, when some failed). A row aggregated from one seed (or a plain
    :func:`summarize` row) shows the number alone, and a note under the table says so.

    Args:
      rows: ``{name: aggregated row}``.
      not_available: ``{row column: reason}`` (the benchmark's ``"not_available"``): those
        columns show ``n/a`` and a note names the data column each needs.

    Returns:
      The table text with its notes.
    """
    na = dict(not_available or {})
    columns = _COLUMNS[1:]
    if "model_utility" in na and any("retain_probability" in row for row in rows.values()):
        columns = columns[:2] + (("retain_probability", "retain_p", ".3f"),) + columns[2:]
    if any("knowmem_forget" in row for row in rows.values()):
        columns = columns[:-1] + _MUSE_COLUMNS + columns[-1:]
    return _format_table(rows, columns, na)


def format_probe_table(rows: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The probes' columns (:mod:`jaxunlearn.eval.probes`) as a second table, or None when no row has one.

    Columns (those some row has): ``relearn_p0`` / ``relearn_p`` (held-out forget answer
    probability before / after the relearning attack), ``relearn_rec`` (the share of the
    unlearned gap the attack recovers), ``REMIND_AUC`` (the input-landscape detector's AUC,
    forgotten vs other), and the fact accuracies on the overlap splits: ``mixF_FA`` / ``mixR_FA``
    (the forget / retain person's fact in a combined query) and ``shrR_FA`` / ``unshR_FA`` (retain
    rows whose value a forget person shares / does not). Numbers as in :func:`format_results_table`.
    """
    columns = tuple(c for c in _PROBE_COLUMNS if any(c[0] in row for row in rows.values()))
    return _format_table(rows, columns, {}) if columns else None


def _format_table(rows, columns, na) -> str:
    head = [_COLUMNS[0][1], "n"] + [short for _, short, _ in columns]
    table = [head]
    single = []
    for name, row in rows.items():
        n, n_seeds = int(row.get("n", 0 if row.get("error") else 1)), int(row.get("n_seeds", 1))
        cells = [name, str(n) if n == n_seeds else f"{n}/{n_seeds}"]
        for key, _, fmt in columns:
            iv = interval_of(row, key)
            cells.append("n/a" if key in na and not row.get("error") else format_interval(iv.mean, iv.half_width, fmt))
        if n == 1:
            single.append(name)
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    lines.insert(1, "-" * len(lines[0]))
    notes = [f"n/a: {short} {na[key]}" for key, short, _ in columns if key in na]
    for name, row in rows.items():
        if row.get("error"):
            notes.append(f"{name}: FAILED ({row['error']})")
        for seed, err in (row.get("failed_seeds") or {}).items():
            if not row.get("error"):
                notes.append(f"{name}: FAILED on seed {seed} ({err}); aggregated over the other {row.get('n')}")
    if len(single) == len(table) - 1:
        notes.append("one seed: no intervals (a ± needs n >= 2)")
    else:
        notes.append("x ± h: mean over n seeds ± the 95% Student-t half-width t(0.975, n-1)*s/sqrt(n)"
                     + (f"; n = 1 (no interval): {', '.join(single)}" if single else ""))
    return "\n".join(lines + notes)


def plot_forget_vs_utility(rows: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> str:
    """Forget quality (log scale) against model utility, one labelled point per method.

    A point is the mean over seeds; where a row has intervals (:func:`jaxunlearn.stats.aggregate_rows`)
    bars show them (on the log axis a forget-quality interval reaching zero or below is drawn
    two decades down from the mean). Where no row has a forget quality (data without the
    truth-ratio columns) the x axis is the forget answer probability (linear), and where none has
    a model utility the y axis is the retain answer probability (``retain_probability``).

    Args:
      rows: ``{name: row}`` (aggregated or plain :func:`summarize` rows).
      path: the PNG to write (atomically).

    Returns:
      ``path`` as a string.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def some(key):
        return any(np.isfinite(interval_of(row, key).mean) for row in rows.values())

    x_key = "forget_quality" if some("forget_quality") else "forget_probability"
    y_key = "model_utility" if some("model_utility") else "retain_probability"
    log_x = x_key == "forget_quality"
    fig, ax = plt.subplots(figsize=(7, 5))
    floor = 1e-30 if log_x else -np.inf
    for name, row in rows.items():
        fq, mu = interval_of(row, x_key), interval_of(row, y_key)
        if not (np.isfinite(fq.mean) and np.isfinite(mu.mean)):
            continue
        x = max(fq.mean, floor)
        marker = "*" if name in ("target", "reference") else "o"
        xerr = yerr = None
        if np.isfinite(fq.half_width):
            low = fq.low if fq.low > 0 or not log_x else x / 100.0  # log axis: a bound <= 0 two decades down
            xerr = [[x - low], [fq.half_width]]
        if np.isfinite(mu.half_width):
            yerr = [[mu.half_width], [mu.half_width]]
        if xerr is not None or yerr is not None:
            ax.errorbar([x], [mu.mean], xerr=xerr, yerr=yerr, fmt="none", elinewidth=0.8, capsize=2, alpha=0.6)
        ax.scatter([x], [mu.mean], marker=marker, s=80 if marker == "*" else 36)
        ax.annotate(name, (x, mu.mean), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if log_x:
        ax.set_xscale("log")
        ax.set_xlabel("forget quality (KS p-value vs reference, log scale)")
    else:
        ax.set_xlabel("forget answer probability (lower = more forgotten; forget quality n/a)")
    ax.set_ylabel("model utility" if y_key == "model_utility" else "retain answer probability (model utility n/a)")
    ax.set_title(f"jaxunlearn: {'forget quality' if log_x else 'forget probability'} vs "
                 f"{'model utility' if y_key == 'model_utility' else 'retain probability'} (mean, 95% interval over seeds)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path, dpi=120)


def plot_pareto(sweep: Mapping[str, Any], path: str | os.PathLike, *, epsilon: float | None = None,
                target: Mapping[str, Any] | None = None) -> str:
    """One panel per method: FA@bf16, RA@bf16 and Q-INT4 (= FA@int4) against the swept knob.

    The x axis is the knob's value (log scale when every value is positive and they span more
    than a factor 3); a dotted line marks ``epsilon`` (the certificate threshold) and a dashed
    one the target's FA@bf16 (where nothing is forgotten). Points whose run failed are left out.
    Written through a temporary file (matplotlib's Agg backend).

    Args:
      sweep: ``results["sweep"]`` of :func:`jaxunlearn.durability_bench.run_durability`.
      path: the PNG to write.
      epsilon: the certificate threshold to mark (None: no line).
      target: ``results["target"]`` (None: no target line).

    Returns:
      ``path`` as a string.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sweep.get("methods", {})
    n = max(len(methods), 1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    series = (("bf16", "fa", "FA@bf16", "C0", "o-"), ("int4", "fa", "Q-INT4 (FA@int4)", "C3", "s--"),
              ("bf16", "ra", "RA@bf16", "C2", "^-"))
    for ax, (m, entry) in zip(axes.ravel(), methods.items()):
        pts = [p for p in entry["points"] if "precisions" in p]
        xs = [p["value"] for p in pts]
        for prec, key, label, color, style in series:
            ys = [p["precisions"].get(prec, {}).get(key) for p in pts]
            if any(y is not None for y in ys):
                ax.plot(xs, [math.nan if y is None else y for y in ys], style, color=color, label=label, ms=4)
        if xs and min(xs) > 0 and max(xs) / min(xs) > 3:
            ax.set_xscale("log")
        if epsilon is not None:
            ax.axhline(epsilon, color="k", ls=":", lw=0.8, label=f"epsilon={epsilon:g}")
        if target is not None and "bf16" in target.get("precisions", {}):
            ax.axhline(target["precisions"]["bf16"]["fa"], color="0.5", ls="--", lw=0.8, label="target FA@bf16")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel(entry["knob"], fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(methods):]:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    fig.suptitle(f"durability sweep (seed {sweep.get('seed')}): FA / RA / Q-INT4 vs each method's knob", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return _save_figure(fig, path)


def _save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> str:
    """Write ``fig`` to ``path`` atomically (a temporary name, then a rename) and close it."""
    import matplotlib.pyplot as plt

    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return os.fspath(path)


def plot_relearn(rows: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> str | None:
    """The relearning attack's curves: held-out forget answer probability against attack steps.

    One line per row that has the curve columns ``relearn_p_step<s>``
    (:func:`jaxunlearn.eval.probes.relearn_probe`): the mean over seeds, with its 95% interval as a
    band where the row has one. The reference's line is what the fine-tune alone teaches about
    the held-out people; a method whose line climbs toward the target's only suppressed them.

    Args:
      rows: ``{name: row}`` (aggregated or plain rows).
      path: the PNG to write (atomically).

    Returns:
      ``path`` as a string, or None (nothing written) when no row has the curve.
    """
    prefix = "relearn_p_step"
    curves = {}
    for name, row in rows.items():
        steps = sorted(int(k[len(prefix):]) for k in row if k.startswith(prefix) and k[len(prefix):].isdigit())
        if steps:
            curves[name] = steps
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, steps in curves.items():
        ivs = [interval_of(rows[name], f"{prefix}{s}") for s in steps]
        mean = np.array([iv.mean for iv in ivs])
        style = {"reference": dict(color="black", ls="--"), "target": dict(color="gray", ls=":")}.get(name, {})
        ax.plot(steps, mean, marker="o", ms=3, label=name, **style)
        half = np.array([iv.half_width for iv in ivs])
        if np.all(np.isfinite(half)):
            ax.fill_between(steps, mean - half, mean + half, alpha=0.15, color=ax.lines[-1].get_color())
    ax.set_xlabel("relearning attack steps (AdamW on half of the forget people)")
    ax.set_ylabel("held-out forget answer probability")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save_figure(fig, path)
