"""Relearning attack: does a short fine-tune on part of the forget set bring the rest back?

An unlearning method that only *suppresses* what the model knows (rather than removing it)
is undone by a few gradient steps on a small slice of the forgotten data: the knowledge of
the held-out part of the forget set returns too (Hu et al., 2024; BLUR, 2025). The attack:

1. split the forget set into an *attack* part (a ``fraction`` of its rows, drawn with a seed;
   rows of one subject stay together when ``groups`` is given, so the held-out part asks about
   people the attack never saw) and a *held-out* part (:func:`split_for_relearning`);
2. fine-tune the unlearned parameters on the attack part for ``steps`` AdamW steps on the answer
   NLL (every answer token of the batch pooled, as Hugging Face's loss), batches drawn with the
   seed (:func:`relearn`);
3. evaluate the held-out part before, during (every ``eval_every`` steps) and after, with any
   metric function (e.g. the mean answer probability), and report how much came back relative
   to the model before unlearning: :func:`recovered_fraction`
   ``(m_attacked - m_unlearned) / (m_target - m_unlearned)`` (0: nothing back, 1: all of it).

The same attack on the target itself, or on a model that never saw the forget set (the
reference), calibrates how much a fine-tune on the attack part alone teaches about the
held-out part.

References:
  Hu, Fu, Wu, Smith, "Jogging the Memory of Unlearned LLMs Through Targeted Relearning
  Attacks", 2024. Hu et al., "BLUR: A Benchmark for LLM Unlearning Robust to Forget-Retain
  Overlap", 2025.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunlearn.losses import batch_token_nll, sequence_nll
from jaxunlearn.validate import check_float, check_int

__all__ = ["RelearnConfig", "split_for_relearning", "relearn", "recovered_fraction"]

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")


@dataclasses.dataclass(frozen=True)
class RelearnConfig:
    """The attack's hyperparameters.

    Attributes:
      steps: fine-tuning steps (>= 1).
      learning_rate: AdamW learning rate (constant; > 0).
      batch_size: attack rows per step (>= 1; capped at the attack set's size).
      fraction: share of the forget rows (or subjects) the attacker fine-tunes on, in (0, 1).
      eval_every: evaluate the held-out part every this many steps (and at 0 and ``steps``).
      seed: the split and the batch order.
    """

    steps: int = 10
    learning_rate: float = 1e-4
    batch_size: int = 8
    fraction: float = 0.5
    eval_every: int = 5
    seed: int = 0

    def __post_init__(self):
        o = "RelearnConfig"
        check_int(o, "steps", self.steps, min=1)
        check_float(o, "learning_rate", self.learning_rate, min=0.0, min_exclusive=True)
        check_int(o, "batch_size", self.batch_size, min=1)
        f = check_float(o, "fraction", self.fraction, min=0.0, min_exclusive=True)
        if f >= 1.0:
            raise ValueError(f"RelearnConfig.fraction must be in (0, 1), got {self.fraction!r}")
        check_int(o, "eval_every", self.eval_every, min=1)
        check_int(o, "seed", self.seed, min=0)


def split_for_relearning(n: int, fraction: float, seed: int = 0,
                         groups: Sequence[Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(attack rows, held-out rows)``: a seeded ``fraction`` of the ``n`` rows for the attack.

    With ``groups`` (one label per row, e.g. the person a question is about) whole groups are
    drawn, ``max(1, round(fraction * G))`` of the ``G`` groups, so no held-out subject was
    seen by the attack. Both parts are non-empty and sorted.

    Raises:
      ValueError: fewer than 2 rows (or groups), ``fraction`` outside (0, 1), ``groups`` of the
        wrong length.

    >>> split_for_relearning(4, 0.5, seed=0, groups=["a", "a", "b", "b"])[0].tolist() in ([0, 1], [2, 3])
    True
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    labels = np.arange(n) if groups is None else np.asarray(groups, dtype=object)
    if len(labels) != n:
        raise ValueError(f"groups has {len(labels)} labels for {n} rows")
    uniq = list(dict.fromkeys(labels.tolist()))
    if len(uniq) < 2:
        raise ValueError(f"cannot split {len(uniq)} {'group' if groups is not None else 'row'}(s) into an attack "
                         "and a held-out part")
    rng = np.random.default_rng(seed)
    k = min(len(uniq) - 1, max(1, round(fraction * len(uniq))))
    chosen = {uniq[i] for i in rng.permutation(len(uniq))[:k]}
    attack = np.array([i for i in range(n) if labels[i] in chosen], dtype=np.int64)
    held = np.array([i for i in range(n) if labels[i] not in chosen], dtype=np.int64)
    return attack, held


def _loss(apply_fn: Callable, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    logits = apply_fn(params, batch["input_ids"], batch["attention_mask"])
    nll = sequence_nll(logits, batch["input_ids"], batch["loss_mask"])
    return batch_token_nll(nll, jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32), axis=-1))


@functools.lru_cache(maxsize=16)
def _attack_step(apply_fn: Callable, learning_rate: float):
    """``(tx, jitted step)`` of the attack: one compilation per model and learning rate, shared by
    every attacked model of a benchmark."""
    tx = optax.adamw(learning_rate)

    @jax.jit
    def step(p, opt, batch):
        loss, g = jax.value_and_grad(lambda q: _loss(apply_fn, q, batch))(p)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt, loss

    return tx, step


def relearn(apply_fn: Callable, params: Any, attack: Mapping[str, np.ndarray], cfg: RelearnConfig,
            evaluate: Callable[[Any], Mapping[str, float]]) -> list[dict[str, float]]:
    """Fine-tune ``params`` on ``attack`` and evaluate along the way: the attack's curve.

    Step ``s`` (0-based) uses the rows ``perm_e[(s mod E) * b : (s mod E) * b + b]`` of epoch
    ``e = s // E`` (``E`` batches per epoch of the attack set, ``perm_e`` a permutation drawn from
    ``seed`` and ``e``); the update is AdamW (``optax.adamw(learning_rate)``, weight decay
    1e-4 as optax's default) on the pooled answer NLL. ``evaluate(params)`` runs at step 0 (the
    unlearned model), every ``eval_every`` steps and at ``steps``.

    Args:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits``.
      params: the (unlearned) parameters; not modified.
      attack: the attack rows, ``input_ids`` / ``attention_mask`` / ``loss_mask`` ``(N, T)``.
      cfg: the attack's hyperparameters.
      evaluate: ``params -> {metric: float}`` on the held-out part.

    Returns:
      ``[{"step": s, **evaluate(params_s)}, ...]`` in step order.

    Raises:
      KeyError: ``attack`` lacks a batch key. ValueError: an empty attack set.
    """
    for k in BATCH_KEYS:
        if k not in attack:
            raise KeyError(f"relearn: the attack set lacks '{k}' (have {sorted(attack)})")
    n = len(attack["input_ids"])
    if n == 0:
        raise ValueError("relearn: the attack set is empty")
    b = min(cfg.batch_size, n)
    per_epoch = n // b
    try:
        tx, step = _attack_step(apply_fn, float(cfg.learning_rate))
    except TypeError:  # an unhashable apply function: compiled for this call only
        tx, step = _attack_step.__wrapped__(apply_fn, float(cfg.learning_rate))
    p = jax.tree.map(jnp.copy, params)
    opt = tx.init(p)
    curve = [{"step": 0, **{k: float(v) for k, v in evaluate(p).items()}}]
    perm = None
    for s in range(cfg.steps):
        e, i = divmod(s, per_epoch)
        if i == 0:
            perm = np.random.default_rng([cfg.seed, e]).permutation(n)
        rows = perm[i * b:(i + 1) * b]
        p, opt, _ = step(p, opt, {k: jnp.asarray(np.asarray(attack[k])[rows]) for k in BATCH_KEYS})
        if (s + 1) % cfg.eval_every == 0 or s + 1 == cfg.steps:
            curve.append({"step": s + 1, **{k: float(v) for k, v in evaluate(p).items()}})
    return curve


def recovered_fraction(unlearned: float, attacked: float, target: float) -> float:
    """``(attacked - unlearned) / (target - unlearned)``: how much of what unlearning removed
    from a metric the attack brought back (0: none, 1: back to the target; NaN when unlearning
    did not move the metric).

    >>> round(recovered_fraction(unlearned=0.1, attacked=0.4, target=0.7), 6)
    0.5
    """
    gap = float(target) - float(unlearned)
    if gap == 0.0:
        return float("nan")
    return (float(attacked) - float(unlearned)) / gap
