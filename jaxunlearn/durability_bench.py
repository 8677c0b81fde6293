"""``jaxunlearn durability``: the DurableUn experiment at small scale.

Unlearning in *adapter space* (a LoRA adapter over the NF4-held frozen target, QLoRA-style:
:mod:`jaxunlearn.adapters`), the adapter merged into the full-precision target, and the merged
model *deployed* at BF16, INT8 and INT4 (plus NF4 / FP4): does INT4 deployment restore what was
forgotten (the quantisation recovery attack), and does a method hold the empirical
``(epsilon, P)`` durability certificate ``max_{p in P} FA_p <= epsilon`` over its seeds
(:mod:`jaxunlearn.eval.durability`)? :func:`run_durability` does, in order:

1. **Data.** The synthetic benchmark, QA rows only (``DemoConfig(muse=False)``;
   :func:`jaxunlearn.pipeline.prepare_data`). The methods unlearn the forget split (``forget10``)
   with the retain split (``retain90``) as their retain data
   (:func:`jaxunlearn.pipeline.unlearning_sets`).
2. **Target.** One model trained on retain + forget + general QA (no reference model: in
   adapter space NPO's reference is the frozen base). It is saved as a Hugging Face checkpoint in
   ``out_dir/models/target`` with a record of the :class:`~jaxunlearn.pipeline.DemoConfig` it was
   trained with; a later run with the same configuration (``--overwrite`` into the same
   directory, or ``reuse_from``) loads it instead of training. Its FA / RA at *every* precision
   (fp32, bf16, int8, int4, nf4, fp4) is reported first: the attack only means something when
   ``FA_int4(target) ~= FA_bf16(target)`` (quantising the target does not itself forget).
   ``FA`` of the target on the *holdout* people (never trained on) is reported beside it: the
   level template tokens alone reach, the floor a model that never saw the forget people sits at
   (``holdout_fact_acc``: the same for the fact tokens only; every precision's row also carries the
   forget set's ``forget.fact_acc``, the accuracy on the tokens that carry the fact).
3. **Runs.** Every method config (``experiments/configs/durable/<name>.json``, each with an
   ``"adapter"`` block) x seed: :func:`jaxunlearn.methods.run_method` (the adapter trained over
   the NF4 base, merged into the full-precision target), then
   :func:`~jaxunlearn.eval.durability.evaluate_precisions` at P and the extra precisions. A run
   record is ``{"method", "seed", "adapter", "seconds", **evaluate_precisions(...)}``.
4. **Certificates.** :func:`~jaxunlearn.eval.durability.certificate` of the runs at ``epsilon``
   (default 0.047) and P = (bf16, int8, int4); the table
   (:func:`~jaxunlearn.eval.durability.format_durability_table`: means and 95% Student-t
   intervals over seeds) is printed and written to ``table.md``.
5. **Pareto sweep.** Per method its strength knob (:data:`SWEEP_KNOBS`: the learning rate of a
   gradient method, the negation ``scale`` of a task vector, PerTA's ``strength``) is set to the
   config's value times each of ``sweep_factors``, one seed; FA / RA / Q-INT4 per point go to
   ``results.json["sweep"]`` and ``pareto.png``.

Outputs (``out_dir``, checked before any work, written into a temporary sibling and swapped in at
the end: :mod:`jaxunlearn.outputs`): ``results.json`` (``{"config", "target", "runs", "failed",
"certificates", "summary", "sweep", "table", "seconds", "complete"}``), ``table.md``,
``pareto.png``, ``models/target``.

References:
  DurableUn: "Quantization-Induced Recovery Attacks in Machine Unlearning", 2026 (adapter-space
  unlearning over an NF4 base, deployment at BF16 / INT8 / INT4, the (epsilon, P) certificate,
  SAF).
  Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025.
  Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from jaxunlearn.eval.durability import DEFAULT_EPSILON, DEFAULT_PRECISIONS, FA_METRICS, PRECISIONS
from jaxunlearn.pipeline import DemoConfig
from jaxunlearn.train import TrainConfig
from jaxunlearn.results_table import plot_pareto  # noqa: F401 - re-exported
from jaxunlearn.targets import check_qa_demo, provide_target
from jaxunlearn.validate import check_bool, check_choice, check_float, check_int, check_names

__all__ = ["DurabilityConfig", "DEFAULT_METHODS", "QUICK_METHODS", "SWEEP_KNOBS", "TARGET_DEMO", "QUICK_DEMO",
           "full_config", "quick_config", "default_configs_dir", "load_durable_configs", "sweep_knob",
           "scaled_config", "capped_config", "run_durability", "plot_pareto", "TARGET_RECORD"]

#: Methods of a full run (config names under :func:`default_configs_dir`).
DEFAULT_METHODS: tuple[str, ...] = ("ga", "grad_diff", "npo", "simnpo", "saf", "salun", "task_vector")
#: Methods of ``--quick``: NPO and its SAF variant (same hyperparameters, SAF's estimator).
QUICK_METHODS: tuple[str, ...] = ("npo", "saf")
#: The knob a method kind's Pareto sweep scales: ``(kind) -> dotted key of its config``.
SWEEP_KNOBS: dict[str, str] = {"gradient": "unlearn.learning_rate", "task_vector": "scale", "perta": "strength"}
_EVAL_KEYS = ("precisions", "q_int4", "recovery_ratio", "recovery_delta")
#: File beside the cached target checkpoint: the configuration it was trained with.
TARGET_RECORD = "durability_target.json"

#: The full run's target: a 2-layer, d-64 Llama-style decoder (230k parameters) trained 400 steps
#: on 100 people (80 forget10 QA rows). Measured (``experiments/durability_notes.md``): FA 0.976 at
#: fp32 / bf16, 0.975 at int4; d 32 reaches only 0.88 and d 48 0.94 with the same training.
TARGET_DEMO = DemoConfig(num_people=100, num_general=100, vocab_size=1024, hidden_size=64, intermediate_size=192,
                         num_layers=2, num_heads=4, num_kv_heads=2, muse=False,
                         train=TrainConfig(steps=400, batch_size=64, learning_rate=3e-3, warmup_steps=40))
#: ``--quick``'s target: d 32, 20 people (16 forget rows), 150 steps (a few seconds; FA 1.0 at bf16 and int4).
QUICK_DEMO = DemoConfig(num_people=20, num_general=20, vocab_size=300, hidden_size=32, intermediate_size=64,
                        num_layers=2, num_heads=4, num_kv_heads=2, muse=False,
                        train=TrainConfig(steps=150, batch_size=64, learning_rate=1e-2, warmup_steps=15))


@dataclasses.dataclass(frozen=True)
class DurabilityConfig:
    """What a durability run does (validated at construction, before any work).

    Attributes:
      demo: the benchmark's sizes and the target's training (``muse`` must be False: QA only).
      methods: config names under ``configs_dir`` (each with an ``"adapter"`` block).
      seeds: seeds per method (``demo.seed``, ``demo.seed + 1``, ...), >= 1.
      epsilon: the certificate's FA threshold (>= 0; DurableUn: 0.047).
      precisions: the certificate's deployment set P (DurableUn: bf16, int8, int4).
      extra_precisions: also evaluated on the main runs (not part of P), e.g. nf4, fp4.
      sweep: run the Pareto sweep.
      sweep_factors: the knob's multipliers of the sweep (each > 0).
      max_steps: cap every method's steps (unlearning or fine-tuning) at this (None: as configured).
      configs_dir: where the method configs live (None: :func:`default_configs_dir`).
      eval_batch_size: rows per evaluation batch.
      fa_metric: how FA / RA score an answer (``"exact_match"``, default: reproduced verbatim;
        ``"token"``: the fraction of its tokens; :func:`~jaxunlearn.eval.durability.evaluate_precisions`).
    """

    demo: DemoConfig = TARGET_DEMO
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: int = 3
    epsilon: float = DEFAULT_EPSILON
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    extra_precisions: tuple[str, ...] = ("nf4", "fp4")
    sweep: bool = True
    sweep_factors: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 4.0)
    max_steps: int | None = None
    configs_dir: str | None = None
    eval_batch_size: int = 128
    fa_metric: str = "exact_match"

    def __post_init__(self):
        o = "DurabilityConfig"
        check_qa_demo(o, self.demo, "the durability run is QA-only")
        object.__setattr__(self, "methods", check_names(o, "methods", self.methods))
        check_int(o, "seeds", self.seeds, min=1)
        object.__setattr__(self, "epsilon", check_float(o, "epsilon", self.epsilon, min=0.0))
        for name in ("precisions", "extra_precisions"):
            ps = getattr(self, name)
            if isinstance(ps, str) or any(p not in PRECISIONS for p in ps):
                raise ValueError(f"{o}.{name} must be precisions among {PRECISIONS}, got {ps!r}")
            object.__setattr__(self, name, tuple(ps))
        if not self.precisions:
            raise ValueError(f"{o}.precisions (the certificate's set P) is empty")
        if len(set(self.precisions + self.extra_precisions)) != len(self.precisions) + len(self.extra_precisions):
            raise ValueError(f"{o}: a precision is repeated in precisions + extra_precisions "
                             f"({list(self.precisions + self.extra_precisions)})")
        check_bool(o, "sweep", self.sweep)
        check_choice(o, "fa_metric", self.fa_metric, FA_METRICS)
        object.__setattr__(self, "sweep_factors", tuple(check_float(o, "sweep_factors", f, min=0.0,
                                                                    min_exclusive=True)
                                                        for f in self.sweep_factors))
        if self.sweep and not self.sweep_factors:
            raise ValueError(f"{o}.sweep_factors is empty with sweep=True")
        if self.max_steps is not None:
            check_int(o, "max_steps", self.max_steps, min=1)
        check_int(o, "eval_batch_size", self.eval_batch_size, min=1)

    @property
    def seed_values(self) -> list[int]:
        """``demo.seed, demo.seed + 1, ..., demo.seed + seeds - 1``."""
        return [self.demo.seed + i for i in range(self.seeds)]

    @property
    def eval_precisions(self) -> tuple[str, ...]:
        """P followed by the extra precisions: what the main runs are evaluated at."""
        return self.precisions + self.extra_precisions


def full_config(**overrides) -> DurabilityConfig:
    """The full run: :data:`TARGET_DEMO`, :data:`DEFAULT_METHODS`, 3 seeds, nf4/fp4 as extra
    precisions, a 6-point sweep (factors 0.1, 0.2, 0.5, 1, 2, 4); ``overrides`` replace fields."""
    return DurabilityConfig(**overrides)


def quick_config(**overrides) -> DurabilityConfig:
    """``--quick``: :data:`QUICK_DEMO`, :data:`QUICK_METHODS`, 2 seeds, every method capped at
    10 steps, P only (no extra precisions), a 2-point sweep (factors 0.3, 1); ``overrides``
    replace fields. A few minutes at most on 2 CPU cores."""
    base = dict(demo=QUICK_DEMO, methods=QUICK_METHODS, seeds=2, extra_precisions=(), sweep_factors=(0.3, 1.0),
                max_steps=10)
    return DurabilityConfig(**{**base, **overrides})


def default_configs_dir() -> Path:
    """``experiments/configs/durable`` of the source checkout (or of the current directory)."""
    here = Path(__file__).resolve().parent.parent / "experiments" / "configs" / "durable"
    return here if here.is_dir() else Path("experiments/configs/durable")


def load_durable_configs(methods: Sequence[str], configs_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read and validate ``<configs_dir>/<method>.json`` for each method; each must unlearn in
    adapter space.

    Returns:
      ``{method: typed config}`` (:func:`jaxunlearn.benchmark.load_method_configs`).

    Raises:
      FileNotFoundError: no such directory. ValueError: an unknown method (the available ones
      named), an invalid config (file and key named), or a config without an ``"adapter"``
      block (or of a kind that has none, e.g. ``ssd``).
    """
    from jaxunlearn.benchmark import load_method_configs

    d = Path(configs_dir) if configs_dir is not None else default_configs_dir()
    configs = load_method_configs(methods, d)
    for m, c in configs.items():
        if getattr(c, "adapter", None) is None:
            raise ValueError(f"method config '{d / (m + '.json')}' has no \"adapter\" block: the durability run "
                             "unlearns in adapter space (add e.g. \"adapter\": {\"rank\": 8, \"alpha\": 16, "
                             "\"base\": \"nf4\"}; kinds gradient, task_vector and perta take one)")
    return configs


def sweep_knob(cfg) -> str:
    """The dotted key the Pareto sweep scales for a method config (:data:`SWEEP_KNOBS` by kind)."""
    return SWEEP_KNOBS[cfg.kind]


def _get(obj: Mapping, dotted: str):
    for k in dotted.split("."):
        obj = obj[k]
    return obj


def _set(obj: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for k in head:
        obj = obj[k]
    obj[last] = value


def scaled_config(cfg, factor: float) -> tuple[dict[str, Any], float]:
    """``(config dict, value)``: ``cfg`` with its sweep knob (:func:`sweep_knob`) multiplied by ``factor``.

    The dict is the JSON form (:func:`jaxunlearn.method_configs.method_config_to_dict`), ready for
    :func:`jaxunlearn.methods.run_method`; ``value`` is the knob's new value.
    """
    from jaxunlearn.method_configs import method_config_to_dict

    d = method_config_to_dict(cfg)
    knob = sweep_knob(cfg)
    value = float(_get(d, knob)) * float(factor)
    _set(d, knob, value)
    return d, value


def capped_config(cfg, max_steps: int | None) -> Any:
    """``cfg`` with its steps (``unlearn.steps`` or ``finetune.steps``) capped at ``max_steps``
    (unchanged when None), re-validated (:func:`jaxunlearn.method_configs.parse_method_config`)."""
    from jaxunlearn.method_configs import method_config_to_dict, parse_method_config

    if max_steps is None:
        return cfg
    d = method_config_to_dict(cfg)
    for key in ("unlearn", "finetune"):
        if isinstance(d.get(key), dict) and "steps" in d[key]:
            d[key]["steps"] = min(int(d[key]["steps"]), int(max_steps))
    return parse_method_config(d)


def _jsonable(x):
    from jaxunlearn.eval.runner import to_jsonable

    return to_jsonable(x)


def _config_record(cfg: DurabilityConfig, configs: Mapping[str, Any]) -> dict[str, Any]:
    from jaxunlearn.method_configs import method_config_to_dict

    return {"demo": _jsonable(dataclasses.asdict(cfg.demo)), "methods": list(cfg.methods), "seeds": cfg.seed_values,
            "epsilon": cfg.epsilon, "precisions": list(cfg.precisions),
            "extra_precisions": list(cfg.extra_precisions), "sweep": cfg.sweep,
            "sweep_factors": list(cfg.sweep_factors), "max_steps": cfg.max_steps,
            "configs_dir": str(Path(cfg.configs_dir) if cfg.configs_dir else default_configs_dir()),
            "method_configs": {m: method_config_to_dict(c) for m, c in configs.items()},
            "sweep_knobs": {m: sweep_knob(c) for m, c in configs.items()}}


# =========================================================================== the run

def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def _fa_line(res: Mapping[str, Any]) -> str:
    return " ".join(f"{p} {v['fa']:.3f}/{v['ra']:.3f}" for p, v in res["precisions"].items())


def run_durability(
    out_dir: str | os.PathLike,
    cfg: DurabilityConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    reuse_from: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run the durability experiment (module docstring) and write ``out_dir``; returns the results.

    Every input is checked before any work: the method configs (unknown name, invalid config, no
    ``"adapter"`` block), the configuration (:class:`DurabilityConfig`: ``epsilon >= 0``,
    ``seeds >= 1``, ...) and ``out_dir`` (:func:`jaxunlearn.outputs.check_output_dir`: an
    existing non-empty directory is refused unless ``overwrite``, and always when jaxunlearn did
    not write it).

    A method run that raises (e.g. diverges to NaN) is recorded in ``results["failed"]``
    (``{"method", "seed", "error"}``) and left out of the certificates; the other runs go on.

    Args:
      out_dir: the results directory.
      cfg: the run's configuration (default :func:`full_config`).
      overwrite: replace an existing ``out_dir`` written by jaxunlearn.
      progress: print progress lines (and the training progress bar).
      reuse_from: a directory holding a cached target (``<dir>/models/target`` of an earlier
        durability run, or the checkpoint directory itself); used when it was trained with
        ``cfg.demo``. ``out_dir/models/target`` is always tried too.

    Returns:
      ``{"config", "target", "runs", "failed", "certificates", "summary", "sweep", "table",
      "seconds", "complete"}`` (also ``out_dir/results.json``); ``target`` is
      ``{"precisions": {p: {"fa", "ra", ...}}, "q_int4", "recovery_ratio", "holdout_fa",
      "holdout_fact_acc", "num_params", "reused", "train_seconds", "history"}``; ``certificates`` is
      :func:`jaxunlearn.eval.durability.certificate` of ``runs``; ``sweep`` is
      ``{"seed", "precisions", "methods": {m: {"knob", "base", "points": [{"factor", "value",
      "precisions", "q_int4", "recovery_ratio", "recovery_delta", "seconds", "from_run"}]}}}``; ``from_run``: the factor-1 point at the sweep seed, taken from the main run) (``{}``
      without the sweep).

    Raises:
      ValueError / TypeError / FileNotFoundError / FileExistsError: bad inputs, before any work.

    References:
      DurableUn, "Quantization-Induced Recovery Attacks in Machine Unlearning", 2026;
      Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025.
    """
    from jaxunlearn.outputs import check_output_dir, staged_dir

    cfg = full_config() if cfg is None else cfg
    if not isinstance(cfg, DurabilityConfig):
        raise TypeError(f"run_durability: cfg must be a DurabilityConfig, got {type(cfg).__name__}")
    overwrite = check_bool("run_durability", "overwrite", overwrite)
    configs = load_durable_configs(cfg.methods, cfg.configs_dir)  # bad names / configs fail before any work
    configs = {m: capped_config(c, cfg.max_steps) for m, c in configs.items()}
    out = check_output_dir(out_dir, overwrite=overwrite)
    caches = [out / "models" / "target"]
    if reuse_from is not None:
        r = Path(reuse_from)
        caches = [r / "models" / "target", r] + caches
    with staged_dir(out, overwrite=overwrite, command="durability") as tmp:
        results = _run(tmp, cfg, configs, caches, progress)
    _log(progress, f"wrote {out / 'results.json'}")
    return results


def _run(tmp: Path, cfg: DurabilityConfig, configs: Mapping[str, Any], caches: Sequence[Path],
         progress: bool) -> dict[str, Any]:
    import jax

    from jaxunlearn.eval.durability import certificate, evaluate_precisions
    from jaxunlearn.eval.durability_table import durability_summary, format_durability_table
    from jaxunlearn.eval.splits import encode_eval_splits
    from jaxunlearn.methods import UnlearnContext, run_method
    from jaxunlearn.models import DecoderFn, count_params
    from jaxunlearn.outputs import write_json_atomic
    from jaxunlearn.pipeline import prepare_data, unlearning_sets
    from jaxunlearn.tree import check_finite

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    data = prepare_data(cfg.demo)
    tok, fs, rs = data.tokenizer, data.forget_split, data.retain_split
    seconds["data"] = time.perf_counter() - t_start

    # ---- the target: cached or trained, then its FA at every precision
    t0 = time.perf_counter()
    model, cached, history = provide_target(tmp / "models" / "target", caches, data, cfg.demo, kind="durability",
                                            record_file=TARGET_RECORD, log=lambda m: _log(progress, m),
                                            progress=progress)
    seconds["target"] = time.perf_counter() - t0

    roles = {fs: "forget", rs: "retain", "holdout": "holdout"}
    enc = encode_eval_splits(tok, {s: data.dataset[s] for s in roles}, roles=roles)
    ev = dict(forget=fs, retain=rs, batch_size=cfg.eval_batch_size, fa_metric=cfg.fa_metric)
    t0 = time.perf_counter()
    target = evaluate_precisions(model, tok, enc, precisions=PRECISIONS, **ev)
    holdout = evaluate_precisions(model, tok, enc, forget="holdout", retain=rs, precisions=("bf16",),
                                  batch_size=cfg.eval_batch_size, fa_metric=cfg.fa_metric)
    target.update(holdout_fa=holdout["precisions"]["bf16"]["fa"],
                  holdout_fact_acc=holdout["precisions"]["bf16"]["forget"].get("fact_acc"),
                  num_params=count_params(model),
                  reused=cached is not None, train_seconds=None if cached is not None else seconds["target"],
                  history=_jsonable(history))
    seconds["target_eval"] = time.perf_counter() - t0
    _log(progress, f"target FA/RA per precision: {_fa_line(target)}; FA on the unseen holdout people "
                   f"{target['holdout_fa']:.3f}")

    fn, params = DecoderFn.of(model)
    forget, retain = unlearning_sets(data)
    head = {"config": _config_record(cfg, configs), "target": target,
            "data": {"forget_split": fs, "retain_split": rs, "forget_rows": len(forget["input_ids"]),
                     "retain_rows": len(retain["input_ids"]), "max_length": data.max_length}}
    runs: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    sweep: dict[str, Any] = {}

    def snapshot(complete: bool) -> dict[str, Any]:
        return {**head, "runs": runs, "failed": failed, "sweep": sweep, "seconds": dict(seconds),
                "complete": complete}

    def one(method: str, seed: int, c, precisions) -> tuple[dict[str, Any] | None, float]:
        t = time.perf_counter()
        try:
            ctx = UnlearnContext(fn, params, forget, retain, seed=seed)
            new = jax.block_until_ready(run_method(ctx, c))
            elapsed = time.perf_counter() - t
            check_finite(new, f"the parameters {method} returned")
            return evaluate_precisions(model, tok, enc, params=new, precisions=precisions, **ev), elapsed
        except (ValueError, FloatingPointError, ArithmeticError) as e:
            failed.append({"method": method, "seed": seed, "error": f"{type(e).__name__}: {e}"})
            _log(progress, f"  {method} seed {seed}: FAILED ({type(e).__name__}: {e})")
            return None, time.perf_counter() - t

    # ---- main runs
    t0 = time.perf_counter()
    for m, c in configs.items():
        adapter = _jsonable(dataclasses.asdict(c.adapter))
        for s in cfg.seed_values:
            res, elapsed = one(m, s, c, cfg.eval_precisions)
            if res is not None:
                runs.append({"method": m, "seed": s, "adapter": adapter, "seconds": elapsed, **res})
                _log(progress, f"  {m} seed {s} ({elapsed:.1f} s): FA/RA {_fa_line(res)}")
        write_json_atomic(tmp / "results.json", snapshot(False))
    seconds["runs"] = time.perf_counter() - t0

    # ---- certificates and table
    certificates: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    table = table_md = "(no successful runs)"
    if runs:
        certificates = certificate(runs, epsilon=cfg.epsilon, precisions=cfg.precisions)
        summary = durability_summary(runs, epsilon=cfg.epsilon, precisions=cfg.precisions,
                                     show=cfg.eval_precisions)
        kw = dict(epsilon=cfg.epsilon, precisions=cfg.precisions, show=cfg.eval_precisions)
        table, table_md = format_durability_table(runs, **kw), format_durability_table(runs, markdown=True, **kw)
    notes = [f"failed: {f['method']} seed {f['seed']} ({f['error']})" for f in failed]
    fas = ", ".join(f"{p} {v['fa']:.3f}" for p, v in target["precisions"].items())
    target_line = f"target (before unlearning): FA {fas}; FA on the unseen holdout people {target['holdout_fa']:.3f}"
    table = "\n".join([table, target_line] + notes)
    table_md = "\n".join([table_md, "", target_line] + notes) + "\n"
    head.update(certificates=certificates, summary=summary, table=table)
    (tmp / "table.md").write_text(table_md)
    _log(progress, "\n" + table + "\n")
    write_json_atomic(tmp / "results.json", snapshot(False))

    # ---- Pareto sweep (one seed)
    if cfg.sweep:
        t0 = time.perf_counter()
        seed = cfg.seed_values[0]
        sweep.update(seed=seed, precisions=list(cfg.precisions), factors=list(cfg.sweep_factors), methods={})
        for m, c in configs.items():
            knob = sweep_knob(c)
            entry = {"knob": knob, "base": float(_get(_config_dict(c), knob)), "points": []}
            sweep["methods"][m] = entry
            for f in cfg.sweep_factors:
                d, value = scaled_config(c, f)
                same = [r for r in runs if r["method"] == m and r["seed"] == seed] if f == 1.0 else []
                if same:  # the configured point at the sweep's seed: the main run already made it
                    res, elapsed = {k: same[0][k] for k in _EVAL_KEYS if k in same[0]}, same[0]["seconds"]
                    res["precisions"] = {p: same[0]["precisions"][p] for p in cfg.precisions}
                else:
                    res, elapsed = one(f"{m}[{knob}={value:g}]", seed, d, cfg.precisions)
                point = {"factor": float(f), "value": value, "seconds": elapsed, "from_run": bool(same)}
                if res is None:
                    point["error"] = failed[-1]["error"]
                else:
                    point.update(res)
                    _log(progress, f"  sweep {m} {knob}={value:g}: FA/RA {_fa_line(res)}")
                entry["points"].append(point)
            write_json_atomic(tmp / "results.json", snapshot(False))
        plot_pareto(sweep, tmp / "pareto.png", epsilon=cfg.epsilon, target=target)
        head["plot"] = "pareto.png"
        seconds["sweep"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    results = snapshot(True)
    write_json_atomic(tmp / "results.json", results)
    _log(progress, f"total {seconds['total']:.0f} s")
    return results


def _config_dict(c) -> dict[str, Any]:
    from jaxunlearn.method_configs import method_config_to_dict

    return method_config_to_dict(c)
