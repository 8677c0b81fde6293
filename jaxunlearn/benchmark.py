"""The end-to-end unlearning benchmark: every method on one target, one table.

``run_benchmark`` trains (or loads) the target and the reference model of the
embedded synthetic benchmark, evaluates both, then runs each method named by a
config file ``<configs_dir>/<method>.json`` on the target, evaluates the result
TOFU-style and after INT4 fake quantisation, and writes

- ``results.json``: configs used, the seeds, every method's row per seed, per-method
  aggregates over seeds (means and 95% intervals), and for every method (per seed) and the
  reference the per-example forget-set truth ratios (to recompute forget quality);
- ``forget_vs_utility.png``: forget quality against model utility per method (means, with
  interval bars);
- the printed table (method, seeds aggregated, forget quality, model utility, forget
  probability, MIA AUC (Min-k), INT4 forget-probability recovery, with MUSE data MUSE's KnowMem
  forget / retain, VerbMem forget and PrivLeak, wall time), each number a mean over seeds with
  its 95% Student-t half-width (:mod:`jaxunlearn.stats`; rows and table:
  :mod:`jaxunlearn.results_table`).

MUSE. With MUSE data (``DemoConfig.muse``, :mod:`jaxunlearn.pipeline`) every model is also
evaluated by :func:`jaxunlearn.eval.muse.muse_eval` (:data:`MUSE_EVAL`), PrivLeak against the
reference's passage AUC (the reference's own PrivLeak is 0, as its forget quality is 1), and
the methods unlearn every training row about the forget people -- QA rows, KnowMem pairs and
the passages cut into windows of the QA rows' length (:func:`jaxunlearn.pipeline.unlearning_sets`)
-- with the retain people's rows as their retain set.

Seeds. Each method runs once per seed ``s`` from the same target parameters, with
``UnlearnContext.seed = s``. That seed is all the randomness a method has (no method draws
random noise: SAM's and SAF's perturbations are deterministic functions of the gradient), and
it controls exactly:

- gradient methods (GA, GradDiff, NPO, SimNPO, their projected forms, SAF, SalUn): the order of
  the forget batches (seed ``s``) and of the retain batches (seed ``s + 1``),
  :func:`jaxunlearn.train.batch_at`; with a batch as large as the set only the order of the
  rows inside the one batch changes (a floating-point-summation difference);
- ``task_vector`` and ``perta``: the order of the fine-tuning batches on the forget set;
- ``perta`` and ``ssd``: the rows of each importance set subsampled to
  ``max_importance_examples`` (a set no larger than that is used whole, whatever the seed);
- SalUn's saliency mask: the same subsampling rule (its forget set is used whole).

A method whose inputs the seed does not touch gives identical rows on every seed (a zero-width
interval). The benchmark's data are fixed across seeds; :func:`benchmark_methods` can also
retrain the target and the reference per seed (``train_seeds``: the initialisation and the
training batch order), the only way model-training noise enters the intervals.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from tqdm.auto import tqdm

from jaxunlearn.eval.mia import privleak
from jaxunlearn.eval.probes import PROBES, benchmark_probes
from jaxunlearn.eval.muse import muse_eval
from jaxunlearn.eval.quant_recovery import quantization_recovery
from jaxunlearn.eval.runner import encode_eval_splits, evaluate_model, to_jsonable
from jaxunlearn.eval.tofu import forget_quality
from jaxunlearn.adapters import LoraConfig
from jaxunlearn.method_configs import MethodConfig, load_method_config, method_config_to_dict, with_adapter
from jaxunlearn.methods import UnlearnContext, run_method
from jaxunlearn.models import DecoderFn
from jaxunlearn.outputs import check_output_dir, staged_dir, write_json_atomic
from jaxunlearn.pipeline import DemoConfig, prepare_data, train_pair, unlearning_sets
from jaxunlearn.results_table import (failed_row, format_results_table, plot_forget_vs_utility, plot_relearn,
                                     summarize)
from jaxunlearn.stats import DEFAULT_SEEDS, aggregate_rows
from jaxunlearn.tree import check_finite

__all__ = ["DEFAULT_METHODS", "load_method_configs", "summarize", "failed_row", "format_results_table", "plot_forget_vs_utility",
           "run_benchmark", "benchmark_methods", "compare_methods", "write_benchmark", "default_configs_dir",
           "seed_list", "seeded_config", "DEFAULT_SEEDS", "MUSE_EVAL"]

DEFAULT_METHODS = ("task_vector", "perta_fisher", "ssd", "ga", "grad_diff", "grad_diff_proj", "npo", "npo_proj",
                   "simnpo", "saf", "salun", "wga", "undial", "idk_nll", "idk_dpo", "rmu", "npo_pruned", "npo_l1",
                   "npo_lwf", "npo_fit")
#: Configs shipped beside the defaults, run on request (``--methods``): variants close to a default
#: (PerTA with gradient importances, GA and SimNPO with the projection), left out of ``make demo``'s budget.
EXTRA_METHODS = ("perta_grad", "ga_proj", "simnpo_proj")
#: ``muse_eval`` keywords of the benchmark on the synthetic MUSE data: MUSE's 32-token KnowMem
#: budget, and 64 VerbMem tokens instead of 128 (the synthetic continuations are at most 45 tokens,
#: so the cut targets are whole; decoding stops at the EOS the passages were trained with).
MUSE_EVAL: dict[str, Any] = {"knowmem_max_new_tokens": 32, "verbmem_max_new_tokens": 64}


def seed_list(base: int, count: int) -> list[int]:
    """The seeds of a ``count``-seed run: ``base, base + 1, ..., base + count - 1`` (the first is the
    single-seed run's, so its rows equal those of a run with ``count = 1``).

    Raises:
      ValueError: ``count < 1`` or ``base < 0``; TypeError: not ints.
    """
    from jaxunlearn.validate import check_int

    check_int("", "seeds", count, min=1)
    check_int("", "seed", base, min=0)
    return [int(base) + i for i in range(int(count))]


def seeded_config(cfg: DemoConfig, seed: int) -> DemoConfig:
    """``cfg`` for training the pair with ``seed``: the model initialisation (``cfg.seed`` as
    :func:`~jaxunlearn.pipeline.train_pair` reads it) becomes ``seed`` and the training batch
    order ``cfg.train.seed + (seed - cfg.seed)``; ``seeded_config(cfg, cfg.seed) == cfg``. Pass it to
    ``train_pair`` with data prepared from ``cfg`` (the data stay those of ``cfg.seed``)."""
    shift = int(seed) - cfg.seed
    return dataclasses.replace(cfg, seed=int(seed), train=dataclasses.replace(cfg.train, seed=cfg.train.seed + shift))


def default_configs_dir() -> Path:
    """``experiments/configs`` of the source checkout (or of the current directory)."""
    here = Path(__file__).resolve().parent.parent / "experiments" / "configs"
    return here if here.is_dir() else Path("experiments/configs")


def load_method_configs(methods: Sequence[str], configs_dir: str | os.PathLike | None = None,
                        adapter: LoraConfig | None = None) -> dict[str, MethodConfig]:
    """Read and validate ``<configs_dir>/<method>.json`` for each method (before any model is loaded).

    With ``adapter`` every config runs in adapter space
    (:func:`jaxunlearn.method_configs.with_adapter`; a method without an adapter form is an error).

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
        out[m] = with_adapter(load_method_config(f), adapter, f"method {m!r}")
    return out


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
    seeds: int = DEFAULT_SEEDS,
    train_seeds: bool = False,
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
      seeds: how many seeds (``cfg.seed``, ``cfg.seed + 1``, ...; :func:`seed_list`).
      train_seeds: also retrain the target and reference per seed (see :func:`benchmark_methods`).
      trained, data: already-trained ``{"target": (model, hist), "reference": ...}`` and its
        :class:`~jaxunlearn.pipeline.PreparedData` (skips generation and training; with
        ``train_seeds``, ``trained`` is the first seed's pair).
    """
    cfg = cfg or DemoConfig()
    methods = list(DEFAULT_METHODS if methods is None else methods)
    seed_values = seed_list(cfg.seed, seeds)
    configs = load_method_configs(methods, configs_dir)  # fail on a bad name or config before any work
    check_output_dir(out_dir, overwrite=overwrite)
    with staged_dir(out_dir, overwrite=overwrite, command="benchmark") as tmp:
        results = benchmark_methods(cfg, configs, seeds=seed_values, train_seeds=train_seeds, progress=progress,
                                    rouge_examples=rouge_examples, quant_schemes=quant_schemes, trained=trained,
                                    data=data,
                                    on_update=lambda partial: write_json_atomic(tmp / "results.json", partial))
        write_benchmark(tmp, results)
    return results


def write_benchmark(out_dir: str | os.PathLike, results: dict[str, Any]) -> None:
    """Write ``results.json`` (complete), ``forget_vs_utility.png`` and, when the rows have the relearning
    curve, ``relearn.png`` into ``out_dir`` (created)."""
    out_dir = Path(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    results["plot"] = os.path.basename(plot_forget_vs_utility(results["table"], out_dir / "forget_vs_utility.png"))
    relearn_plot = plot_relearn(results["table"], out_dir / "relearn.png")
    if relearn_plot is not None:
        results["relearn_plot"] = os.path.basename(relearn_plot)
    results["complete"] = True
    write_json_atomic(out_dir / "results.json", results)


def benchmark_methods(
    cfg: DemoConfig,
    configs: Mapping[str, Mapping],
    *,
    seeds: Sequence[int] | None = None,
    train_seeds: bool = False,
    progress: bool = True,
    rouge_examples: int = 32,
    quant_schemes: Sequence[str] = ("int4",),
    trained: Mapping[str, Any] | None = None,
    data=None,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    probes: Sequence[str] = PROBES,
) -> dict[str, Any]:
    """The benchmark without file output (see :func:`run_benchmark`); returns the results dict.

    Args:
      cfg: the embedded default's sizes; its data are generated from ``cfg.seed`` whatever the seeds.
      configs: method name -> config.
      seeds: the seeds (default ``[cfg.seed]``); every method runs once per seed (:func:`compare_methods`).
      train_seeds: also train the target and reference once per seed, with :func:`seeded_config`
        (initialisation and training batch order), and unlearn each pair with its own seed; the
        reference and target rows then vary over seeds too. ``trained`` (if given) must be the
        pair of ``seeds[0]``. Off: one pair (``trained``, or trained with ``cfg``) for all seeds.
      progress, rouge_examples, quant_schemes, trained, data: as in :func:`run_benchmark`.
      on_update: ``on_update(partial_results)`` after every method (see :func:`compare_methods`).
      probes: the extra evaluations of every model (:func:`jaxunlearn.eval.probes.benchmark_probes`:
        ``"relearn"``, ``"overlap"``); those the data cannot support are named in
        ``results["probes_not_available"]``.
    """
    t_start = time.perf_counter()
    seeds = [cfg.seed] if seeds is None else list(seeds)
    pairs = seeds if train_seeds else seeds[:1]
    bar = tqdm(total=2 + len(pairs) * (2 + len(configs) * (1 if train_seeds else len(seeds))), desc="benchmark",
               disable=not progress, dynamic_ncols=True)
    if data is None:
        bar.set_postfix_str("data")
        data = prepare_data(cfg)
    bar.update(1)
    tok = data.tokenizer
    fs, rs = data.forget_split, data.retain_split
    roles = data.eval_roles
    enc = encode_eval_splits(tok, {s: data.dataset[s] for s in roles}, roles=roles)
    # the synthetic answers are at most 17 tokens: generate twice the longest answer (None), not
    # the reference's 200 (same greedy text up to the answer, 6x less generation time)
    ev = dict(forget=fs, retain=rs, general=list(data.general_splits) or None, holdout=data.holdout_split,
              rouge_examples=rouge_examples, max_new_tokens=None)
    forget, retain = unlearning_sets(data)
    head = {"demo_config": to_jsonable(cfg), "method_configs": {m: method_config_to_dict(c) for m, c in configs.items()},
            "forget_split": fs, "retain_split": rs, "train_seeds": bool(train_seeds),
            "unlearning_rows": {"forget": len(forget["input_ids"]), "retain": len(retain["input_ids"])},
            "muse_eval": dict(MUSE_EVAL) if data.muse is not None else None, "probes": list(probes)}
    bar.update(1)
    done: list[dict[str, Any]] = []
    for i, s in enumerate(pairs):
        pair = trained if i == 0 and trained is not None else None
        if pair is None:
            bar.set_postfix_str(f"train seed {s}" if train_seeds else "train")
            pair = train_pair(seeded_config(cfg, s) if train_seeds else cfg, data, progress=progress)
        bar.update(1)
        target, reference = pair["target"][0], pair["reference"][0]
        fn, params = DecoderFn.of(target)
        ctx = UnlearnContext(fn, params, forget, retain, seed=s)
        probe_fns, head["probes_not_available"] = benchmark_probes(data, fn, params, probes, seed=s)

        def update(partial, done=done, s=s):
            if on_update is not None:
                on_update({**head, **_merge(done + [_label(partial, s if train_seeds else None)]), "complete": False})

        out = compare_methods(target, reference, tok, enc, ev, ctx, configs, seeds=[s] if train_seeds else seeds,
                              quant_schemes=quant_schemes, bar=bar, on_update=update, muse=data.muse,
                              muse_kwargs=MUSE_EVAL, probes=probe_fns)
        done.append(_label(out, s if train_seeds else None))
    bar.close()
    return {**head, **_merge(done), "seconds_total": time.perf_counter() - t_start}


def _label(results: dict[str, Any], train_seed: int | None) -> dict[str, Any]:
    """Mark the seed-independent rows (reference, target) as trained with ``train_seed``."""
    if train_seed is not None:
        for rows in results["per_seed"].values():
            for row in rows:
                if row.get("seed") is None:
                    row["seed"] = train_seed
    return results


def _merge(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate per-seed results of several :func:`compare_methods` calls and re-aggregate."""
    if len(parts) == 1:
        return _results(parts[0]["seeds"], parts[0]["per_seed"], parts[0]["forget_truth_ratios"],
                        parts[0]["details"])
    seeds, per_seed, ratios, details = [], {}, {}, {}
    for p in parts:
        seeds += [s for s in p["seeds"] if s not in seeds]
        for name in p["per_seed"]:
            per_seed.setdefault(name, []).extend(p["per_seed"][name])
            ratios.setdefault(name, []).extend(p["forget_truth_ratios"][name])
            details.setdefault(name, []).extend(p["details"][name])
    return _results(seeds, per_seed, ratios, details)


def _results(seeds, per_seed, ratios, details) -> dict[str, Any]:
    return {"seeds": list(seeds),
            "table": {name: aggregate_rows(rows) for name, rows in per_seed.items()},
            "per_seed": per_seed,
            "forget_truth_ratios": ratios,
            "details": to_jsonable(details),
            "failed": {name: {str(r["seed"]): r["error"] for r in rows if r.get("error")}
                       for name, rows in per_seed.items() if any(r.get("error") for r in rows)},
            "not_available": {k: v for rows in per_seed.values() for r in rows
                              for k, v in (r.get("not_available") or {}).items()}}


def compare_methods(
    target,
    reference,
    tokenizer,
    encoded: Mapping[str, Any],
    eval_kwargs: Mapping[str, Any],
    ctx: UnlearnContext,
    configs: Mapping[str, Mapping],
    *,
    seeds: Sequence[int] | None = None,
    quant_schemes: Sequence[str] = ("int4",),
    bar=None,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    muse=None,
    muse_kwargs: Mapping[str, Any] | None = None,
    probes: Mapping[str, Callable[[Any], Mapping[str, float]]] | None = None,
) -> dict[str, Any]:
    """Evaluate the target (and reference), then run each method on ``ctx`` once per seed and evaluate it.

    A method that fails on a seed -- raises, or returns parameters with NaN/Inf -- does not
    stop the run: that seed's row (:func:`failed_row`) carries ``"error"`` (the reason, naming
    the first non-finite leaf) and NaN numbers, the method's aggregate is over the seeds that
    succeeded (its ``n``), and the next seed or method runs. ``KeyboardInterrupt`` still stops
    everything.

    The core of :func:`benchmark_methods` for any models and data: every method of
    ``configs`` (``{name: config}``, as :func:`load_method_configs` returns) is run by
    :func:`jaxunlearn.methods.run_method` from the target's parameters in ``ctx`` with
    ``ctx.seed`` set to each seed (what a seed changes: this module's docstring), evaluated
    by :func:`jaxunlearn.eval.runner.evaluate_model` (forget quality against the reference's
    evaluation) and by :func:`jaxunlearn.eval.quant_recovery.quantization_recovery` after
    fake quantisation (``quant_schemes``; forget-side metrics only) and, given ``muse``, by
    :func:`jaxunlearn.eval.muse.muse_eval` (PrivLeak against the reference's; the reference's own
    PrivLeak is ``privleak(AUC_ref, AUC_ref) = 0``). The same inputs and seeds on the same machine
    give bitwise the same numbers (all but the wall times).

    Args:
      target: the model to unlearn (its parameters are ``ctx.params``).
      reference: the model never trained on the forget split, or None (then no forget quality).
      tokenizer: the models' tokenizer.
      encoded: :func:`jaxunlearn.eval.runner.encode_eval_splits` output.
      eval_kwargs: ``evaluate_model`` keywords (``forget``, ``retain``, ``general``, ``holdout``,
        ``rouge_examples``).
      ctx: the unlearning context (target parameters, forget/retain training encodings, mesh).
      configs: method name -> config.
      seeds: the seeds, distinct ints >= 0 (default ``[ctx.seed]``).
      quant_schemes: fake-quantisation schemes for the recovery evaluation (may be empty).
      bar: an optional tqdm bar, advanced once for the target/reference and once per method and seed.
      on_update: called with the results so far (same keys as the return value) after the
        target and after every method (all its seeds), e.g. to write them incrementally.
      muse: a :class:`~jaxunlearn.data.muse.MuseData` to add MUSE's columns to every row
        (:func:`~jaxunlearn.results_table.summarize`), or None.
      muse_kwargs: ``muse_eval`` keywords (e.g. :data:`MUSE_EVAL`).
      probes: ``{name: probe}``, each ``probe(params) -> {column: float}``
        (:mod:`jaxunlearn.eval.probes`: the relearning attack, the overlap splits, REMIND), run
        on the reference's, the target's and every method's parameters; their columns join the
        row (a probe that raises fails that seed's row like the method itself).

    Returns:
      ``{"seeds", "table", "per_seed", "forget_truth_ratios", "details", "failed"}``:
      ``per_seed[name]`` one :func:`summarize` row per run with its ``"seed"`` (None for the
      reference and target, evaluated once); ``table[name]`` their aggregate
      (:func:`jaxunlearn.stats.aggregate_rows`: means, ``n``, ``ci95`` half-widths, ``std``,
      ``failed_seeds``); ``forget_truth_ratios[name]`` and ``details[name]`` lists aligned with
      ``per_seed[name]`` (None / the error for a failed seed); ``failed[name]`` ``{seed: reason}``
      for every method with a failed seed.
    """
    seeds = [ctx.seed] if seeds is None else [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct ints >= 0, at least one; got {seeds}")
    fs = eval_kwargs["forget"]
    ev = dict(eval_kwargs)
    holdout = ev.get("holdout")
    if bar is not None:
        bar.set_postfix_str("evaluate target/reference")
    rows: dict[str, list] = {}
    truth_ratios: dict[str, list] = {}

    def run_probes(params) -> dict[str, float]:
        out: dict[str, float] = {}
        for probe in (probes or {}).values():
            out.update({k: float(v) for k, v in probe(params).items()})
        return out

    details: dict[str, list] = {}
    mk = dict(muse_kwargs or {})
    ref_res = ref_muse = None
    if reference is not None:
        ref_res = evaluate_model(reference, tokenizer, encoded, **ev)
        if muse is not None:
            ref_muse = muse_eval(reference, tokenizer, muse, **mk)
            auc = ref_muse["passage_min_k_auc"]
            ref_muse["privleak"] = privleak(auc, auc)  # 0 against itself
        row = {**summarize(ref_res, None, None, ref_muse), **run_probes(DecoderFn.of(reference)[1])}
        ref_tr = ref_res.splits[fs].get("truth_ratio")  # None: the forget split has no truth-ratio columns
        if ref_tr is not None:
            row["forget_quality"] = float(forget_quality(ref_tr, ref_tr))  # 1 against itself
        rows["reference"] = [{**row, "seed": None}]
        truth_ratios["reference"] = [None if ref_tr is None else ref_tr.tolist()]
        details["reference"] = [{"seed": None, "aggregates": to_jsonable(ref_res.aggregates), "muse": ref_muse}]

    def evaluate(name, seed, params, seconds):
        res = evaluate_model(target, tokenizer, encoded, params=params, reference=ref_res, **ev)
        rec = None
        if quant_schemes:
            rec = quantization_recovery(target, tokenizer, encoded, forget=fs, holdout=holdout, schemes=quant_schemes,
                                        params=params, reference=ref_res, baseline=res, rouge_examples=0)
        m = None if muse is None else muse_eval(target, tokenizer, muse, params=params, reference=ref_muse, **mk)
        tr = res.splits[fs].get("truth_ratio")
        extra = run_probes(ctx.params if params is None else params)
        row, tr = {**summarize(res, rec, seconds, m), **extra, "seed": seed}, None if tr is None else tr.tolist()
        detail = {"seed": seed, "aggregates": to_jsonable(res.aggregates), "quant": rec, "muse": m}
        rows.setdefault(name, []).append(row)  # all three lists or none: they stay aligned
        truth_ratios.setdefault(name, []).append(tr)
        details.setdefault(name, []).append(detail)

    def snapshot():
        return _results(seeds, rows, truth_ratios, details)

    evaluate("target", None, None, None)
    if bar is not None:
        bar.update(1)
    if on_update is not None:
        on_update(snapshot())
    for m, cfg in configs.items():
        for seed in seeds:
            if bar is not None:
                bar.set_postfix_str(m if len(seeds) == 1 else f"{m} seed {seed}")
            t0 = time.perf_counter()
            try:
                new_params = _block(run_method(dataclasses.replace(ctx, seed=seed), cfg))
                seconds = time.perf_counter() - t0
                check_finite(new_params, f"the parameters {m} returned")
                evaluate(m, seed, new_params, seconds)
            except Exception as e:  # recorded in the seed's row; the other seeds and methods still run
                row = {**failed_row(e, time.perf_counter() - t0), "seed": seed}
                rows.setdefault(m, []).append(row)
                truth_ratios.setdefault(m, []).append(None)
                details.setdefault(m, []).append({"seed": seed, "error": row["error"]})
            if bar is not None:
                bar.update(1)
        if on_update is not None:
            on_update(snapshot())
    return snapshot()


def _block(tree):
    import jax

    return jax.block_until_ready(tree)
