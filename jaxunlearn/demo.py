"""``make demo``: the embedded default end to end, offline, on CPU.

Generates the synthetic benchmark, trains the target and the reference model
from scratch, prints per split the mean answer probability, answer-token
accuracy and fact-token accuracy of both, and writes

- ``<out>/results.json``: the configuration, the training curves and the table;
- ``<out>/data``: the benchmark and its tokenizer (``jaxunlearn.data.load_benchmark``);
- ``<out>/models/{target,reference}``: Hugging Face checkpoints (``from_pretrained``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

import datasets

from jaxunlearn.data import save_benchmark
from jaxunlearn.models import count_params, save_pretrained
from jaxunlearn.pipeline import DemoConfig, evaluate_splits, prepare_data, train_pair, write_json_atomic

__all__ = ["run_demo", "format_table"]

SPLITS = ("forget10", "retain90", "general", "holdout")
METRICS = (("probability", "prob"), ("token_acc", "tok_acc"), ("fact_acc", "fact_acc"))


def format_table(results: dict[str, dict[str, dict[str, float]]], splits) -> str:
    """A fixed-width table: one row per split, a column per (model, metric)."""
    models = list(results)
    head = ["split"] + [f"{m}:{short}" for m in models for _, short in METRICS]
    rows = [head]
    for s in splits:
        rows.append([s] + [f"{results[m][s].get(key, float('nan')):.3f}" for m in models for key, _ in METRICS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def run_demo(out_dir: str = "results/demo", *, cfg: DemoConfig | None = None, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Run the demo; returns the results dict also written to ``out_dir/results.json``.

    Raises ``FileExistsError`` if ``out_dir`` exists and ``overwrite`` is False.
    """
    cfg = cfg or DemoConfig()
    if os.path.exists(out_dir):
        if not overwrite:
            raise FileExistsError(f"results directory '{out_dir}' exists (pass --overwrite to replace it)")
        shutil.rmtree(out_dir)
    t0 = time.perf_counter()
    data = prepare_data(cfg)
    splits = (data.forget_split, data.retain_split, "general", "holdout")
    t_data = time.perf_counter() - t0
    trained = train_pair(cfg, data, progress=progress)
    t_train = time.perf_counter() - t0 - t_data
    table = {name: evaluate_splits(model, data.encoded, splits) for name, (model, _) in trained.items()}
    t_total = time.perf_counter() - t0
    os.makedirs(out_dir, exist_ok=True)
    datasets.disable_progress_bars()
    save_benchmark(os.path.join(out_dir, "data"), data.dataset, data.tokenizer)
    for name, (model, _) in trained.items():
        save_pretrained(model, os.path.join(out_dir, "models", name), tokenizer=data.tokenizer)
    results = {
        "config": dataclasses.asdict(cfg),
        "num_params": count_params(trained["target"][0]),
        "max_length": data.max_length,
        "split_sizes": {s: len(data.dataset[s]) for s in data.dataset},
        "history": {name: hist for name, (_, hist) in trained.items()},
        "metrics": table,
        "seconds": {"data": t_data, "train": t_train, "total": t_total},
    }
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    print(f"\njaxunlearn demo: {results['num_params']:,}-parameter decoder, {cfg.train.steps} steps per model, "
          f"{t_total:.0f} s\n")
    print(format_table(table, splits))
    print(f"\nprob = exp(-mean answer NLL); tok_acc = answer-token accuracy; fact_acc = accuracy on the tokens "
          f"that carry the fact.\nThe reference never saw the {data.forget_split} people: its fact_acc there "
          f"is the chance level.\nwrote {os.path.join(out_dir, 'results.json')}")
    return results
