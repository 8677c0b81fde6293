"""The end-to-end unlearning benchmark: every method on one target, one table.

``run_benchmark`` trains (or loads) the target and the reference model of the
embedded synthetic benchmark, evaluates both, then runs each method named by a
config file ``<configs_dir>/<method>.json`` on the target, evaluates the result
TOFU-style and after INT4 fake quantisation, and writes

- ``results.json``: configs used, per-method aggregates, and for every method and the
  reference the per-example forget-set truth ratios (to recompute forget quality);
- ``forget_vs_utility.png``: forget quality against model utility per method;
- the printed table (method, forget quality, model utility, forget probability,
  MIA AUC (Min-k), INT4 forget-probability recovery, wall time).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from jaxunlearn.eval.quant_recovery import forget_metrics, quantization_recovery
from jaxunlearn.eval.runner import EvalResult, encode_eval_splits, evaluate_model, to_jsonable
from jaxunlearn.eval.tofu import forget_quality
from jaxunlearn.method_configs import MethodConfig, load_method_config, method_config_to_dict
from jaxunlearn.methods import UnlearnContext, run_method
from jaxunlearn.models import DecoderFn
from jaxunlearn.outputs import check_output_dir, staged_dir, write_json_atomic
from jaxunlearn.pipeline import DemoConfig, prepare_data, train_pair
from jaxunlearn.tree import check_finite

__all__ = ["DEFAULT_METHODS", "load_method_configs", "summarize", "failed_row", "format_results_table", "plot_forget_vs_utility",
           "run_benchmark", "benchmark_methods", "compare_methods", "write_benchmark", "default_configs_dir"]

DEFAULT_METHODS = ("task_vector", "perta_grad", "perta_fisher", "ssd", "ga", "ga_proj", "grad_diff",
                   "grad_diff_proj", "npo", "npo_proj", "simnpo", "simnpo_proj", "saf", "salun")


def default_configs_dir() -> Path:
    """``experiments/configs`` of the source checkout (or of the current directory)."""
    here = Path(__file__).resolve().parent.parent / "experiments" / "configs"
    return here if here.is_dir() else Path("experiments/configs")


def load_method_configs(methods: Sequence[str],
                        configs_dir: str | os.PathLike | None = None) -> dict[str, MethodConfig]:
    """Read and validate ``<configs_dir>/<method>.json`` for each method (before any model is loaded).

    Returns:
      ``{method: typed config}`` (:func:`jaxunlearn.method_configs.load_method_config`).

    Raises:
      FileNotFoundError: no such directory. ValueError: an unknown method (named, with the
      available ones), a repeated name, or an invalid config (file and key named); TypeError:
      a value of the wrong type (file and key named).
    """
    d = Path(configs_dir) if configs_dir is not None else default_configs_dir()
    if not d.is_dir():
        raise FileNotFoundError(f"method configs directory '{d}' does not exist")
    available = sorted(p.stem for p in d.glob("*.json"))
    out = {}
    for m in methods:
        if m in out:
            raise ValueError(f"method {m!r} is named twice")
        f = d / f"{m}.json"
        if not f.is_file():
            raise ValueError(f"unknown method {m!r}: no config {f} (available: {', '.join(available)})")
        out[m] = load_method_config(f)
    return out


def summarize(result: EvalResult, recovery: Mapping[str, Any] | None, seconds: float | None) -> dict[str, float]:
    """One table row: the headline numbers of an evaluation (and its INT4 recovery)."""
    agg = result.aggregates
    fm = forget_metrics(result)
    row = {
        "forget_quality": float(agg.get("forget_quality", float("nan"))),
        "model_utility": float(agg.get("model_utility", float("nan"))),
        "forget_probability": float(fm["probability"]),
        "forget_truth_ratio": float(fm["truth_ratio"]),
        "mia_auc_min_k": float(agg.get("mia_auc", {}).get("min_k", float("nan"))),
        "privleak_min_k": float(agg.get("privleak", {}).get("min_k", float("nan"))),
        "seconds": float("nan") if seconds is None else float(seconds),
    }
    if recovery is not None and "int4" in recovery:
        row["int4_recovery"] = float(recovery["int4"]["recovery"]["probability"])
    else:
        row["int4_recovery"] = float("nan")
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


def format_results_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A fixed-width text table, one row per method (the order of ``rows``)."""
    table = [[short for _, short, _ in _COLUMNS]]
    for name, row in rows.items():
        cells = [name]
        for key, _, fmt in _COLUMNS[1:]:
            v = row.get(key, float("nan"))
            cells.append("-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt))
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    lines.insert(1, "-" * len(lines[0]))
    failed = [f"{name}: FAILED ({row['error']})" for name, row in rows.items() if row.get("error")]
    return "\n".join(lines + failed)


def plot_forget_vs_utility(rows: Mapping[str, Mapping[str, float]], path: str | os.PathLike) -> str:
    """Scatter of forget quality (log scale) against model utility, one labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, row in rows.items():
        fq, mu = row["forget_quality"], row["model_utility"]
        if not (np.isfinite(fq) and np.isfinite(mu)):
            continue
        marker = "*" if name in ("target", "reference") else "o"
        ax.scatter([max(fq, 1e-30)], [mu], marker=marker, s=80 if marker == "*" else 36)
        ax.annotate(name, (max(fq, 1e-30), mu), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("forget quality (KS p-value vs reference, log scale)")
    ax.set_ylabel("model utility")
    ax.set_title("jaxunlearn: forget quality vs model utility")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return os.fspath(path)


def run_benchmark(
    out_dir: str | os.PathLike = "results/benchmark",
    *,
    cfg: DemoConfig | None = None,
    methods: Sequence[str] | None = None,
    configs_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    rouge_examples: int = 32,
    quant_schemes: Sequence[str] = ("int4",),
    trained: Mapping[str, Any] | None = None,
    data=None,
) -> dict[str, Any]:
    """Run the benchmark; returns the results dict also written to ``out_dir/results.json``.

    Args:
      out_dir: results directory (refused if it exists unless ``overwrite``, and always if
        jaxunlearn did not write it; checked before any work, replaced only at the end:
        :func:`jaxunlearn.outputs.staged_dir`).
      cfg: the embedded default's sizes (:class:`~jaxunlearn.pipeline.DemoConfig`).
      methods: config names under ``configs_dir`` (default :data:`DEFAULT_METHODS`).
      configs_dir: where ``<method>.json`` live (default ``experiments/configs``).
      overwrite: replace an existing ``out_dir``.
      progress: show a progress bar over the whole run.
      rouge_examples: generate for this many rows per split for ROUGE-L.
      quant_schemes: fake-quantisation schemes for the recovery evaluation.
      trained, data: already-trained ``{"target": (model, hist), "reference": ...}`` and its
        :class:`~jaxunlearn.pipeline.PreparedData` (skips generation and training).
    """
    cfg = cfg or DemoConfig()
    methods = list(DEFAULT_METHODS if methods is None else methods)
    configs = load_method_configs(methods, configs_dir)  # fail on a bad name or config before any work
    check_output_dir(out_dir, overwrite=overwrite)
    with staged_dir(out_dir, overwrite=overwrite, command="benchmark") as tmp:
        results = benchmark_methods(cfg, configs, progress=progress, rouge_examples=rouge_examples,
                                    quant_schemes=quant_schemes, trained=trained, data=data,
                                    on_update=lambda partial: write_json_atomic(tmp / "results.json", partial))
        write_benchmark(tmp, results)
    return results


def write_benchmark(out_dir: str | os.PathLike, results: dict[str, Any]) -> None:
    """Write ``results.json`` (complete) and ``forget_vs_utility.png`` into ``out_dir`` (created)."""
    out_dir = Path(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    results["plot"] = os.path.basename(plot_forget_vs_utility(results["table"], out_dir / "forget_vs_utility.png"))
    results["complete"] = True
    write_json_atomic(out_dir / "results.json", results)


def benchmark_methods(
    cfg: DemoConfig,
    configs: Mapping[str, Mapping],
    *,
    progress: bool = True,
    rouge_examples: int = 32,
    quant_schemes: Sequence[str] = ("int4",),
    trained: Mapping[str, Any] | None = None,
    data=None,
    on_update: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The benchmark without file output (see :func:`run_benchmark`); returns the results dict.

    ``on_update(partial_results)`` is called after every method (see :func:`compare_methods`).
    """
    t_start = time.perf_counter()
    bar = tqdm(total=3 + len(configs), desc="benchmark", disable=not progress, dynamic_ncols=True)
    if data is None:
        bar.set_postfix_str("data")
        data = prepare_data(cfg)
    bar.update(1)
    if trained is None:
        trained = train_pair(cfg, data, progress=progress)
    bar.update(1)
    tok = data.tokenizer
    fs, rs = data.forget_split, data.retain_split
    roles = {fs: "forget", rs: "retain", "general": "general", "holdout": "holdout"}
    enc = encode_eval_splits(tok, {s: data.dataset[s] for s in roles}, roles=roles)
    ev = dict(forget=fs, retain=rs, general="general", holdout="holdout", rouge_examples=rouge_examples)
    target, reference = trained["target"][0], trained["reference"][0]
    fn, params = DecoderFn.of(target)
    ctx = UnlearnContext(fn, params, data.encoded[fs], data.encoded[rs], seed=cfg.seed)
    head = {"demo_config": to_jsonable(cfg), "method_configs": {m: method_config_to_dict(c) for m, c in configs.items()},
            "forget_split": fs, "retain_split": rs}
    update = None if on_update is None else (lambda partial: on_update({**head, **partial, "complete": False}))
    out = compare_methods(target, reference, tok, enc, ev, ctx, configs, quant_schemes=quant_schemes, bar=bar,
                          on_update=update)
    bar.close()
    return {**head, **out, "seconds_total": time.perf_counter() - t_start}


def compare_methods(
    target,
    reference,
    tokenizer,
    encoded: Mapping[str, Any],
    eval_kwargs: Mapping[str, Any],
    ctx: UnlearnContext,
    configs: Mapping[str, Mapping],
    *,
    quant_schemes: Sequence[str] = ("int4",),
    bar=None,
    on_update: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate the target (and reference), then run each method on ``ctx`` and evaluate it.

    A method that fails -- raises, or returns parameters with NaN/Inf -- does not stop the
    run: its row (:func:`failed_row`) carries ``"error"`` (the reason, naming the first
    non-finite leaf) and NaN numbers, and the next method runs. ``KeyboardInterrupt`` still
    stops everything.

    The core of :func:`benchmark_methods` for any models and data: every method of
    ``configs`` (``{name: config}``, as :func:`load_method_configs` returns) is run by
    :func:`jaxunlearn.methods.run_method` from the target's parameters in ``ctx``, evaluated
    by :func:`jaxunlearn.eval.runner.evaluate_model` (forget quality against the reference's
    evaluation) and by :func:`jaxunlearn.eval.quant_recovery.quantization_recovery` after
    fake quantisation (``quant_schemes``; forget-side metrics only).

    Args:
      target: the model to unlearn (its parameters are ``ctx.params``).
      reference: the model never trained on the forget split, or None (then no forget quality).
      tokenizer: the models' tokenizer.
      encoded: :func:`jaxunlearn.eval.runner.encode_eval_splits` output.
      eval_kwargs: ``evaluate_model`` keywords (``forget``, ``retain``, ``general``, ``holdout``,
        ``rouge_examples``).
      ctx: the unlearning context (target parameters, forget/retain training encodings, seed, mesh).
      configs: method name -> config.
      quant_schemes: fake-quantisation schemes for the recovery evaluation (may be empty).
      bar: an optional tqdm bar, advanced once for the target/reference and once per method.
      on_update: called with the results so far (same keys as the return value) after the
        target and after every method, e.g. to write them incrementally.

    Returns:
      ``{"table": {name: row}, "forget_truth_ratios": {name: [...]}, "details": {...}}``:
      one :func:`summarize` row each for ``reference`` (if given), ``target`` and the methods.
    """
    fs = eval_kwargs["forget"]
    ev = dict(eval_kwargs)
    holdout = ev.get("holdout")
    if bar is not None:
        bar.set_postfix_str("evaluate target/reference")
    rows: dict[str, dict] = {}
    truth_ratios: dict[str, list] = {}
    details: dict[str, Any] = {}
    ref_res = None
    if reference is not None:
        ref_res = evaluate_model(reference, tokenizer, encoded, **ev)
        rows["reference"] = summarize(ref_res, None, None)
        ref_tr = ref_res.splits[fs]["truth_ratio"]
        rows["reference"]["forget_quality"] = float(forget_quality(ref_tr, ref_tr))  # 1 against itself
        truth_ratios["reference"] = ref_tr.tolist()
        details["reference"] = {"aggregates": to_jsonable(ref_res.aggregates)}

    def evaluate(name, params, seconds):
        res = evaluate_model(target, tokenizer, encoded, params=params, reference=ref_res, **ev)
        rec = None
        if quant_schemes:
            rec = quantization_recovery(target, tokenizer, encoded, forget=fs, holdout=holdout, schemes=quant_schemes,
                                        params=params, reference=ref_res, baseline=res, rouge_examples=0)
        rows[name] = summarize(res, rec, seconds)
        truth_ratios[name] = res.splits[fs]["truth_ratio"].tolist()
        details[name] = {"aggregates": to_jsonable(res.aggregates), "quant": rec}

    def snapshot():
        return {"table": rows, "forget_truth_ratios": truth_ratios, "details": to_jsonable(details),
                "failed": {m: r["error"] for m, r in rows.items() if r.get("error")}}

    evaluate("target", None, None)
    if bar is not None:
        bar.update(1)
    if on_update is not None:
        on_update(snapshot())
    for m, cfg in configs.items():
        if bar is not None:
            bar.set_postfix_str(m)
        t0 = time.perf_counter()
        try:
            new_params = _block(run_method(ctx, cfg))
            seconds = time.perf_counter() - t0
            check_finite(new_params, f"the parameters {m} returned")
            evaluate(m, new_params, seconds)
        except Exception as e:  # recorded in the method's row; the other methods still run
            rows[m] = failed_row(e, time.perf_counter() - t0)
            details[m] = {"error": rows[m]["error"]}
        if bar is not None:
            bar.update(1)
        if on_update is not None:
            on_update(snapshot())
    return snapshot()


def _block(tree):
    import jax

    return jax.block_until_ready(tree)

