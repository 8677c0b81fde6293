"""Every unlearning method of the benchmark as ``run(ctx, cfg) -> params``.

A method takes an :class:`UnlearnContext` (the split model, the target's parameters,
encoded forget and retain data) and a plain-dict configuration (as read from
``experiments/configs/<name>.json``) and returns unlearned parameters. Families:

- ``task_vector``: fine-tune the target on the forget set to ``theta_ft``, then
  ``theta_0 - scale * (theta_ft - theta_0)`` (Ilharco et al., 2023).
- ``perta``: the same task vector rescaled per parameter,
  ``theta_0 - strength * w * tau``, ``w = I_f / (I_f + a I_r + eps)`` with ``I`` the
  diagonal Fisher (``importance="fisher"``) or gradient importances (``"grad"``).
- ``ssd``: selective synaptic dampening with Fisher importances on the forget set and
  on the full training data (Foster et al., 2024).
- ``gradient``: an :class:`~jaxunlearn.unlearn.UnlearnConfig` run for ``steps`` steps
  (GA, GradDiff, NPO, SimNPO, WGA, UNDIAL, IdkNLL, IdkDPO, each optionally with the orthogonal
  projection, SAM, SAF), optionally under a SalUn mask (``salun_fraction``; Fan et al., 2024).
  IdkNLL / IdkDPO read the forget set's refusal answers (``alt_*``,
  :mod:`jaxunlearn.data.refusal`).
- ``rmu``: representation misdirection (:mod:`jaxunlearn.rmu`; Li et al., 2024), run step by
  step as the gradient kind (same batches, checkpoints and callback).

Sharded runs: with a mesh (:func:`context_mesh`: ``UnlearnContext.mesh``, else the mesh the
parameters are on, else the one set by ``jax.set_mesh``) every batch (unlearning steps, fine-tuning, Fisher / importance batches) is placed with
its rows split over the mesh's data-parallel axes (:func:`jaxunlearn.sharding.shard_batch`);
the parameters keep the placement the caller gave them (e.g.
:func:`jaxunlearn.sharding.shard_params`), and the run state follows them.

Configs: a method config is a typed dataclass of :mod:`jaxunlearn.method_configs`
(a plain dict is parsed by :func:`~jaxunlearn.method_configs.parse_method_config`,
which refuses unknown keys, wrong types and out-of-range values, naming the key).

Resumable runs: ``run_method(..., checkpoint_dir=...)`` saves the gradient run's
:class:`~jaxunlearn.unlearn.UnlearnState` with orbax and resumes from the newest
checkpoint (:class:`jaxunlearn.runs.ResumableRun`). Batches are a pure function of
``(seed, step)`` (:func:`jaxunlearn.train.batch_at`), so an interrupted-then-resumed run
on the same mesh ends with exactly the parameters of an uninterrupted one. The directory
also holds the run record (:func:`run_record`: the method config, seed, and digests of the
data and of the starting parameters' values); a directory written by another run is
refused, naming the first differing key.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import tree as jt
from jaxunlearn.adapters import LoraConfig, adapter_params_fn, freeze_base, init_lora, lora_delta, merge, scale_lora
from jaxunlearn.context import UnlearnContext, context_mesh, importance_batches, importance_loss
from jaxunlearn.continual import plan_request, start_state
from jaxunlearn.dampening import ssd
from jaxunlearn.fisher import fisher_diagonal, grad_importance
from jaxunlearn.method_configs import (FinetuneConfig, GradientMethod, MethodConfig, PertaMethod, RMUMethod, SSDMethod,
                                       TaskVectorMethod, method_config_to_dict, parse_method_config)
from jaxunlearn.placement import check_batch_size, place_batch, placed_specs, replicate_unplaced
from jaxunlearn.rmu import build_rmu
from jaxunlearn.runs import ResumableRun, array_digest, params_digest
from jaxunlearn.saliency import salun_mask
from jaxunlearn.sparsity import magnitude_prune_mask
from jaxunlearn.task_vector import apply_task_vector, perta, task_vector
from jaxunlearn.train import BATCH_KEYS, TrainConfig, TrainState, batch_at, make_optimizer, make_train_step
from jaxunlearn.unlearn import Unlearner, UnlearnState
from jaxunlearn.unlearn_step import forget_batch_keys

__all__ = ["UnlearnContext", "KINDS", "run_method", "run_record", "context_mesh", "importance_loss", "importance_batches", "finetune_on_forget", "importances", "adapter_start"]

KINDS = ("task_vector", "perta", "ssd", "gradient", "rmu")


def adapter_start(ctx: UnlearnContext, adapter: LoraConfig) -> tuple[Any, Any]:
    """``(frozen, lora_0)`` of an adapter-space run: the target held as :func:`~jaxunlearn.adapters.freeze_base`
    says (NF4 kernels with ``base="nf4"``) and a fresh adapter (``b = 0``) drawn from
    ``jax.random.key(ctx.seed)``, both placed on the run's mesh (replicated)."""
    mesh = context_mesh(ctx)
    frozen = replicate_unplaced(freeze_base(ctx.params, adapter), mesh)
    return frozen, replicate_unplaced(init_lora(ctx.params, adapter, jax.random.key(ctx.seed)), mesh)


@functools.lru_cache(maxsize=16)
def _finetune_step(tcfg: TrainConfig, apply_fn: Callable, params_fn: Callable | None):
    """The fine-tuning optimizer and jitted step, one per (config, model, parametrisation): repeated
    runs (a benchmark's seeds) compile it once. ``tcfg.seed`` does not enter the step."""
    tx = make_optimizer(tcfg)
    return tx, make_train_step(apply_fn, tx, params_fn=params_fn)


def finetune_on_forget(ctx: UnlearnContext, cfg: FinetuneConfig | Mapping, adapter: LoraConfig | None = None) -> Any:
    """theta_ft: the target fine-tuned on the forget set (AdamW, constant schedule after warmup).

    With ``adapter`` only a LoRA adapter over the frozen target is trained
    (:func:`adapter_start`), and the fine-tuned *adapter* ``{path: LoraPair}`` is returned.
    """
    if not isinstance(cfg, FinetuneConfig):
        cfg = FinetuneConfig(**cfg)
    tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                       warmup_steps=cfg.warmup_steps, end_lr_ratio=1.0, weight_decay=0.0, seed=ctx.seed)
    pfn = None if adapter is None else adapter_params_fn(adapter)
    try:  # the seed orders the batches only: not part of the step
        tx, step = _finetune_step(dataclasses.replace(tcfg, seed=0), ctx.apply_fn, pfn)
    except TypeError:  # an unhashable apply function: build it for this run
        tx, step = _finetune_step.__wrapped__(tcfg, ctx.apply_fn, pfn)
    mesh = context_mesh(ctx)
    bs = min(tcfg.batch_size, len(ctx.forget["input_ids"]))
    check_batch_size(bs, mesh, "fine-tuning batch size")
    frozen = None
    if adapter is None:
        params = replicate_unplaced(jax.tree.map(jnp.copy, ctx.params), mesh)
    else:
        frozen, params = adapter_start(ctx, adapter)
    state = replicate_unplaced(TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), mesh)
    for s in range(tcfg.steps):
        batch = place_batch(batch_at(ctx.forget, bs, s, ctx.seed), mesh)
        state, _ = step(state, batch) if adapter is None else step(state, batch, frozen)
    return state.params


def importances(ctx: UnlearnContext, cfg: PertaMethod | SSDMethod | Mapping, which: str) -> tuple[Any, Any]:
    """(I_forget, I_other) with I = diagonal Fisher or a gradient importance; ``which`` in {"retain", "full"}.

    ``cfg``: a PerTA or SSD config (or its JSON form): ``importance``, ``grad_kind``,
    ``importance_batch_size``, ``max_importance_examples``. The per-example loss is
    :func:`importance_loss`: for a :class:`~jaxunlearn.models.DecoderFn` of a Decoder the Fisher
    is the fused one (:mod:`jaxunlearn.fisher_fused`, unless ``ctx.fisher_kwargs`` says
    ``method="vmap"``).
    """
    cfg = parse_method_config(cfg)
    loss = importance_loss(ctx)  # a DecoderFn's offers the fused Fisher to fisher_diagonal
    bs = cfg.importance_batch_size
    cap = cfg.max_importance_examples
    fb = importance_batches(ctx.forget, bs, cap, ctx.seed)
    other = ctx.retain
    if which == "full":
        other = {k: np.concatenate([np.asarray(ctx.retain[k]), np.asarray(ctx.forget[k])]) for k in BATCH_KEYS}
    ob = importance_batches(other, bs, cap, ctx.seed)
    mesh = context_mesh(ctx)
    if mesh is not None:
        fb = [place_batch(b, mesh, "importance batch size") for b in fb]
        ob = [place_batch(b, mesh, "importance batch size") for b in ob]
    kind = cfg.importance
    if kind == "fisher":
        return (fisher_diagonal(loss, ctx.params, fb, **ctx.fisher_kwargs),
                fisher_diagonal(loss, ctx.params, ob, **ctx.fisher_kwargs))
    if kind == "grad":
        gk = cfg.grad_kind
        return grad_importance(loss, ctx.params, fb, kind=gk), grad_importance(loss, ctx.params, ob, kind=gk)
    raise ValueError(f"unknown importance {kind!r}: 'fisher' or 'grad'")


def run_record(ctx: UnlearnContext, cfg: MethodConfig | Mapping) -> dict[str, Any]:
    """What identifies a gradient unlearning run, as stored in :data:`jaxunlearn.runs.RUN_RECORD_FILE`.

    ``{"kind": "unlearn", "method": config, "seed": ctx.seed, "forget": digest, "retain": digest,
    "params": digest, "num_params": n}``: the method config with every field filled in, the
    batch-order seed, and SHA-256 digests of the encoded forget / retain arrays
    (:data:`jaxunlearn.train.BATCH_KEYS`, and the forget set's refusal answers for a method that
    reads them) and of the starting parameters' values
    (:func:`jaxunlearn.runs.params_digest`). Two runs with equal records take the same steps
    on the same batches from the same weights.

    Args:
      ctx: the run's context.
      cfg: the method config.

    Returns:
      A JSON-compatible dict.
    """
    cfg = parse_method_config(cfg)
    keys = forget_batch_keys(cfg.unlearn.method) if isinstance(cfg, GradientMethod) else BATCH_KEYS
    return {
        "kind": "unlearn",
        "method": method_config_to_dict(cfg),
        "seed": int(ctx.seed),
        "forget": array_digest({k: ctx.forget[k] for k in keys if k in ctx.forget}),
        "retain": array_digest({k: ctx.retain[k] for k in BATCH_KEYS}),
        "params": params_digest(ctx.params),
        "num_params": int(jt.size(ctx.params)),
    }


def _run_gradient(ctx: UnlearnContext, cfg: GradientMethod, *, checkpoint_dir: str | None = None,
                  checkpoint_every: int = 0, callback: Callable[[int, dict], None] | None = None,
                  regularizer: Callable[[Any], Any] | None = None) -> Any:
    ucfg = cfg.unlearn
    adapter = cfg.adapter
    mesh = context_mesh(ctx)
    _batch_sizes(ctx, cfg, ucfg.uses_retain)
    _check_forget_keys(ctx, forget_batch_keys(ucfg.method), f"method {ucfg.method!r}")
    masks = []
    start, frozen, params_fn = ctx.params, None, None
    if adapter is not None:  # train t = a LoRA adapter; the model is merge(frozen, t); the reference is t_0
        frozen, start = adapter_start(ctx, adapter)
        params_fn = adapter_params_fn(adapter)
    if cfg.salun_fraction:
        loss = importance_loss(ctx)
        if adapter is not None:  # saliency of the adapter's entries, at the fresh adapter
            loss = functools.partial(_loss_through, loss, params_fn, frozen)
        sal = grad_importance(loss, start, importance_batches(ctx.forget, 32, seed=ctx.seed), kind="abs_sum")
        masks.append(salun_mask(sal, fraction=cfg.salun_fraction))
    if cfg.prune_sparsity is not None:  # prune first, then unlearn: the pruned model is also the reference
        keep = magnitude_prune_mask(ctx.params, cfg.prune_sparsity)
        start = jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), ctx.params, keep)
        masks.append(keep)
    mask = None
    if masks:
        mask = replicate_unplaced(jax.tree.map(lambda *ms: functools.reduce(jnp.logical_and, ms).astype(jnp.float32),
                                               *masks), mesh)
    # the mask enters once: init and step share the optimizer; on a mesh the projection runs per shard
    reg = None if regularizer is None else regularizer(start)
    unlearner = ucfg.build(ctx.apply_fn, mask=mask, mesh=mesh, param_specs=placed_specs(start), params_fn=params_fn,
                           regularizer=reg)
    state = _run_steps(ctx, cfg, unlearner, start, ucfg.steps, frozen=frozen, checkpoint_dir=checkpoint_dir,
                       checkpoint_every=checkpoint_every, callback=callback)
    if adapter is not None:  # deployed: the adapter merged into the full-precision target
        return merge(ctx.params, state.params, adapter)
    return state.params


def _check_forget_keys(ctx: UnlearnContext, keys: tuple[str, ...], what: str) -> None:
    """Every forget key a method reads is in ``ctx.forget`` (checked before any work), else a KeyError naming it."""
    missing = [k for k in keys if k not in ctx.forget]
    if missing:
        hint = (" (the refusal answers: jaxunlearn.data.refusal.with_refusals adds them; the benchmark's "
                "unlearning_sets does when its data have a refusal set)" if missing[0].startswith("alt_") else "")
        raise KeyError(f"{what} reads the forget set's '{missing[0]}', which UnlearnContext.forget lacks "
                       f"(have {sorted(ctx.forget)}){hint}")


def _batch_sizes(ctx: UnlearnContext, cfg: GradientMethod | RMUMethod, uses_retain: bool) -> tuple[int, int]:
    """``(forget rows, retain rows)`` per step, checked against the mesh's data-parallel size."""
    mesh = context_mesh(ctx)
    bf = min(cfg.batch_size, len(ctx.forget["input_ids"]))
    br = cfg.retain_batch_size or bf
    check_batch_size(bf, mesh, "forget batch size")
    if uses_retain:
        check_batch_size(br, mesh, "retain batch size")
    return bf, br


def _run_steps(ctx: UnlearnContext, cfg: GradientMethod | RMUMethod, unlearner: Unlearner, start: Any, steps: int, *,
               frozen: Any = None, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
               callback: Callable[[int, dict], None] | None = None) -> UnlearnState:
    """The step loop of a step-wise method: ``steps`` steps of ``unlearner`` from ``start`` (also the
    reference), the forget batch of step ``s`` ``batch_at(forget, bf, s, seed)`` with the unlearner's
    forget keys, the retain batch ``batch_at(retain, br, s, seed + 1)``; resumable (``checkpoint_dir``)."""
    mesh = context_mesh(ctx)
    bf, br = _batch_sizes(ctx, cfg, unlearner.uses_retain)
    record = run_record(ctx, cfg) if checkpoint_dir is not None else None
    fresh: UnlearnState = replicate_unplaced(unlearner.init(start), mesh)
    with ResumableRun(checkpoint_dir, record, fresh, checkpoint_every=checkpoint_every) as run:
        state = run.state
        for s in range(int(state.step), steps):
            fb = place_batch(batch_at(ctx.forget, bf, s, ctx.seed, keys=unlearner.forget_keys), mesh,
                             "forget batch size")
            rb = (place_batch(batch_at(ctx.retain, br, s, ctx.seed + 1), mesh, "retain batch size")
                  if unlearner.uses_retain else None)
            state, metrics = unlearner.step(state, fb, rb, start, frozen=frozen)
            run.after_step(s + 1, state)
            if callback is not None:
                callback(s + 1, {k: float(v) for k, v in metrics.items()})
        run.finish(state)
    return state


def _run_rmu(ctx: UnlearnContext, cfg: RMUMethod, *, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
             callback: Callable[[int, dict], None] | None = None) -> Any:
    """RMU (:func:`jaxunlearn.rmu.build_rmu`): the control vector drawn from ``ctx.seed``, the
    frozen target the reference of the retain hidden states."""
    mesh = context_mesh(ctx)
    _batch_sizes(ctx, cfg, True)
    unlearner = build_rmu(ctx.apply_fn, cfg, ctx.params, seed=ctx.seed, mesh=mesh, param_specs=placed_specs(ctx.params))
    state = _run_steps(ctx, cfg, unlearner, ctx.params, cfg.steps, checkpoint_dir=checkpoint_dir,
                       checkpoint_every=checkpoint_every, callback=callback)
    return state.params


def _loss_through(loss: Callable, params_fn: Callable, frozen: Any, t: Any, example: Any) -> jax.Array:
    return loss(params_fn(frozen, t), example)


def _dense_update(params: Any, delta: Mapping[str, jax.Array]) -> Any:
    """A params-shaped tree: ``delta[path]`` at the adapted kernels, zeros elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: delta[jt.path_str(p)].astype(x.dtype) if jt.path_str(p) in delta else jnp.zeros_like(x), params)


def run_method(ctx: UnlearnContext, cfg: MethodConfig | Mapping, *, checkpoint_dir: str | os.PathLike | None = None,
               checkpoint_every: int = 0, callback: Callable[[int, dict], None] | None = None,
               regularizer: Callable[[Any], Any] | None = None) -> Any:
    """Run the method described by ``cfg`` (its kind picks the family) and return the params.

    With a mesh (:func:`context_mesh`) every batch is split over its data-parallel axes and
    parameters not yet on it are replicated over it.

    Args:
      ctx: the model, the target's parameters and the encoded data.
      cfg: the method config: a typed config of :mod:`jaxunlearn.method_configs`, or its
        JSON form (``experiments/configs/<name>.json``), parsed and validated first.
      checkpoint_dir: ``gradient`` and ``rmu`` kinds only: save the :class:`~jaxunlearn.unlearn.UnlearnState`
        there (orbax) every ``checkpoint_every`` steps and at the end; when it already holds a
        checkpoint of the same run (:func:`run_record`), resume from its step. The restored
        state takes the shardings of a fresh one (so a different mesh shape works too; the
        result then equals the same-mesh one to float tolerance, not bitwise).
      checkpoint_every: steps between checkpoints (0: only at the end).
      callback: ``gradient`` and ``rmu`` kinds only: ``callback(step, metrics)`` after every step (after
        that step's checkpoint), ``metrics`` as floats (``forget_loss``, ``retain_loss``,
        ``update_norm``); an exception it raises stops the run.
      regularizer: ``gradient`` kind only: ``regularizer(start) -> optax transform``, an extra
        gradient term of the objective (:meth:`jaxunlearn.unlearn.UnlearnConfig.transform`), built
        from the trained pytree's starting value (the parameters, or the fresh adapter); e.g. a
        continual method's Fisher-weighted penalty toward earlier requests' parameters.

    Returns:
      The unlearned parameters (same structure as ``ctx.params``).

    Raises:
      ValueError / TypeError: an invalid config (the key named); ``checkpoint_dir``/``callback``
        for a kind that does not run in steps; a checkpoint directory of another run (naming
        the differing key); a batch size not divisible by the mesh's data-parallel size; RMU
        without a model's hidden states (``ctx.apply_fn`` not a DecoderFn) or with a layer beyond it.
      KeyError: a forget key the method reads missing from ``ctx.forget`` (IdkNLL / IdkDPO
        without refusal answers), named.
    """
    cfg = parse_method_config(cfg)
    kind = cfg.kind
    if (kind not in ("gradient", "rmu") and (checkpoint_dir is not None or callback is not None)
            or kind != "gradient" and regularizer is not None):
        raise ValueError(f"checkpoint_dir / callback / regularizer need a step-wise run (kind 'gradient'; 'rmu' "
                         f"without regularizer); kind {kind!r} is not resumable")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    mesh = context_mesh(ctx)
    if mesh is not None:
        ctx = dataclasses.replace(ctx, params=replicate_unplaced(ctx.params, mesh))
    if isinstance(cfg, GradientMethod) and cfg.continual is not None:  # one request of a continual method
        if regularizer is not None or checkpoint_dir is not None:
            raise ValueError("a method with 'continual' builds its own regularizer and is not resumable: "
                             "regularizer= and checkpoint_dir= must be None")
        c = cfg.continual
        ctx, plain, regularizer, _ = plan_request(ctx, method_config_to_dict(dataclasses.replace(cfg, continual=None)),
                                                  c, start_state(ctx, c))
        cfg = parse_method_config(plain)
    if isinstance(cfg, TaskVectorMethod):
        if cfg.adapter is not None:  # negate the adapter's update: b -> -scale b
            lora = finetune_on_forget(ctx, cfg.finetune, cfg.adapter)
            return merge(ctx.params, scale_lora(lora, -cfg.scale), cfg.adapter)
        tau = task_vector(finetune_on_forget(ctx, cfg.finetune), ctx.params)
        return apply_task_vector(ctx.params, tau, -cfg.scale)
    if isinstance(cfg, PertaMethod):
        if cfg.adapter is not None:  # tau = the adapter's update s a b in weight space (0 elsewhere)
            tau = _dense_update(ctx.params, lora_delta(finetune_on_forget(ctx, cfg.finetune, cfg.adapter),
                                                       cfg.adapter))
        else:
            tau = task_vector(finetune_on_forget(ctx, cfg.finetune), ctx.params)
        i_f, i_r = importances(ctx, cfg, "retain")
        return perta(ctx.params, tau, i_f, i_r, strength=cfg.strength, retain_scale=cfg.retain_scale)
    if isinstance(cfg, SSDMethod):
        i_f, i_d = importances(ctx, cfg, "full")
        return ssd(ctx.params, i_f, i_d, alpha=cfg.threshold, lam=cfg.lam)
    if isinstance(cfg, RMUMethod):
        return _run_rmu(ctx, cfg, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, callback=callback)
    return _run_gradient(ctx, cfg, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                         callback=callback, regularizer=regularizer)
