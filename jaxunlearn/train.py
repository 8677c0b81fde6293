"""Jit-compiled fine-tuning on answer tokens (AdamW, warmup + cosine), resumable.

The model is handled functionally through its adapter,
``fn, params = jaxunlearn.models.DecoderFn.of(model)``, and every step is a pure
``(TrainState, batch) -> (TrainState, metrics)`` under ``jax.jit`` (buffers donated),
so it runs unchanged with sharded params. Batches
are a deterministic function of ``(seed, step)`` (:func:`batch_at`), which is what
makes an interrupted run resume to the exact same parameters (on the same mesh). A
resumable run's directory holds a run record (:func:`train_record`: the config and
digests of the data and of the starting weights); another run's directory is refused.

Several batch streams (:class:`Stream`): besides its main data a run can draw, every step, one
batch from each further stream, e.g. long passages beside short QA rows, each stream padded to
its own length (padding QA rows to the passages' length would multiply the cost of every QA
batch). The step's loss is then the sum of the streams' losses (:func:`make_train_step`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxunlearn import tree as jt
from jaxunlearn.models.functional import DecoderFn, answer_loss
from jaxunlearn.optim import float32_state
from jaxunlearn.placement import mesh_of
from jaxunlearn.runs import ResumableRun, array_digest, params_digest
from jaxunlearn.sharding import jit_keeping_state_sharding, shard_batch
from jaxunlearn.validate import check_float, check_int

__all__ = [
    "TrainConfig",
    "TrainState",
    "make_optimizer",
    "make_train_step",
    "batch_at",
    "train",
    "train_record",
    "step_batches",
    "BATCH_KEYS",
    "Stream",
]

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyperparameters.

    Attributes:
      steps: optimisation steps.
      batch_size: examples per step (static; the sampler drops the last partial batch of an epoch).
      learning_rate: peak learning rate of the warmup + cosine schedule.
      warmup_steps: linear warmup steps from 0.
      end_lr_ratio: final learning rate as a fraction of the peak.
      weight_decay: AdamW decoupled weight decay, applied to >= 2-D leaves only.
      grad_clip: global-norm gradient clipping (0 disables).
      seed: seeds the batch order.
      checkpoint_every: save the run state every this many steps (0: only at the end).
    """

    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    end_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0

    def __post_init__(self):
        check_int("TrainConfig", "steps", self.steps, min=1)
        check_int("TrainConfig", "batch_size", self.batch_size, min=1)
        check_float("TrainConfig", "learning_rate", self.learning_rate, min=0.0, min_exclusive=True)
        check_int("TrainConfig", "warmup_steps", self.warmup_steps, min=0)
        check_float("TrainConfig", "end_lr_ratio", self.end_lr_ratio, min=0.0)
        check_float("TrainConfig", "weight_decay", self.weight_decay, min=0.0)
        check_float("TrainConfig", "grad_clip", self.grad_clip, min=0.0)
        check_int("TrainConfig", "seed", self.seed)
        check_int("TrainConfig", "checkpoint_every", self.checkpoint_every, min=0)


class Stream(NamedTuple):
    """A further batch stream of :func:`train`: encoded rows and the rows per step drawn from them.

    Attributes:
      data: encoded examples (numpy arrays of :data:`BATCH_KEYS`, one padded length).
      batch_size: rows per step (at most ``len(data["input_ids"])``).
    """

    data: Mapping[str, np.ndarray]
    batch_size: int


class TrainState(NamedTuple):
    """Run state: ``step`` (int32 scalar), ``params`` (nnx.State of Params), ``opt_state`` (optax)."""

    step: jax.Array
    params: Any
    opt_state: Any


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay, optional global-norm clipping; the optimizer's
    state is float32 whatever the parameters' dtype (:func:`jaxunlearn.optim.float32_state`).

    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.end_lr_ratio,
    )
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    # moments in float32 also for bfloat16 parameters (the identity for float32 ones)
    parts.append(float32_state(optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask)))
    return optax.chain(*parts)


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation,
                    params_fn: Callable | None = None) -> Callable:
    """The jitted step ``(state, batch) -> (state, {"loss", "grad_norm"})``; ``state`` is donated
    and keeps its shardings (:func:`jaxunlearn.sharding.jit_keeping_state_sharding`).

    With ``params_fn`` (e.g. :func:`jaxunlearn.adapters.adapter_params_fn`) the state holds a
    reparametrisation ``t`` of the parameters, the step is ``(state, batch, frozen)`` and the
    loss is taken at ``params_fn(frozen, t)`` (``frozen`` is an argument, not donated).

    The loss is :func:`jaxunlearn.models.answer_loss` (mean NLL per answer token) of
    ``apply_fn(params, input_ids, attention_mask) -> logits``: a
    :class:`~jaxunlearn.models.DecoderFn` or any such function. ``batch`` is one batch, or a
    tuple of batches ``(b_1, ..., b_S)`` (one per :class:`Stream`, each its own padded length):
    then ``loss = sum_s answer_loss(b_s)``, each stream's mean NLL per scored token weighted 1
    whatever its size (a stream of long passages does not drown a stream of short answers)."""

    def loss_fn(t, batch, frozen):
        params = t if params_fn is None else params_fn(frozen, t)
        if isinstance(batch, tuple):
            return sum(answer_loss(apply_fn, params, b) for b in batch)
        return answer_loss(apply_fn, params, batch)

    def step(state: TrainState, batch, frozen=None):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, frozen)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return jit_keeping_state_sharding(step)


def batch_at(data: Mapping[str, np.ndarray], batch_size: int, step: int, seed: int,
             keys: Sequence[str] = BATCH_KEYS) -> dict:
    """The batch of ``step``: epoch ``e = step // (N // batch_size)`` is a permutation seeded by ``(seed, e)``.

    A pure function of its arguments, so a resumed run sees the same batches.
    Only ``keys`` are returned (default :data:`BATCH_KEYS`; e.g. also the refusal answers
    ``alt_*`` of a preference method): the rows do not depend on them.
    """
    n = len(data["input_ids"])
    if n == 0:
        raise ValueError("training set is empty")
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({n} examples)")
    per_epoch = n // batch_size
    epoch, i = divmod(int(step), per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    idx = np.sort(perm[i * batch_size : (i + 1) * batch_size])
    return {k: np.asarray(data[k])[idx] for k in keys}


def train_record(params: Any, data: Mapping[str, np.ndarray], cfg: TrainConfig,
                 streams: Sequence[Stream] = ()) -> dict[str, Any]:
    """What identifies a training run, as stored in :data:`jaxunlearn.runs.RUN_RECORD_FILE`.

    ``{"kind": "train", "config": cfg (without checkpoint_every), "data": digest, "params": digest,
    "num_params": n}``, the digests of the encoded data arrays (:data:`BATCH_KEYS`) and of the
    starting parameters' values (:func:`jaxunlearn.runs.params_digest`); with further
    ``streams`` also ``"streams": [{"data": digest, "batch_size": b}, ...]``.
    """
    config = dataclasses.asdict(cfg)
    config.pop("checkpoint_every")
    out = {"kind": "train", "config": config,
           "data": array_digest({k: data[k] for k in BATCH_KEYS}),
           "params": params_digest(params), "num_params": int(jt.size(params))}
    if streams:
        out["streams"] = [{"data": array_digest({k: st.data[k] for k in BATCH_KEYS}), "batch_size": int(st.batch_size)}
                          for st in streams]
    return out


def _check_streams(streams) -> list[Stream]:
    out = []
    for i, st in enumerate(streams, 1):
        if not isinstance(st, tuple) or len(st) != 2:
            raise TypeError(f"streams[{i - 1}] must be a Stream(data, batch_size), got {type(st).__name__}")
        st = Stream(*st)
        for k in BATCH_KEYS:
            if k not in st.data:
                raise KeyError(f"stream {i} lacks '{k}' (have {sorted(st.data)})")
        check_int("Stream", f"batch_size of stream {i}", st.batch_size, min=1)
        n = len(st.data["input_ids"])
        if st.batch_size > n:
            raise ValueError(f"stream {i}: batch_size {st.batch_size} is larger than its data ({n} examples)")
        out.append(st)
    return out


def step_batches(data: Mapping[str, np.ndarray], cfg: TrainConfig, streams: Sequence[Stream], step: int):
    """The batch(es) of ``step``: ``batch_at(data, cfg.batch_size, step, cfg.seed)``, and with further
    ``streams`` the tuple of it and ``batch_at(stream_i.data, stream_i.batch_size, step, cfg.seed + i)``
    for ``i = 1 .. len(streams)`` (each stream its own seeded epoch order)."""
    main = batch_at(data, cfg.batch_size, step, cfg.seed)
    if not streams:
        return main
    return (main, *(batch_at(st.data, st.batch_size, step, cfg.seed + i) for i, st in enumerate(streams, 1)))


def train(
    model: nnx.Module,
    data: Mapping[str, np.ndarray],
    cfg: TrainConfig,
    *,
    checkpoint_dir: str | None = None,
    progress: bool = True,
    desc: str = "train",
    log_every: int = 25,
    callback: Callable[[int, dict], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    streams: Sequence[Stream] = (),
) -> tuple[nnx.Module, list[dict]]:
    """Fine-tune ``model`` on encoded QA data (loss on answer tokens only).

    Args:
      model: an nnx model called as ``model(input_ids, attention_mask) -> logits``.
      data: encoded examples (numpy arrays ``input_ids``, ``attention_mask``, ``loss_mask``).
      cfg: :class:`TrainConfig`.
      checkpoint_dir: if given, the run state is saved there (orbax) every
        ``cfg.checkpoint_every`` steps and at the end, and an existing checkpoint
        of the same run (:func:`train_record`) is resumed from its step; a directory
        of another run is refused (``ValueError`` naming the differing field).
      progress: show a tqdm bar with the loss.
      log_every: record the metrics every this many steps.
      callback: called as ``callback(step, metrics)`` after each logged step.
      mesh: split every batch over this mesh's data-parallel axes
        (:func:`jaxunlearn.sharding.shard_batch`); default: the mesh the model's parameters
        are sharded on, if any. The batch size must be a multiple of the data-parallel size.
      streams: further :class:`Stream` s drawn from every step (:func:`step_batches`); the loss is
        the sum of the streams' answer losses (:func:`make_train_step`).

    Returns:
      ``(trained_model, history)``, history a list of ``{"step", "loss", "grad_norm"}``.
    """
    for k in BATCH_KEYS:
        if k not in data:
            raise KeyError(f"training data lacks '{k}' (have {sorted(data)})")
    streams = _check_streams(streams)
    fn, params = DecoderFn.of(model)
    record = train_record(params, data, cfg, streams) if checkpoint_dir else None
    params = jax.tree.map(jnp.copy, params)  # the step donates its state: keep the caller's model alive
    if mesh is None:
        mesh = mesh_of(params)
    tx = make_optimizer(cfg)
    fresh = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    step_fn = make_train_step(fn, tx)
    history: list[dict] = []
    with ResumableRun(checkpoint_dir or None, record, fresh, checkpoint_every=cfg.checkpoint_every) as run:
        state = run.state
        bar = tqdm(range(int(state.step), cfg.steps), desc=desc, disable=not progress, leave=False,
                   dynamic_ncols=True)
        try:
            for s in bar:
                batch = step_batches(data, cfg, streams, s)
                if mesh is not None:
                    batch = (tuple(shard_batch(b, mesh) for b in batch) if isinstance(batch, tuple)
                             else shard_batch(batch, mesh))
                state, metrics = step_fn(state, batch)
                if (s + 1) % log_every == 0 or s + 1 == cfg.steps:
                    m = {k: float(v) for k, v in metrics.items()}
                    history.append({"step": s + 1, **m})
                    bar.set_postfix(loss=f"{m['loss']:.3f}")
                    if callback is not None:
                        callback(s + 1, m)
                run.after_step(s + 1, state)
            run.finish(state)
        finally:
            bar.close()
    return fn.merge(state.params), history
