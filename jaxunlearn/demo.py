"""``make demo``: the embedded default end to end, offline, on CPU.

Generates the synthetic benchmark (TOFU-shaped QA and, unless ``DemoConfig(muse=False)``,
MUSE-shaped passages and KnowMem QA about the same people: :mod:`jaxunlearn.pipeline`), trains
the target and the reference model from scratch, prints per split the mean answer probability,
answer-token accuracy and fact-token accuracy of both, then runs every unlearning method of
``experiments/configs`` on the target (:mod:`jaxunlearn.benchmark`) and prints
one results table (TOFU's columns, then MUSE's KnowMem, VerbMem and PrivLeak for every
model): each method run with ``seeds`` seeds, every number a mean with its 95%
interval over them (:mod:`jaxunlearn.stats`). The default, :data:`DEMO_SEEDS` = 1, keeps the
demo short and gives no intervals; pass ``seeds=3`` to compare methods. By default the seeds
vary the unlearning only (batch order, importance subsets: :mod:`jaxunlearn.benchmark`) on one
trained pair; ``train_seeds`` retrains the target and the reference per seed as well (their
initialisation and training batch order; each seed then costs about one more demo's training).
The benchmark's data are generated from ``cfg.seed`` and fixed across seeds. It writes

- ``<out>/results.json``: the configuration, the seeds, the training curves, both tables, and
  the benchmark details (every method's row per seed; per-example forget truth ratios of every
  method per seed and of the reference);
- ``<out>/forget_vs_utility.png``: forget quality against model utility;
- ``<out>/data``: the benchmark and its tokenizer (``jaxunlearn.data.load_benchmark``);
- ``<out>/muse``: its MUSE data (``jaxunlearn.data.muse.load_muse``; ``jaxunlearn bench --muse``);
- ``<out>/models/{target,reference}``: Hugging Face checkpoints (``from_pretrained``) of the
  pair trained with ``cfg`` (the first seed's).
"""

from __future__ import annotations

import dataclasses
import os
import time

import datasets
import numpy as np

from typing import Sequence

from jaxunlearn.adapters import LoraConfig
from jaxunlearn.benchmark import (
    DEFAULT_METHODS,
    benchmark_methods,
    format_results_table,
    load_method_configs,
    plot_forget_vs_utility,
    seed_list,
)
from jaxunlearn.data import save_benchmark
from jaxunlearn.results_table import format_probe_table, plot_relearn
from jaxunlearn.data.muse import save_muse
from jaxunlearn.models import count_params, save_pretrained
from jaxunlearn.method_configs import method_config_to_dict
from jaxunlearn.outputs import check_output_dir, staged_dir, write_json_atomic
from jaxunlearn.pipeline import DemoConfig, PreparedData, evaluate_splits, prepare_data, train_pair

__all__ = ["run_demo", "format_table", "DEMO_SEEDS"]

# Unlearning seeds of a plain `jaxunlearn demo` / `make demo`: one, so that `make demo` stays under 10 minutes
# on a 2-core CPU including the install (measured 2026-12-01 on a fresh clone: 8 min 53 s; 446 s in the demo,
# 160 s of it training the pair and 279 s unlearning and evaluating the 19 methods with the probes; every
# further seed adds about those 279 s). A single-seed table says it has no intervals; compare with `--seeds 3`.
DEMO_SEEDS = 1

SPLITS = ("forget10", "retain90", "general", "holdout")
METRICS = (("probability", "prob"), ("token_acc", "tok_acc"), ("fact_acc", "fact_acc"))


_MUSE_NOTE = ("\nMUSE: KnowMem_f / KnowMem_r = ROUGE-L F1 of the greedy answers to the forget / retain KnowMem "
              "questions (forget: lower = forgotten);\nVerbMem_f = ROUGE-L F1 of the greedy continuation of the "
              "forget passages (the reference's level is what the templates alone give);\nPrivLeak = (AUC - AUC_ref) "
              "/ AUC_ref x 100 of the passage Min-k (k=0.4) AUC forget vs holdout (0 = as the reference, "
              "-100 = fully leaked, > 0 = over-unlearned).")


_PROBE_NOTE = ("\nrelearn_p0 / relearn_p = answer probability of the held-out half of the forget people before / "
               "after 10 AdamW steps on the other half\n(the reference's row: what that fine-tune alone teaches); "
               "relearn_rec = (relearn_p - relearn_p0) / (target's p - relearn_p0),\nthe share of the forgotten "
               "probability the attack brings back. Fact accuracy on the overlap splits: mixF_FA / mixR_FA = the\n"
               "forget / retain person's fact in a query joining a forget and a retain question (lower mixF = "
               "forgotten, mixR should stay);\nshrR_FA / unshR_FA = retain rows whose value a forget person "
               "shares / does not share.")


def format_table(results: dict[str, dict[str, dict[str, float]]], splits) -> str:
    """A fixed-width table: one row per split, a column per (model, metric); a metric no split
    has (``fact_acc`` of data without a fact mask) is left out."""
    models = list(results)
    metrics = [(k, short) for k, short in METRICS
               if any(np.isfinite(results[m][s].get(k, np.nan)) for m in models for s in splits)]
    head = ["split"] + [f"{m}:{short}" for m in models for _, short in metrics]
    rows = [head]
    for s in splits:
        rows.append([s] + [f"{results[m][s].get(key, float('nan')):.3f}" for m in models for key, _ in metrics])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def run_demo(out_dir: str = "results/demo", *, cfg: DemoConfig | None = None, overwrite: bool = False,
             progress: bool = True, methods: Sequence[str] | None = None, configs_dir: str | None = None,
             rouge_examples: int = 32, seeds: int = DEMO_SEEDS, train_seeds: bool = False,
             adapter: LoraConfig | None = None, data: PreparedData | None = None,
             source: dict | None = None) -> dict:
    """Run the demo; returns the results dict also written to ``out_dir/results.json``.

    Args:
      out_dir: results directory. Checked before any work; written into a temporary sibling
        and swapped into place at the end (a killed run leaves an existing ``out_dir`` as it
        was); a non-empty directory jaxunlearn did not write is never replaced.
      cfg: sizes of the embedded default.
      overwrite: replace an existing ``out_dir`` written by jaxunlearn (else ``FileExistsError``).
      progress: progress bars.
      methods: unlearning methods to benchmark (config names; default all of
        :data:`jaxunlearn.benchmark.DEFAULT_METHODS`; ``[]`` skips the benchmark).
      configs_dir: where the method configs live (default ``experiments/configs``).
      rouge_examples: rows per split generated for ROUGE-L in the benchmark.
      seeds: run every method with this many seeds, ``cfg.seed, cfg.seed + 1, ...``
        (:func:`jaxunlearn.benchmark.seed_list`); 1: a single run, no intervals.
      train_seeds: also train the target and reference once per seed
        (:func:`jaxunlearn.benchmark.seeded_config`); the split table and the saved models
        are those of the first seed.
      adapter: run every method in adapter space (a LoRA adapter over the frozen target;
        :func:`jaxunlearn.method_configs.with_adapter`).
      data: prepared data of one's own (:func:`jaxunlearn.own_data.prepare_own_data`) instead of
        the synthetic benchmark generated from ``cfg`` (then ``cfg`` gives the model sizes and
        training only, ``cfg.muse`` must be False).
      source: recorded as ``results["source"]`` (where ``data`` came from, its split roles).

    Returns:
      The results dict.

    Raises:
      FileExistsError: ``out_dir`` exists (without ``overwrite``) or was not written by
        jaxunlearn. ValueError: an unknown method, a bad seed count, ``data`` with ``cfg.muse``.
    """
    if data is not None and (cfg is None or cfg.muse):
        raise ValueError("run_demo(data=...) needs a cfg with muse=False (the MUSE passages are synthetic)")
    cfg = cfg or DemoConfig()
    methods = list(DEFAULT_METHODS if methods is None else methods)
    seed_values = seed_list(cfg.seed, seeds)  # a bad count fails before any work
    configs = load_method_configs(methods, configs_dir, adapter)  # unknown names fail before any work
    check_output_dir(out_dir, overwrite=overwrite)
    with staged_dir(out_dir, overwrite=overwrite, command="demo") as tmp:
        results = _run(tmp, cfg, configs, progress, rouge_examples, seed_values, train_seeds, data)
        if source is not None:
            results["source"] = source
            write_json_atomic(os.path.join(tmp, "results.json"), results)
    print(f"wrote {os.path.join(out_dir, 'results.json')}")
    return results


def _run(out_dir, cfg: DemoConfig, configs, progress: bool, rouge_examples: int, seeds: list[int],
         train_seeds: bool, data: PreparedData | None = None) -> dict:
    t0 = time.perf_counter()
    data = prepare_data(cfg) if data is None else data
    splits = tuple(data.eval_roles)
    t_data = time.perf_counter() - t0
    trained = train_pair(cfg, data, progress=progress)
    t_train = time.perf_counter() - t0 - t_data
    table = {name: evaluate_splits(model, data.encoded, splits) for name, (model, _) in trained.items()}
    print(f"\ntarget and reference: {count_params(trained['target'][0]):,}-parameter decoders, "
          f"{cfg.train.steps} steps each, {t_train:.0f} s\n")
    print(format_table(table, splits))
    has_facts = "fact_acc" in format_table(table, splits)
    print("\nprob = exp(-mean answer NLL); tok_acc = answer-token accuracy"
          + (f"; fact_acc = accuracy on the tokens that carry the fact.\nThe reference never saw the "
             f"{data.forget_split} people: its fact_acc there is the chance level." if has_facts else
             f".\nThe reference never saw the {data.forget_split} rows."), flush=True)
    bench = None
    if configs:
        bench = benchmark_methods(cfg, configs, seeds=seeds, train_seeds=train_seeds, progress=progress,
                                  rouge_examples=rouge_examples, trained=trained, data=data,
                                  on_update=lambda partial: write_json_atomic(
                                      os.path.join(out_dir, "results.json"), {"benchmark": partial}))
    t_total = time.perf_counter() - t0
    datasets.disable_progress_bars()
    save_benchmark(os.path.join(out_dir, "data"), data.dataset, data.tokenizer)
    if data.muse is not None:
        save_muse(data.muse, os.path.join(out_dir, "muse"))
    for name, (model, _) in trained.items():
        save_pretrained(model, os.path.join(out_dir, "models", name), tokenizer=data.tokenizer)
    results = {
        "config": dataclasses.asdict(cfg),
        "seeds": seeds,
        "train_seeds": train_seeds,
        "num_params": count_params(trained["target"][0]),
        "max_length": data.max_length,
        "passage_length": data.passage_length,
        "split_sizes": {s: len(data.dataset[s]) for s in data.dataset},
        "history": {name: hist for name, (_, hist) in trained.items()},
        "metrics": table,
        "seconds": {"data": t_data, "train": t_train, "total": t_total},
    }
    if bench is not None:
        results["benchmark"] = bench
        plot = plot_forget_vs_utility(bench["table"], os.path.join(out_dir, "forget_vs_utility.png"))
        results["plot"] = os.path.basename(plot)
        relearn_plot = plot_relearn(bench["table"], os.path.join(out_dir, "relearn.png"))
        if relearn_plot is not None:
            results["relearn_plot"] = os.path.basename(relearn_plot)
        varied = "training and unlearning" if train_seeds else "unlearning"
        what = f"{len(data.dataset[data.forget_split])} QA pairs"
        if data.muse is not None:
            n_qa = len(data.dataset[data.forget_split]) + len(data.knowmem["forget"]["input_ids"])
            what += (f" + {len(data.knowmem['forget']['input_ids'])} KnowMem pairs + {len(data.muse.raw['forget'])} "
                     f"passages in {bench['unlearning_rows']['forget'] - n_qa} windows of {data.max_length} tokens")
        print(f"\nunlearning {data.forget_split} ({what}), "
              f"{len(configs)} methods x {len(seeds)} seed(s) {seeds} (seeds vary the {varied}), "
              f"{bench['seconds_total']:.0f} s\n")
        print(format_results_table(bench["table"], bench.get("not_available")))
        probe_table = format_probe_table(bench["table"])
        print("\nforget_q = KS p-value of forget truth ratios vs the reference (1 = indistinguishable); "
              "utility = TOFU model utility" + ("; retain_p = retain answer probability"
                                                 if "model_utility" in bench.get("not_available", {}) else "")
              + ";\nforget_p = forget answer probability; MIA_AUC = Min-k (k=0.4) "
              "ROC-AUC forget vs holdout (0.5 = no leak);\nint4_rec = forget_p after INT4 fake quantisation "
              "minus before; time_s = unlearning wall time;\nn = seeds aggregated. Two methods differ on a "
              "column only where their intervals separate." + (_MUSE_NOTE if data.muse is not None else ""))
        if probe_table is not None:
            print("\nattacks and overlap (jaxunlearn.eval.probes):\n" + probe_table + _PROBE_NOTE)
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    print(f"\ntotal {t_total:.0f} s")
    return results
