"""The context every unlearning method runs in, and the importance pieces every method shares.

:class:`UnlearnContext` holds the model's apply function, the target's parameters and the
encoded forget / retain data; :func:`importance_loss` and :func:`importance_batches` are how
every method (PerTA, SSD, SalUn, the continual methods' Fisher) computes per-example
importances over a set. Kept apart from :mod:`jaxunlearn.methods` so that modules the methods
build on (e.g. :mod:`jaxunlearn.continual`) can take a context without importing the methods.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np
from jax.sharding import Mesh

from jaxunlearn.models.functional import example_nll
from jaxunlearn.placement import resolve_mesh
from jaxunlearn.train import BATCH_KEYS

__all__ = ["UnlearnContext", "context_mesh", "importance_loss", "importance_batches"]


@dataclasses.dataclass
class UnlearnContext:
    """What every method needs.

    Attributes:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits``: the model's
        :class:`~jaxunlearn.models.DecoderFn` (``fn, params = DecoderFn.of(model)``; its
        Fisher importances then take the fused path, and RMU its hidden states) or any such function.
      params: the target model's parameters (theta_0; never modified).
      forget: encoded forget split (numpy arrays of the batch convention; with the refusal
        answers ``alt_*`` for IdkNLL / IdkDPO, :func:`jaxunlearn.data.refusal.with_refusals`).
      retain: encoded retain split.
      seed: seeds the batch order.
      fisher_kwargs: extra keyword arguments of :func:`jaxunlearn.fisher_diagonal`
        (``chunk_size``, ``method``).
      mesh: device mesh whose data-parallel axes split every batch (None: the mesh set
        by ``jax.set_mesh``, if any, else unsharded batches). Shard ``params`` on it
        beforehand (:func:`jaxunlearn.sharding.shard_params`); leaves not on a mesh are
        replicated over it.
    """

    apply_fn: Callable
    params: Any
    forget: Mapping[str, np.ndarray]
    retain: Mapping[str, np.ndarray]
    seed: int = 0
    fisher_kwargs: dict = dataclasses.field(default_factory=dict)
    mesh: Mesh | None = None


def context_mesh(ctx: UnlearnContext) -> Mesh | None:
    """The mesh a run uses (:func:`jaxunlearn.placement.resolve_mesh`): ``ctx.mesh``, else the
    mesh the parameters are sharded on, else the one set by ``jax.set_mesh``, else None."""
    return resolve_mesh(ctx.mesh, ctx.params)


def importance_loss(ctx: UnlearnContext) -> Callable:
    """The per-example loss of every importance a method computes (Fisher, gradient, SalUn saliency).

    :func:`jaxunlearn.models.example_nll` of ``ctx.apply_fn``: one example's summed answer NLL.
    For a :class:`~jaxunlearn.models.DecoderFn` of a Decoder it is the adapter's
    ``example_nll``, which offers the fused Fisher, so :func:`jaxunlearn.fisher.fisher_diagonal`
    (``method="auto"``) computes PerTA-fisher's and SSD's Fisher by one forward and backward
    pass per batch; any other apply function gets the chunked ``vmap`` path.
    """
    return example_nll(ctx.apply_fn)


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
