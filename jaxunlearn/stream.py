"""Streams of deletion requests: a method applied request by request, evaluated after each.

Real deployments receive many deletion requests over time (FIT, 2026; the continual setting of the
intention-oriented unlearning survey): utility can degrade as requests accumulate, and what earlier
requests removed can resurface. :func:`run_stream` measures both on the embedded benchmark:

1. **Requests.** The forget split is cut into ``R`` sequential requests (:func:`split_requests`: by
   subject, the ``person`` column, so one person's rows stay in one request; seeded).
2. **Target.** One model trained on retain + forget + general QA (``DemoConfig(muse=False)``,
   :func:`jaxunlearn.pipeline.prepare_data`), cached in ``out_dir/models/target`` with a record of
   its :class:`~jaxunlearn.pipeline.DemoConfig`; ``reuse_from`` (``--reuse-target``) reloads a
   target trained the same way.
3. **Runs** (:func:`run_requests`). Per method (a config of ``experiments/configs``, optionally
   with a continual method, ``"npo+lwf"``), request ``r`` runs
   :func:`jaxunlearn.methods.run_method` from the parameters request ``r - 1`` left, on that
   request's forget rows only (``cumulative=False``, as FIT) or on every request so far. A
   continual method's state (:mod:`jaxunlearn.continual`: the running Fisher and anchor, FIT's
   layer choice) is carried between requests and enters as ``run_method(regularizer=...)``.
4. **Reports**, after every request (:func:`make_evaluator`): forget metrics on the current
   request and on all earlier ones (pooled, and per request), utility on the retain and general
   splits, the INT4 quantisation recovery of the earlier requests
   (:func:`jaxunlearn.eval.durability.deploy` at bf16 and int4, ``FA_int4 / FA_bf16``) and,
   with ``relearn_steps > 0``, their relearning recovery (:mod:`jaxunlearn.eval.relearn`: a
   fine-tune on half of the earlier requests' people, the recovered fraction of the other half's
   answer probability relative to the target). ``fa`` is the exact-match rate (answers reproduced
   verbatim under greedy teacher forcing, as :func:`~jaxunlearn.eval.durability.evaluate_precisions`),
   ``probability`` the mean answer probability, ``fact_acc`` the accuracy on fact tokens.

Outputs (checked before any work, staged and swapped in at the end: :mod:`jaxunlearn.outputs`):
``results.json``, ``table.md`` (:func:`format_stream_table`), ``stream.png`` (:func:`plot_stream`),
``models/target``.

References:
  Xu et al., "FIT: Defying Catastrophic Forgetting in Continual LLM Unlearning", 2026.
  Hu et al., "Jogging the Memory of Unlearned LLMs Through Targeted Relearning Attacks", 2024.
  Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from jaxunlearn.continual import ContinualConfig, finish_request, parse_continual, plan_request, start_state
from jaxunlearn.pipeline import DemoConfig
from jaxunlearn.train import TrainConfig
from jaxunlearn.targets import check_qa_demo, provide_target
from jaxunlearn.validate import check_bool, check_choice, check_float, check_int, check_names

__all__ = ["StreamConfig", "STREAM_SIZES", "DEFAULT_METHODS", "TARGET_RECORD", "split_requests", "parse_method_spec",
           "StreamRun", "run_requests", "summarize_split", "make_evaluator", "run_stream", "format_stream_table",
           "plot_stream"]

#: The default methods: NPO, GradDiff, SAF (``experiments/configs``) and NPO with the Fisher anchor.
DEFAULT_METHODS: tuple[str, ...] = ("npo", "grad_diff", "saf", "npo+lwf")
#: Target sizes. ``quick``: 50 people (5 forget people), d 32, 200 steps; ``small``: the durability
#: run's target (100 people, 10 forget people, d 64, 400 steps; ``durability_bench.TARGET_DEMO``).
STREAM_SIZES: dict[str, DemoConfig] = {
    "quick": DemoConfig(num_people=50, num_general=20, vocab_size=400, hidden_size=32, intermediate_size=64,
                        num_layers=2, num_heads=4, num_kv_heads=2, muse=False,
                        train=TrainConfig(steps=200, batch_size=64, learning_rate=1e-2, warmup_steps=20)),
    "small": DemoConfig(num_people=100, num_general=100, vocab_size=1024, hidden_size=64, intermediate_size=192,
                        num_layers=2, num_heads=4, num_kv_heads=2, muse=False,
                        train=TrainConfig(steps=400, batch_size=64, learning_rate=3e-3, warmup_steps=40)),
}
#: File beside the cached target checkpoint: the configuration it was trained with.
TARGET_RECORD = "stream_target.json"


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """What a stream run does (validated at construction, before any work).

    Attributes:
      demo: the benchmark's sizes and the target's training (``muse`` must be False: QA only).
      methods: ``"name"`` or ``"name+kind"`` (kind ``lwf`` / ``fit`` / ``none``), names of method
        configs under ``configs_dir``.
      requests: number of sequential requests R (>= 2).
      cumulative: a request also sees the earlier requests' forget rows (default: only its own).
      continual: ``{kind: ContinualConfig field dict}`` overriding a continual kind's defaults.
      max_steps: cap every method's steps per request (None: as configured).
      relearn_steps / relearn_lr: steps (0: off) and learning rate of the relearning attack on the
        earlier requests (1e-3: 1e-4, ``RelearnConfig``'s default, moves nothing back in 10 steps here).
      eval_rows: retain rows evaluated (a seeded subset; the general split is evaluated whole).
      configs_dir, eval_batch_size: the method configs (None: ``experiments/configs``); rows per
        evaluation batch.
    """

    demo: DemoConfig = STREAM_SIZES["small"]
    methods: tuple[str, ...] = DEFAULT_METHODS
    requests: int = 5
    cumulative: bool = False
    continual: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    max_steps: int | None = None
    relearn_steps: int = 0
    relearn_lr: float = 1e-3
    eval_rows: int = 200
    configs_dir: str | None = None
    eval_batch_size: int = 64

    def __post_init__(self):
        o = "StreamConfig"
        check_qa_demo(o, self.demo, "the stream splits the QA forget rows by person")
        object.__setattr__(self, "methods", check_names(o, "methods", self.methods))
        for m in self.methods:
            parse_method_spec(m)
        check_int(o, "requests", self.requests, min=2)
        check_bool(o, "cumulative", self.cumulative)
        for kind, over in self.continual.items():
            parse_continual({**over, "kind": kind})
        if self.max_steps is not None:
            check_int(o, "max_steps", self.max_steps, min=1)
        check_int(o, "relearn_steps", self.relearn_steps, min=0)
        check_float(o, "relearn_lr", self.relearn_lr, min=0.0, min_exclusive=True)
        check_int(o, "eval_rows", self.eval_rows, min=1)
        check_int(o, "eval_batch_size", self.eval_batch_size, min=1)

    def continual_config(self, kind: str | None) -> ContinualConfig | None:
        """The :class:`~jaxunlearn.continual.ContinualConfig` of ``kind`` with this run's overrides."""
        return None if kind is None else parse_continual({**self.continual.get(kind, {}), "kind": kind})


def parse_method_spec(spec: str) -> tuple[str, str | None]:
    """``(config name, continual kind or None)``; ValueError for an empty name or an unknown kind (named).

    >>> parse_method_spec("npo+lwf"), parse_method_spec("npo"), parse_method_spec("npo+none")
    (('npo', 'lwf'), ('npo', None), ('npo', None))
    """
    name, _, kind = spec.partition("+")
    if not name:
        raise ValueError(f"method {spec!r}: empty config name")
    kind = kind or None
    if kind not in (None, "none", "lwf", "fit"):
        raise ValueError(f"method {spec!r}: unknown continual method {kind!r} (lwf, fit or none)")
    return name, None if kind == "none" else kind


def split_requests(n: int, num_requests: int, *, seed: int = 0, groups: Sequence[Any] | None = None) -> list[np.ndarray]:
    """Cut ``n`` rows into ``num_requests`` disjoint, sorted, non-empty requests covering every row.

    With ``groups`` (a subject per row, e.g. the person a question is about) whole groups are dealt:
    the ``G`` groups in a seeded random order are cut into ``num_requests`` consecutive runs of
    ``floor(G/R)`` or ``ceil(G/R)`` groups (``np.array_split``), so a subject's rows are all in one
    request. Without, the rows themselves are.

    Raises:
      ValueError: ``num_requests < 2``, fewer groups (rows) than requests, ``groups`` of the wrong length.

    >>> [r.tolist() for r in split_requests(4, 2, seed=0, groups=["a", "b", "a", "b"])] in ([[0, 2], [1, 3]], [[1, 3], [0, 2]])
    True
    """
    check_int("split_requests", "num_requests", num_requests, min=2)
    labels = np.arange(n) if groups is None else np.asarray(groups, dtype=object)
    if len(labels) != n:
        raise ValueError(f"split_requests: groups has {len(labels)} labels for {n} rows")
    uniq = list(dict.fromkeys(labels.tolist()))
    if len(uniq) < num_requests:
        what = "subjects" if groups is not None else "rows"
        raise ValueError(f"cannot split {len(uniq)} {what} into {num_requests} requests: lower --requests "
                         f"or use more {what} (e.g. a larger --size)")
    index = {u: i for i, u in enumerate(uniq)}
    row_group = np.array([index[x] for x in labels.tolist()], dtype=np.int64)
    parts = np.array_split(np.random.default_rng(seed).permutation(len(uniq)), num_requests)
    return [np.nonzero(np.isin(row_group, part))[0] for part in parts]


class StreamRun(NamedTuple):
    """What :func:`run_requests` returns: the final parameters, one report per request, the final
    continual state (None without a Fisher-carrying method)."""

    params: Any
    reports: list
    state: Any


def run_requests(ctx, requests: Sequence[np.ndarray], cfg, *, continual: ContinualConfig | str | None = None,
                 cumulative: bool = False, evaluate: Callable[[int, Any], Mapping[str, Any]] | None = None,
                 unlearn: Callable | None = None, log: Callable[[str], None] | None = None) -> StreamRun:
    """Apply a method request by request, each starting from the previous request's result.

    Request ``r`` gets ``ctx`` with ``params`` = the result of request ``r - 1`` (the target for
    ``r = 0``), ``forget`` = the rows of ``requests[r]`` (of ``requests[:r+1]`` with ``cumulative``)
    and ``seed = ctx.seed + r``. A continual method (``"lwf"``, ``"fit"`` or a
    :class:`~jaxunlearn.continual.ContinualConfig`; it needs kind ``gradient``) starts from
    :func:`~jaxunlearn.continual.start_state`, plans each request
    (:func:`~jaxunlearn.continual.plan_request`) and updates its state after it
    (:func:`~jaxunlearn.continual.finish_request`). ``evaluate(r, params) -> dict`` is merged into
    request ``r``'s report; ``unlearn(ctx, cfg, regularizer=...)`` runs a request (default
    :func:`jaxunlearn.methods.run_method`); ``log`` takes progress lines.

    Returns:
      :class:`StreamRun`; a report is ``{"request": r, "rows", "seconds", "continual": info, **evaluate(r, params)}``.

    Raises:
      ValueError: no requests, an empty or out-of-range request, a continual method on a method
        that does not run in steps, non-finite parameters after a request (named).
    """
    import jax

    from jaxunlearn.method_configs import method_config_to_dict, parse_method_config
    from jaxunlearn.methods import run_method
    from jaxunlearn.tree import check_finite

    unlearn = run_method if unlearn is None else unlearn
    c = parse_continual(continual)
    typed = parse_method_config(cfg)
    if c is not None and typed.kind != "gradient":
        raise ValueError(f"continual method {c.kind!r} needs a gradient method (kind 'gradient'), got kind "
                         f"{typed.kind!r}")
    cfg = method_config_to_dict(typed)
    n = len(ctx.forget["input_ids"])
    bad = [r for r, rows in enumerate(map(np.asarray, requests)) if rows.size == 0 or min(rows) < 0 or max(rows) >= n]
    if not len(requests) or bad:
        raise ValueError(f"run_requests: no requests, or request(s) {bad} empty or with rows outside 0..{n - 1}")
    params, state, reports = ctx.params, start_state(ctx, c), []  # the carried state
    for r in range(len(requests)):
        rows = np.sort(np.concatenate(list(requests[:r + 1]))) if cumulative else np.asarray(requests[r])
        ctx_r = dataclasses.replace(ctx, params=params, forget={k: np.asarray(v)[rows] for k, v in ctx.forget.items()},
                                    seed=ctx.seed + r)
        t = time.perf_counter()  # the request's time includes the continual method's work
        ctx_r, cfg_r, reg, info = plan_request(ctx_r, cfg, c, state)
        new = jax.block_until_ready(unlearn(ctx_r, cfg_r, regularizer=reg))
        check_finite(new, f"the parameters after request {r}")
        state = finish_request(dataclasses.replace(ctx_r, retain=ctx.retain), c, state, new)
        seconds = time.perf_counter() - t
        report = {"request": r, "rows": int(len(rows)), "seconds": seconds, "continual": info}
        if evaluate is not None:
            report.update(evaluate(r, new))
        reports.append(report)
        if log is not None:
            log(f"  request {r + 1}/{len(requests)} ({seconds:.1f} s){_report_line(report)}")
        params = new
    return StreamRun(params, reports, state)


def _report_line(rep: Mapping[str, Any]) -> str:
    parts = [("current", rep.get("current")), ("earlier", rep.get("earlier")),
             ("retain", next(iter((rep.get("utility") or {}).values()), None))]
    return "".join(f"{', ' if i else ': '}{k} p {v['probability']:.3f}" for i, (k, v) in enumerate(parts) if v)


# =========================================================================== evaluation


def summarize_split(stats: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    """Headline numbers of per-example scores (:func:`jaxunlearn.eval.runner.score_split`):
    ``fa`` the exact-match rate (rows whose every answer token is the greedy prediction, over the
    rows where exact memorisation is defined), ``fa_token`` its token mean, and the means of
    ``probability``, ``fact_acc``, ``token_acc`` and (with perturbed answers) the forget-style
    ``truth_ratio`` (:func:`jaxunlearn.eval.tofu.forget_summary`). Non-finite values are None."""
    import math

    from jaxunlearn.eval.tofu import forget_summary

    s = forget_summary(stats)
    em = np.asarray(stats["exact_memorization"], np.float64)
    em = em[~np.isnan(em)]
    out = {"fa": float(np.mean(em >= 1.0)) if em.size else None, "fa_token": s.get("exact_memorization")}
    for k in ("probability", "fact_acc", "token_acc", "truth_ratio"):
        if k in s:
            out[k] = s[k]
    return {k: (None if v is None or not math.isfinite(v) else float(v)) for k, v in out.items()}


def _concat(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def make_evaluator(fn, splits: Mapping[str, Any], request_names: Sequence[str], utility: Sequence[str], *,
                   batch_size: int = 64, relearn: Mapping[str, Any] | None = None, target_params: Any = None
                   ) -> Callable[[int, Any], dict[str, Any]]:
    """``evaluate(r, params)``: the report after request ``r`` (module docstring, step 4).

    ``fn``: the model's :class:`~jaxunlearn.models.DecoderFn`; ``splits``: ``{name: EvalSplit}``
    (:func:`jaxunlearn.eval.splits.encode_eval_splits`, one padded length); ``request_names``: each
    request's split; ``utility``: the retain-side splits; ``relearn``: ``{"steps", "learning_rate",
    "seed", "rows": [encoded forget rows per request], "groups": [subjects per request]}`` (None:
    no attack), with ``target_params`` the recovery's reference.

    Returns:
      ``{"current": summary, "earlier": summary | None, "by_request": [summary per request],
      "utility": {split: summary}, "quant": {"bf16", "int4", "recovery_ratio", "recovery_delta"} |
      None, "relearn": {...} | None}`` (summaries of :func:`summarize_split`).
    """
    from jaxunlearn.eval.durability import deploy, recovery_ratio
    from jaxunlearn.eval.runner import score_split

    def scores(params, names):
        return [score_split(fn, params, splits[s], batch_size=batch_size) for s in names]

    def evaluate(r: int, params) -> dict[str, Any]:
        per = scores(params, request_names)
        out: dict[str, Any] = {"current": summarize_split(per[r]), "by_request": [summarize_split(p) for p in per],
                               "earlier": summarize_split(_concat(per[:r])) if r > 0 else None,
                               "utility": {u: summarize_split(s) for u, s in zip(utility, scores(params, utility))},
                               "quant": None, "relearn": None}
        if r > 0:
            q = {p: summarize_split(_concat(scores(deploy(params, p), request_names[:r]))) for p in ("bf16", "int4")}
            q["recovery_ratio"] = (recovery_ratio(q["int4"]["fa"], q["bf16"]["fa"])
                                   if q["int4"]["fa"] is not None and q["bf16"]["fa"] is not None else None)
            q["recovery_delta"] = (q["int4"]["fa"] - q["bf16"]["fa"]) if q["recovery_ratio"] is not None else None
            out["quant"] = q
        if r > 0 and relearn is not None:
            out["relearn"] = _relearn(fn, params, target_params, r, relearn, batch_size)
        return out

    return evaluate


def _relearn(fn, params, target_params, r: int, spec: Mapping[str, Any], batch_size: int) -> dict[str, Any]:
    """The relearning attack on the earlier requests: fine-tune on half of their subjects (rows when
    they hold one subject), measure the other half's mean answer probability."""
    from jaxunlearn.eval.relearn import RelearnConfig, recovered_fraction, relearn, split_for_relearning
    from jaxunlearn.eval.runner import evaluate_encoded

    rows = _concat(spec["rows"][:r])
    groups = [g for gs in spec["groups"][:r] for g in gs]
    by_subject = len(set(groups)) >= 2
    attack_idx, held_idx = split_for_relearning(len(groups), 0.5, seed=spec["seed"] + r,
                                                groups=groups if by_subject else None)
    attack = {k: v[attack_idx] for k, v in rows.items()}
    held = {k: v[held_idx] for k, v in rows.items()}

    def prob(p):
        return {"probability": float(np.mean(evaluate_encoded(fn, p, held, batch_size=batch_size)["probability"]))}

    cfg = RelearnConfig(steps=spec["steps"], learning_rate=spec["learning_rate"], batch_size=8, fraction=0.5,
                        eval_every=spec["steps"], seed=spec["seed"] + r)
    curve = relearn(fn, params, attack, cfg, prob)
    target = prob(target_params)["probability"]
    rec = recovered_fraction(curve[0]["probability"], curve[-1]["probability"], target)
    return {"split_by": "subject" if by_subject else "row", "attack_rows": int(len(attack_idx)),
            "held_out_rows": int(len(held_idx)), "before": curve[0]["probability"],
            "after": curve[-1]["probability"], "target": target, "recovered_fraction": rec if np.isfinite(rec) else None}


# =========================================================================== the benchmark


def run_stream(out_dir: str | os.PathLike, cfg: StreamConfig | None = None, *, overwrite: bool = False,
               progress: bool = True, reuse_from: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the stream benchmark (module docstring) and write ``out_dir``; returns the results.

    Every input is checked before any work: the configuration (default ``StreamConfig()``), the
    method configs (unknown name, invalid config, a continual method on a non-gradient method) and
    ``out_dir`` (an existing directory is refused unless ``overwrite``, and always when jaxunlearn
    did not write it). ``reuse_from``: a directory holding a cached target (``<dir>/models/target``
    of an earlier stream run, or the checkpoint itself), used when trained with ``cfg.demo``.

    Returns:
      ``{"config", "data", "requests", "target", "runs": {method: [report per request]}, "failed",
      "table", "seconds", "complete"}`` (also ``out_dir/results.json``); ``target`` is the target's
      report (``request`` = None).
    """
    from jaxunlearn.benchmark import load_method_configs
    from jaxunlearn.durability_bench import capped_config
    from jaxunlearn.outputs import check_output_dir, staged_dir

    cfg = StreamConfig() if cfg is None else cfg
    if not isinstance(cfg, StreamConfig):
        raise TypeError(f"run_stream: cfg must be a StreamConfig, got {type(cfg).__name__}")
    overwrite = check_bool("run_stream", "overwrite", overwrite)
    specs = {m: parse_method_spec(m) for m in cfg.methods}
    cdir = Path(cfg.configs_dir) if cfg.configs_dir else Path(__file__).resolve().parent.parent / "experiments" / "configs"
    configs = load_method_configs(list(dict.fromkeys(n for n, _ in specs.values())), cdir)
    for m, (name, kind) in specs.items():
        if kind is not None and configs[name].kind != "gradient":
            raise ValueError(f"method {m!r}: continual method {kind!r} needs a gradient method config, "
                             f"{name!r} is kind {configs[name].kind!r}")
    configs = {n: capped_config(c, cfg.max_steps) for n, c in configs.items()}
    out = check_output_dir(out_dir, overwrite=overwrite)
    caches = [out / "models" / "target"] + ([Path(reuse_from) / "models" / "target", Path(reuse_from)]
                                            if reuse_from is not None else [])
    with staged_dir(out, overwrite=overwrite, command="stream") as tmp:
        results = _run(tmp, cfg, specs, configs, caches, progress)
    if progress:
        print(f"wrote {out / 'results.json'}", flush=True)
    return results


def _run(tmp: Path, cfg: StreamConfig, specs, configs, caches, progress: bool) -> dict[str, Any]:
    from jaxunlearn.eval.runner import to_jsonable
    from jaxunlearn.eval.splits import encode_eval_splits
    from jaxunlearn.method_configs import method_config_to_dict
    from jaxunlearn.methods import UnlearnContext
    from jaxunlearn.models import DecoderFn
    from jaxunlearn.outputs import write_json_atomic
    from jaxunlearn.pipeline import prepare_data, unlearning_sets

    log = (lambda msg: print(msg, flush=True)) if progress else (lambda msg: None)
    t_start, seconds = time.perf_counter(), {}
    demo = cfg.demo
    data = prepare_data(demo)
    fs, rs, tok = data.forget_split, data.retain_split, data.tokenizer
    people = list(data.dataset[fs]["person"])
    requests = split_requests(len(people), cfg.requests, seed=demo.seed, groups=people)
    seconds["data"] = time.perf_counter() - t_start

    t0 = time.perf_counter()
    model = provide_target(tmp / "models" / "target", caches, data, demo, kind="stream", record_file=TARGET_RECORD,
                           log=log, progress=progress).model
    seconds["target"] = time.perf_counter() - t0

    n_ret = len(data.dataset[rs])
    ret_rows = np.sort(np.random.default_rng(demo.seed).permutation(n_ret)[:min(cfg.eval_rows, n_ret)])
    names = [f"request_{j}" for j in range(cfg.requests)]
    raw = {**{nm: data.dataset[fs].select(rows.tolist()) for nm, rows in zip(names, requests)},
           rs: data.dataset[rs].select(ret_rows.tolist()), **{g: data.dataset[g] for g in data.general_splits}}
    roles = {**{nm: "forget" for nm in names}, rs: "retain", **{g: "general" for g in data.general_splits}}
    splits = encode_eval_splits(tok, raw, roles=roles)
    fn, params = DecoderFn.of(model)
    forget, retain = unlearning_sets(data)
    relearn = None
    if cfg.relearn_steps:
        relearn = {"steps": cfg.relearn_steps, "learning_rate": cfg.relearn_lr, "seed": demo.seed,
                   "rows": [{k: v[rows] for k, v in forget.items()} for rows in requests],
                   "groups": [[people[i] for i in rows] for rows in requests]}
    utility = [rs, *data.general_splits]
    evaluate = make_evaluator(fn, splits, names, utility, batch_size=cfg.eval_batch_size, relearn=relearn,
                              target_params=params)
    t0 = time.perf_counter()
    target = {k: v for k, v in {"request": None, **evaluate(0, params)}.items() if k != "current"}
    seconds["target_eval"] = time.perf_counter() - t0
    head = {"config": {**to_jsonable(dataclasses.asdict(cfg)),
                       "method_configs": {n: method_config_to_dict(c) for n, c in configs.items()},
                       "continual": {m: to_jsonable(dataclasses.asdict(cfg.continual_config(k)))
                                     for m, (_, k) in specs.items() if k is not None}},
            "data": {"forget_split": fs, "retain_split": rs, "forget_rows": len(people),
                     "retain_rows": len(retain["input_ids"]), "utility_splits": utility},
            "requests": [{"rows": rows.tolist(), "subjects": sorted({people[i] for i in rows})} for rows in requests],
            "target": target}
    runs: dict[str, list] = {}
    failed: list[dict[str, str]] = []

    snapshot = lambda complete: to_jsonable({**head, "runs": runs, "failed": failed,  # noqa: E731
                                             "seconds": dict(seconds), "complete": complete})

    for m, (name, kind) in specs.items():
        log(f"{m}: {cfg.requests} requests")
        t0 = time.perf_counter()
        try:
            ctx = UnlearnContext(fn, params, forget, retain, seed=demo.seed)
            run = run_requests(ctx, requests, configs[name], continual=cfg.continual_config(kind),
                               cumulative=cfg.cumulative, evaluate=evaluate, log=log)
            runs[m] = run.reports
        except (ValueError, FloatingPointError, ArithmeticError) as e:
            failed.append({"method": m, "error": f"{type(e).__name__}: {e}"})
            log(f"  {m}: FAILED ({type(e).__name__}: {e})")
        seconds[f"run/{m}"] = time.perf_counter() - t0
        write_json_atomic(tmp / "results.json", snapshot(False))
    table = format_stream_table(runs, target)
    (tmp / "table.md").write_text(table + "".join(f"\nfailed: {f['method']} ({f['error']})" for f in failed) + "\n")
    plot_stream(runs, tmp / "stream.png", target=target)
    head.update(table=table, plot="stream.png")
    seconds["total"] = time.perf_counter() - t_start
    results = snapshot(True)
    write_json_atomic(tmp / "results.json", results)
    log("\n" + table + f"\ntotal {seconds['total']:.0f} s")
    return results


# =========================================================================== table and plot


def _num(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_stream_table(runs: Mapping[str, Sequence[Mapping[str, Any]]], target: Mapping[str, Any] | None = None) -> str:
    """A markdown table, one row per (method, request): answer probability and FA (exact-match rate)
    on the current request and on the earlier ones, FA of the earlier ones at INT4, the retain and
    general answer probability, the relearning recovery (when run) and the request's seconds; the
    target's row first (its ``current`` columns: every request pooled)."""
    cols = "method|req|cur p|cur FA|earlier p|earlier FA|earlier FA@int4|retain p|RA|general p|relearn rec|s".split("|")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def row(name, r, rep, cur):
        ut = rep.get("utility", {})
        ret = next(iter(ut.values()), {})
        gen = list(ut.values())[1] if len(ut) > 1 else {}
        ear, q, rl = rep.get("earlier") or {}, rep.get("quant") or {}, rep.get("relearn") or {}
        vals = [name, r, _num(cur.get("probability")), _num(cur.get("fa")), _num(ear.get("probability")),
                _num(ear.get("fa")), _num((q.get("int4") or {}).get("fa")), _num(ret.get("probability")),
                _num(ret.get("fa")), _num(gen.get("probability")), _num(rl.get("recovered_fraction"), 2),
                _num(rep.get("seconds"), 1)]
        return "| " + " | ".join(str(v) for v in vals) + " |"

    if target is not None:
        by = target.get("by_request") or []
        pooled = {k: float(np.mean([b[k] for b in by if b.get(k) is not None]))
                  for k in ("probability", "fa") if any(b.get(k) is not None for b in by)}
        lines.append(row("target", "-", {**target, "earlier": None, "quant": None, "relearn": None}, pooled))
    for m, reps in runs.items():
        for rep in reps:
            lines.append(row(m, rep["request"] + 1, rep, rep.get("current") or {}))
    return "\n".join(lines)


def plot_stream(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike, *,
                target: Mapping[str, Any] | None = None, metric: str = "probability") -> str:
    """Four panels against the request number, one line per method: ``metric`` on the current
    request, on the earlier requests (pooled), on the retain split and on the general split; dashed
    grey lines mark the target (its value over every request / on each utility split). Written
    through a temporary file (matplotlib's Agg backend).

    Args:
      runs: ``results["runs"]`` of :func:`run_stream`.
      path: the PNG to write.
      target: ``results["target"]`` (None: no target lines).
      metric: a key of :func:`summarize_split`'s summaries (``"probability"``, ``"fa"``, ``"fact_acc"``).

    Returns:
      ``path`` as a string.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_choice("plot_stream", "metric", metric, ("probability", "fa", "fa_token", "fact_acc", "token_acc"))
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    titles = ("forget: current request", "forget: earlier requests", "utility: retain", "utility: general")

    def pick(rep, panel):  # current, earlier, then the utility splits in order
        src = ([rep.get("current"), rep.get("earlier")] + list((rep.get("utility") or {}).values()) + [None, None])[panel]
        return np.nan if src is None or src.get(metric) is None else src[metric]

    for i, (m, reps) in enumerate(runs.items()):
        for panel, ax in enumerate(axes):  # dashed: a continual method
            ax.plot([rep["request"] + 1 for rep in reps], [pick(rep, panel) for rep in reps],
                    "--" if "+" in m else "-", marker="o", ms=3, color=f"C{i}", label=m)
    if target is not None:
        by = [b.get(metric) for b in target.get("by_request") or [] if b.get(metric) is not None]
        values = [np.mean(by) if by else None] * 2 + [u.get(metric) for u in (target.get("utility") or {}).values()]
        for panel, value in enumerate(values[:4]):
            if value is not None:
                axes[panel].axhline(value, color="0.5", ls=":", lw=1, label="target" if panel == 0 else None)
    n = max([len(reps) for reps in runs.values()] + [1])
    for ax, title in zip(axes, titles):
        ax.set(title=title, xlabel="request", ylim=(-0.03, 1.03), xticks=range(1, n + 1))
        ax.title.set_fontsize(9)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel(metric, fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=7, frameon=False)
    fig.suptitle(f"stream of deletion requests: {metric} per request", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.94))
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return os.fspath(path)
