"""The decoder adapter: a model as pure functions of its parameters.

``fn, params = DecoderFn.of(model)`` splits an nnx model into its parameters (a pytree of
arrays, the ``nnx.Param`` state) and a frozen, hashable function of them::

    logits = fn(params, input_ids, attention_mask)        # == model(input_ids, attention_mask)
    h      = fn.hidden_state(params, input_ids, attention_mask, layer=l)   # residual stream after block l
    nll    = fn.answer_nll(params, batch)                 # (B,) summed answer-token NLL per row
    loss   = fn.answer_loss(params, batch)                # mean NLL per answer token (training loss)
    F      = ju.fisher_diagonal(fn.example_nll, params, batches)   # per-example loss -> fused Fisher

``fn`` holds the model's graph (``nnx.GraphDef``) and its non-parameter state and compares
and hashes by value: two adapters of models of one architecture are equal, so functions
jitted with the adapter as a static argument (or closed over it through an equal loss object)
compile once per architecture, not once per call. Batches follow :mod:`jaxunlearn.losses`:
``input_ids``, ``attention_mask`` and ``loss_mask`` of shape ``(B, T)``.

Anything else called as ``apply(params, input_ids, attention_mask) -> logits`` (a toy model, a
LoRA-wrapped forward) works wherever the library takes an apply function; :func:`answer_nll`,
:func:`answer_loss` and :func:`example_nll` give it the same losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn.losses import sequence_nll
from jaxunlearn.models.decoder import Decoder

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]

__all__ = ["DecoderFn", "ExampleNLL", "DecoderNLL", "example_nll", "answer_nll", "answer_loss"]

_KEYS = ("input_ids", "attention_mask", "loss_mask")


def answer_nll(apply_fn: ApplyFn, params: PyTree, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Summed answer-token NLL of each row: ``l_n = -sum_t m_n,t log p(x_n,t | x_n,<t)``.

    Args:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits`` (e.g. a :class:`DecoderFn`).
      params: its parameters.
      batch: ``input_ids``, ``attention_mask``, ``loss_mask`` of shape ``(B, T)``.

    Returns:
      float32 ``(B,)`` (:func:`jaxunlearn.losses.sequence_nll` of the logits).
    """
    logits = apply_fn(params, batch["input_ids"], batch["attention_mask"])
    return sequence_nll(logits, batch["input_ids"], batch["loss_mask"])


def answer_loss(apply_fn: ApplyFn, params: PyTree, batch: Mapping[str, jax.Array]) -> jax.Array:
    """The training loss: mean NLL per answer token over the batch, ``sum_n l_n / sum_n |y_n|``.

    ``|y_n|`` counts the answer tokens of row ``n`` (``loss_mask[:, 1:]``; at least 1 in total).

    Example:
      >>> import jax.numpy as jnp
      >>> uniform = lambda p, ids, mask: jnp.zeros(ids.shape + (4,))   # p(x) = 1/4 everywhere
      >>> batch = {"input_ids": jnp.zeros((2, 3), jnp.int32), "attention_mask": jnp.ones((2, 3)),
      ...          "loss_mask": jnp.array([[0, 1, 1], [0, 0, 1]])}
      >>> round(float(answer_loss(uniform, None, batch)), 4)   # log 4
      1.3863
    """
    n_tok = jnp.maximum(jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32)), 1.0)
    return jnp.sum(answer_nll(apply_fn, params, batch)) / n_tok


@dataclasses.dataclass(frozen=True)
class ExampleNLL:
    """Per-example loss of an apply function: one example's summed answer-token NLL.

    ``loss(params, example) = answer_nll(apply_fn, params, example[None])[0]`` for an example
    with ``input_ids``, ``attention_mask`` and ``loss_mask`` of shape ``(T,)`` (no batch
    axis): the ``loss_fn`` of :func:`jaxunlearn.fisher.fisher_diagonal`,
    :func:`~jaxunlearn.fisher.grad_importance` and :func:`~jaxunlearn.fisher.mean_grad`.
    Frozen and compared by ``apply_fn``, so equal losses share compiled code.

    Attributes:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits``.
    """

    apply_fn: ApplyFn

    def __call__(self, params: PyTree, example: Mapping[str, jax.Array]) -> jax.Array:
        """Summed answer NLL (float32 scalar) of one example (arrays of shape ``(T,)``)."""
        if not isinstance(example, Mapping) or any(k not in example for k in _KEYS):
            have = sorted(map(str, example)) if isinstance(example, Mapping) else type(example).__name__
            raise KeyError(f"an example needs the keys {_KEYS}; got {have}")
        batch = {k: jnp.asarray(example[k])[None] for k in _KEYS}
        return answer_nll(self.apply_fn, params, batch)[0]


@dataclasses.dataclass(frozen=True)
class DecoderNLL(ExampleNLL):
    """:class:`ExampleNLL` of a :class:`~jaxunlearn.models.Decoder` adapter; offers the fused Fisher.

    Its ``fisher_sums`` makes it a :class:`jaxunlearn.fisher.FusedFisherLoss`:
    ``fisher_diagonal(fn.example_nll, ...)`` (``method="auto"``) computes the Fisher by one
    forward and backward pass per batch (:mod:`jaxunlearn.fisher_fused`) instead of one
    gradient per example.

    Attributes:
      apply_fn: the :class:`DecoderFn` of a Decoder.
    """

    def fisher_sums(self, sample_fn: Callable | None = None):
        """The fused local sums ``(sum_n w_n (grad l_n)**2, sum_n w_n)`` of this loss
        (:class:`jaxunlearn.fisher_fused.FusedFisherSums`)."""
        from jaxunlearn.fisher_fused import FusedFisherSums  # the kernels load on first use only

        return FusedFisherSums(self.apply_fn.graphdef, sample_fn)


def example_nll(apply_fn: ApplyFn) -> ExampleNLL:
    """The per-example answer NLL of ``apply_fn``: ``apply_fn.example_nll`` for a :class:`DecoderFn`
    (fused-Fisher capable), else ``ExampleNLL(apply_fn)``.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = example_nll(lambda p, ids, mask: p * jnp.ones(ids.shape + (4,)))
      >>> ex = {"input_ids": jnp.array([0, 1]), "attention_mask": jnp.ones(2), "loss_mask": jnp.array([0, 1])}
      >>> round(float(loss(1.0, ex)), 4)   # one answer token at p = 1/4
      1.3863
    """
    if isinstance(apply_fn, DecoderFn):
        return apply_fn.example_nll
    return ExampleNLL(apply_fn)


def _state_key(rest: Any) -> tuple:
    """A hashable value of a (small) non-parameter state: its structure and its leaves' bytes."""
    leaves, treedef = jax.tree.flatten(rest)
    key = []
    for x in leaves:
        if isinstance(x, jax.core.Tracer):
            raise TypeError("DecoderFn needs a concrete non-parameter state (built outside jit)")
        a = np.asarray(x)
        key.append((a.shape, str(a.dtype), a.tobytes()))
    return treedef, tuple(key)


@dataclasses.dataclass(frozen=True, eq=False)
class DecoderFn:
    """A decoder (or any nnx model called as ``model(input_ids, attention_mask) -> logits``) as a
    pure, hashable function of its parameters.

    ``fn(params, input_ids, attention_mask) = nnx.merge(graphdef, params, rest)(input_ids,
    attention_mask)``; ``params`` is the ``nnx.Param`` state (or a pytree of that structure
    and of arrays that may be traced, sharded, fake-quantised...). Equal (and of equal hash)
    when ``graphdef`` and ``rest`` are equal by value.

    Attributes:
      graphdef: the model's ``nnx.GraphDef``.
      rest: its non-parameter state (``None`` when it has none, as a Decoder).

    Example:
      >>> from flax import nnx
      >>> from jaxunlearn.models import Decoder, ModelConfig
      >>> cfg = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1,
      ...                   num_heads=2, num_kv_heads=1)
      >>> fn, params = DecoderFn.of(Decoder(cfg, rngs=nnx.Rngs(0)))
      >>> fn(params, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3))).shape
      (2, 3, 16)
      >>> fn == DecoderFn.of(Decoder(cfg, rngs=nnx.Rngs(1)))[0]   # same architecture: same function
      True
    """

    graphdef: nnx.GraphDef
    rest: Any = None
    _key: tuple = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.graphdef, nnx.GraphDef):
            raise TypeError(f"graphdef must be an nnx.GraphDef, got {type(self.graphdef).__name__}")
        rest = self.rest
        if rest is not None and not jax.tree.leaves(rest):
            rest = None  # no state beyond the parameters (a Decoder): merge without it
        object.__setattr__(self, "rest", rest)
        object.__setattr__(self, "_key", (self.graphdef, None if rest is None else _state_key(rest)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DecoderFn) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    @classmethod
    def of(cls, model: nnx.Module) -> tuple[DecoderFn, PyTree]:
        """``(fn, params)`` of an nnx model: ``params`` its ``nnx.Param`` state, ``fn`` the rest.

        Raises:
          TypeError: ``model`` is not an ``nnx.Module``.
        """
        if not isinstance(model, nnx.Module):
            raise TypeError(f"DecoderFn.of needs an nnx.Module (e.g. a jaxunlearn.models.Decoder), "
                            f"got {type(model).__name__}")
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return cls(graphdef, rest), params

    def merge(self, params: PyTree) -> nnx.Module:
        """The model with ``params`` (a new module object each call)."""
        if self.rest is None:
            return nnx.merge(self.graphdef, params)
        return nnx.merge(self.graphdef, params, self.rest)

    def __call__(self, params: PyTree, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 **kwargs: Any) -> Any:
        """Logits ``(B, T, V)`` (float32 for a Decoder); ``kwargs`` go to the model's call
        (a Decoder's ``positions``, ``taps``, ``capture_inputs``)."""
        return self.merge(params)(input_ids, attention_mask, **kwargs)

    def hidden_state(self, params: PyTree, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                     layer: int, **kwargs: Any) -> jax.Array:
        """The residual stream after block ``layer``, ``(B, T, hidden)``: the model's
        :meth:`~jaxunlearn.models.Decoder.hidden_state` (the forward stopped after that block).

        Raises:
          TypeError: the model has no ``hidden_state`` (not a Decoder).
        """
        model = self.merge(params)
        if not hasattr(model, "hidden_state"):
            raise TypeError(f"{type(model).__name__} has no hidden_state(input_ids, attention_mask, layer=): "
                            "hidden states need a jaxunlearn.models.Decoder")
        return model.hidden_state(input_ids, attention_mask, layer=layer, **kwargs)

    @property
    def is_decoder(self) -> bool:
        """Whether the graph is a :class:`~jaxunlearn.models.Decoder` (the fused Fisher applies)."""
        try:
            root = self.graphdef.nodes[0].type
        except (AttributeError, IndexError, TypeError):
            return False
        return isinstance(root, type) and issubclass(root, Decoder)

    @property
    def example_nll(self) -> ExampleNLL:
        """The per-example loss ``loss(params, example) -> l_n`` (summed answer NLL of one example):
        a :class:`DecoderNLL` (fused Fisher) for a Decoder, an :class:`ExampleNLL` otherwise."""
        return DecoderNLL(self) if self.is_decoder and self.rest is None else ExampleNLL(self)

    def answer_nll(self, params: PyTree, batch: Mapping[str, jax.Array]) -> jax.Array:
        """``(B,)`` summed answer-token NLL per row (:func:`answer_nll`)."""
        return answer_nll(self, params, batch)

    def answer_loss(self, params: PyTree, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Mean NLL per answer token over the batch, the training loss (:func:`answer_loss`)."""
        return answer_loss(self, params, batch)
