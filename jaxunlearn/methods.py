"""Every unlearning method of the benchmark as ``run(ctx, cfg) -> params``.

A method takes an :class:`UnlearnContext` (the split model, the target's parameters,
encoded forget and retain data) and a plain-dict configuration (as read from
``experiments/configs/<name>.json``) and returns unlearned parameters. Families:

- ``task_vector``: fine-tune the target on the forget set to ``theta_ft``, then
  ``theta_0 - alpha * (theta_ft - theta_0)`` (Ilharco et al., 2023).
- ``perta``: the same task vector rescaled per parameter,
  ``theta_0 - strength * w * tau``, ``w = I_f / (I_f + a I_r + eps)`` with ``I`` the
  diagonal Fisher (``importance="fisher"``) or gradient importances (``"grad"``).
- ``ssd``: selective synaptic dampening with Fisher importances on the forget set and
  on the full training data (Foster et al., 2024).
- ``gradient``: an :class:`~jaxunlearn.unlearn.UnlearnConfig` run for ``steps`` steps
  (GA, GradDiff, NPO, SimNPO, each optionally with the orthogonal projection, SAM,
  SAF), optionally under a SalUn mask (``salun_fraction``; Fan et al., 2024).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.dampening import ssd
from jaxunlearn.fisher import fisher_diagonal, grad_importance
from jaxunlearn.losses import sequence_nll
from jaxunlearn.saliency import salun_mask
from jaxunlearn.task_vector import apply_task_vector, perta, task_vector
from jaxunlearn.train import BATCH_KEYS, TrainConfig, TrainState, batch_at, make_optimizer, make_train_step
from jaxunlearn.unlearn import UnlearnConfig, init_unlearn_state, make_unlearn_step

__all__ = ["UnlearnContext", "KINDS", "run_method", "example_nll_fn", "importance_batches", "finetune_on_forget",
           "importances"]

KINDS = ("task_vector", "perta", "ssd", "gradient")


@dataclasses.dataclass
class UnlearnContext:
    """What every method needs.

    Attributes:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits``.
      params: the target model's parameters (theta_0; never modified).
      forget: encoded forget split (numpy arrays of the batch convention).
      retain: encoded retain split.
      seed: seeds the batch order.
      fisher_kwargs: extra keyword arguments of :func:`jaxunlearn.fisher_diagonal`
        (``chunk_size``, ``method``).
    """

    apply_fn: Callable
    params: Any
    forget: Mapping[str, np.ndarray]
    retain: Mapping[str, np.ndarray]
    seed: int = 0
    fisher_kwargs: dict = dataclasses.field(default_factory=dict)


def example_nll_fn(apply_fn: Callable) -> Callable:
    """``loss(params, example) -> scalar``: one example's summed answer NLL (for Fisher / importances)."""

    def loss(params, ex):
        ids = ex["input_ids"][None]
        logits = apply_fn(params, ids, ex["attention_mask"][None])
        return sequence_nll(logits, ids, ex["loss_mask"][None])[0]

    return loss


def importance_batches(data: Mapping[str, np.ndarray], batch_size: int, max_examples: int | None = None,
                       seed: int = 0) -> list[dict]:
    """Fixed-size batches over (a seeded subset of) ``data`` with ``example_weight`` 0 on padding rows."""
    n = len(data["input_ids"])
    idx = np.arange(n)
    if max_examples is not None and max_examples < n:
        idx = np.sort(np.random.default_rng(seed).permutation(n)[:max_examples])
    out = []
    for s in range(0, len(idx), batch_size):
        rows = idx[s:s + batch_size]
        w = np.ones(batch_size, np.float32)
        if len(rows) < batch_size:
            w[len(rows):] = 0.0
            rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
        out.append({**{k: np.asarray(data[k])[rows] for k in BATCH_KEYS}, "example_weight": w})
    return out


def finetune_on_forget(ctx: UnlearnContext, cfg: Mapping) -> Any:
    """theta_ft: the target fine-tuned on the forget set (AdamW, constant schedule after warmup)."""
    tcfg = TrainConfig(steps=int(cfg["steps"]), batch_size=int(cfg.get("batch_size", 32)),
                       learning_rate=float(cfg["learning_rate"]), warmup_steps=int(cfg.get("warmup_steps", 0)),
                       end_lr_ratio=1.0, weight_decay=0.0, seed=ctx.seed)
    tx = make_optimizer(tcfg)
    step = make_train_step(ctx.apply_fn, tx)
    params = jax.tree.map(jnp.copy, ctx.params)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    for s in range(tcfg.steps):
        state, _ = step(state, batch_at(ctx.forget, min(tcfg.batch_size, len(ctx.forget["input_ids"])), s, ctx.seed))
    return state.params


def importances(ctx: UnlearnContext, cfg: Mapping, which: str) -> tuple[Any, Any]:
    """(I_forget, I_other) with I = diagonal Fisher or a gradient importance; ``which`` in {"retain", "full"}."""
    loss = example_nll_fn(ctx.apply_fn)
    bs = int(cfg.get("importance_batch_size", 32))
    cap = cfg.get("max_importance_examples")
    fb = importance_batches(ctx.forget, bs, cap, ctx.seed)
    other = ctx.retain
    if which == "full":
        other = {k: np.concatenate([np.asarray(ctx.retain[k]), np.asarray(ctx.forget[k])]) for k in BATCH_KEYS}
    ob = importance_batches(other, bs, cap, ctx.seed)
    kind = cfg.get("importance", "fisher")
    if kind == "fisher":
        return (fisher_diagonal(loss, ctx.params, fb, **ctx.fisher_kwargs),
                fisher_diagonal(loss, ctx.params, ob, **ctx.fisher_kwargs))
    if kind == "grad":
        gk = cfg.get("grad_kind", "squared_mean")
        return grad_importance(loss, ctx.params, fb, kind=gk), grad_importance(loss, ctx.params, ob, kind=gk)
    raise ValueError(f"unknown importance {kind!r}: 'fisher' or 'grad'")


def _run_gradient(ctx: UnlearnContext, cfg: Mapping) -> Any:
    ucfg = UnlearnConfig(**cfg["unlearn"])
    mask = None
    if cfg.get("salun_fraction"):
        loss = example_nll_fn(ctx.apply_fn)
        sal = grad_importance(loss, ctx.params, importance_batches(ctx.forget, 32, seed=ctx.seed), kind="abs_sum")
        mask = jax.tree.map(lambda m: m.astype(jnp.float32), salun_mask(sal, fraction=float(cfg["salun_fraction"])))
    step = make_unlearn_step(ctx.apply_fn, ucfg, mask=mask)
    state = init_unlearn_state(ctx.params, ucfg, mask)
    bf = min(int(cfg.get("batch_size", 32)), len(ctx.forget["input_ids"]))
    br = int(cfg.get("retain_batch_size", bf))
    for s in range(ucfg.steps):
        fb = batch_at(ctx.forget, bf, s, ctx.seed)
        rb = batch_at(ctx.retain, br, s, ctx.seed + 1) if ucfg.uses_retain else None
        state, _ = step(state, fb, rb, ctx.params)
    return state.params


def run_method(ctx: UnlearnContext, cfg: Mapping) -> Any:
    """Run the method described by ``cfg`` (its ``"kind"`` picks the family) and return the params.

    Raises ``ValueError`` for an unknown kind and ``KeyError`` naming a missing option.
    """
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown method kind {kind!r}; choose from {KINDS}")
    try:
        if kind == "task_vector":
            tau = task_vector(finetune_on_forget(ctx, cfg["finetune"]), ctx.params)
            return apply_task_vector(ctx.params, tau, -float(cfg["alpha"]))
        if kind == "perta":
            tau = task_vector(finetune_on_forget(ctx, cfg["finetune"]), ctx.params)
            i_f, i_r = importances(ctx, cfg, "retain")
            return perta(ctx.params, tau, i_f, i_r, strength=float(cfg["strength"]),
                         retain_scale=float(cfg.get("retain_scale", 1.0)))
        if kind == "ssd":
            i_f, i_d = importances(ctx, cfg, "full")
            return ssd(ctx.params, i_f, i_d, alpha=float(cfg.get("alpha", 10.0)), lam=float(cfg.get("lam", 1.0)))
        return _run_gradient(ctx, cfg)
    except KeyError as e:
        raise KeyError(f"method config (kind {kind!r}) lacks option {e}") from None

