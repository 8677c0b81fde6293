"""Fused diagonal Fisher of a :class:`jaxunlearn.models.Decoder`: one forward and backward pass per batch.

The loss of example ``n`` is its summed answer-token NLL,
``l_n = sequence_nll(model(x_n), x_n, loss_mask_n)`` (the batch convention of
:mod:`jaxunlearn.losses`), and the result is the same weighted diagonal Fisher as
:func:`jaxunlearn.fisher.fisher_diagonal`, ``F = (1/W) sum_n w_n (grad l_n)**2``,
without one gradient per example. It is what ``fisher_diagonal(fn.example_nll, params, batches)``
runs for ``fn, params = jaxunlearn.models.DecoderFn.of(model)``: that loss object offers
:class:`FusedFisherSums` (the :class:`jaxunlearn.fisher.FusedFisherLoss` protocol), and the
batch loop, placement and data parallelism are those of :mod:`jaxunlearn.reduction`.

Examples of a batch do not interact in the decoder, so the gradient of the summed
loss ``L = sum_n l_n`` with respect to a quantity of example ``n`` is the gradient of
``l_n`` alone. One ``jax.grad`` of ``L`` with respect to zero *taps* added to the
model's activations gives every per-example cotangent at once; the per-example
parameter gradients are then formed from them:

- Dense kernels (q/k/v/o, gate/up/down, untied ``lm_head``), ``y = x W``: with the
  captured inputs ``A_n`` (``T x d_in``, ``capture_inputs=True``) and the output
  cotangents ``G_n`` (``T x d_out``, the gradient of the output tap),
  ``grad_W l_n = A_n^T G_n`` and ``sum_n w_n (A_n^T G_n)**2`` is
  :func:`jaxunlearn.kernels.fisher.dense_fisher` with the token mask ``sqrt(w_n)``
  (tiled, float32 accumulation, never ``B x d_in x d_out`` in memory).
- Dense biases (Qwen2 q/k/v; optional Llama biases): ``grad_b l_n = sum_t G_n,t``.
- RMSNorm scales: each scale is broadcast to a per-example copy ``(B, 1, d)`` before
  the forward (``scale * y`` broadcasts over tokens), and ``jax.grad`` with respect
  to the copy is the stack of per-example scale gradients (``B x d``, tiny).
- Embedding ``E`` (``V x d``): with ``G^e_n`` the cotangent of the embedding output
  (a tap on the lookup), ``grad_E l_n [v] = sum_{t: x_n,t = v} G^e_n,t``. For each
  position ``S_n,t = sum_s [x_n,s = x_n,t] G^e_n,s`` (a ``T x T`` equality matrix
  times ``G^e_n``) and ``c_n,t`` the count of ``x_n,t`` in the example; scattering
  ``w_n S_n,t**2 / c_n,t`` into row ``x_n,t`` adds ``w_n (grad_E l_n [v])**2`` once
  per distinct token.
- Tied embeddings (``logits = X E^T``, ``X`` the final-norm output): the per-example
  gradient is ``H_n + S_n`` with the head part ``H_n = G^l_n^T X_n`` (``G^l`` the
  logits cotangent), so ``(H + S)**2 = H**2 + [v in x_n] (2 H S + S**2)``:
  ``sum_n w_n H_n**2`` is ``dense_fisher(G^l, X)`` and the cross term uses
  ``H_n[x_n,t] = sum_s G^l_n,s,x_n,t X_n,s``, gathered per position.

Scanned decoders (``ModelConfig(scan_layers=True)``, block leaves stacked ``(L, ...)``): the
taps of the blocks are stacked ``(L, B, T, out)`` scan inputs and their captured inputs come back
as stacked ``(L, B, T, in)`` scan outputs (``model(..., stacked=True)``); each stacked kernel's
Fisher is ``dense_fisher`` per layer under one ``lax.map`` (``(L, in, out)``), biases and scales
the rules above per layer. The result is the unrolled model's, stacked (tested).

Every rule is exact, so the result equals the ``vmap`` path up to floating-point
round-off (tested: float32 to ``rtol 1e-4``). The embedding hook replaces
``model.embed`` of the merged (per-call) model by a wrapper that adds the taps; the
Dense taps and input capture are the decoder's own (``taps=``, ``capture_inputs=``).

Cost: one forward plus the input-gradient half of the backward (no weight-gradient
matmuls) plus one ``dense_fisher`` per dense layer (the FLOPs of the weight-gradient
matmuls), so about one ordinary gradient computation. Memory: the activations of
one gradient computation plus the taps' cotangents (the size of the dense outputs);
``microbatch`` bounds it for large batches.

Sharded (``mesh=``, or params/batches placed on a mesh): the pass runs per data shard under
``jax.shard_map`` with the parameters gathered over the data axes (:mod:`jaxunlearn.reduction`);
a data shard holding only weight-0 rows contributes zeros. With a ``tp`` axis, XLA partitions
the forward over it; a Pallas ``dense_fisher`` (GPU/TPU) is a custom call XLA cannot split over
``tp``, so its operands are gathered over ``tp`` (activation-sized), not the parameters.

References:
  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
  Curvature", 2015 (per-example dense gradients ``a^T g``); Goodfellow, "Efficient
  Per-Example Gradient Computations", 2015; kfac-jax ``DenseDiagonal``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Callable, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxunlearn import reduction as rd
from jaxunlearn import tree as jt
from jaxunlearn.kernels import fisher as kf
from jaxunlearn.losses import sequence_nll
from jaxunlearn.models.decoder import Decoder, dense_shapes
from jaxunlearn.models.scan import stacked_dense_shapes

PyTree = Any
SampleFn = Callable[[PyTree, PyTree, jax.Array], PyTree]

__all__ = ["REQUIRED_KEYS", "FusedFisherSums", "fisher_diagonal_fused"]

REQUIRED_KEYS = ("input_ids", "attention_mask", "loss_mask")
_HI = jax.lax.Precision.HIGHEST
_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


# ---------------------------------------------------------------- checks


def _graphdef_of(model: Any) -> nnx.GraphDef:
    """The ``nnx.GraphDef`` of a Decoder, of a decoder adapter (its ``graphdef``), or the graphdef itself."""
    if isinstance(model, Decoder):
        return nnx.split(model, nnx.Param)[0]
    if isinstance(model, nnx.GraphDef):
        return model
    if isinstance(getattr(model, "graphdef", None), nnx.GraphDef):
        return model.graphdef
    raise TypeError(f"model must be a jaxunlearn.models.Decoder, its DecoderFn or its nnx.GraphDef, "
                    f"got {type(model).__name__}")


def _check_keys(batch: Mapping, what: str) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(f"{what} must be a dict with keys {REQUIRED_KEYS}, got {type(batch).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise KeyError(f"{what} lacks {missing} (has {sorted(map(str, batch))}); the fused Fisher needs "
                       f"{REQUIRED_KEYS}")


def _leaf_name(path: str) -> str:
    return path.removesuffix("/value")


def _classify(params: PyTree, graphdef: nnx.GraphDef) -> tuple[list[tuple[str, str, bool]], Any]:
    """``[(kind, name, stacked)]`` per params leaf (kind: kernel / bias / scale / embedding; stacked:
    a block leaf of a scanned model, leading layer axis) and the config.

    Raises:
      ValueError: a leaf the fused rules do not cover, or a kernel of the wrong shape.
    """
    model = nnx.merge(graphdef, params)
    if not isinstance(model, Decoder):
        raise TypeError(f"the graphdef describes a {type(model).__name__}, not a jaxunlearn.models.Decoder")
    c = model.config
    shapes = stacked_dense_shapes(c) if c.scan_layers else dense_shapes(c)
    kinds = []
    for path, x in jt.leaves_with_paths(params):
        name = _leaf_name(path)
        head, _, last = name.rpartition("/")
        stacked = c.scan_layers and name.startswith("layers/")
        lead = (c.num_layers,) if stacked else ()
        if name == "embed/embedding":
            kinds.append(("embedding", name, False))
        elif head in shapes and last in ("kernel", "bias"):
            want = lead + (shapes[head] if last == "kernel" else shapes[head][1:])
            if tuple(jnp.shape(x)) != want:
                raise ValueError(f"params leaf '{name}' has shape {jnp.shape(x)}, the decoder expects {want}")
            kinds.append((last, head, stacked))
        elif last == "scale" and jnp.ndim(x) == 1 + len(lead) and tuple(jnp.shape(x))[:len(lead)] == lead:
            kinds.append(("scale", name, stacked))
        else:
            raise ValueError(
                f"the fused Fisher has no rule for params leaf '{name}' (shape {jnp.shape(x)}); "
                "use method='vmap'"
            )
    return kinds, model.config


# ---------------------------------------------------------------- the embedding hook


class _EmbedTaps:
    """Stands in for ``model.embed``: adds a tap to the lookup and (tied) to the logits,
    and records the input of the tied output head."""

    def __init__(self, embed, tap: jax.Array, logits_tap: jax.Array | None):
        self._embed, self._tap, self._logits_tap = embed, tap, logits_tap
        self.head_input: jax.Array | None = None

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self._embed(ids)
        return x + self._tap.astype(x.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        self.head_input = x
        y = self._embed.attend(x)
        return y + self._logits_tap.astype(y.dtype)


# ---------------------------------------------------------------- one batch


def _kernel_operands(a: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``dense_fisher`` takes float32/bfloat16 of one dtype; anything else goes to float32."""
    if a.dtype == g.dtype and jnp.dtype(a.dtype) in _KERNEL_DTYPES:
        return a, g
    return a.astype(jnp.float32), g.astype(jnp.float32)


def _weighted_sq_sum(x: jax.Array, w: jax.Array) -> jax.Array:
    """``sum_n w_n x_n**2`` over the leading axis, float32."""
    x = x.astype(jnp.float32)
    return jnp.einsum("n,n...->...", w, x * x, precision=_HI)


def _embedding_fisher(ids, g_emb, w, vocab, g_logits=None, head_in=None, *, impl):
    """``sum_n w_n (grad_E l_n)**2`` from the embedding-output cotangent (and the tied head)."""
    g_emb = g_emb.astype(jnp.float32)
    same = (ids[:, :, None] == ids[:, None, :]).astype(jnp.float32)  # (B, T, T)
    s = jnp.einsum("bts,bsd->btd", same, g_emb, precision=_HI)  # S_n,t
    contrib = s * s
    out = jnp.zeros((vocab, g_emb.shape[-1]), jnp.float32)
    if g_logits is not None:
        g_logits, head_in = g_logits.astype(jnp.float32), head_in.astype(jnp.float32)
        at_ids = jnp.take_along_axis(g_logits, jnp.broadcast_to(ids[:, None, :], same.shape), axis=2)
        h = jnp.einsum("bst,bsd->btd", at_ids, head_in, precision=_HI)  # H_n[x_n,t]
        contrib = contrib + 2.0 * h * s
        sw = jnp.broadcast_to(jnp.sqrt(w)[:, None], ids.shape)
        out = out + kf.dense_fisher(g_logits, head_in, sw, impl=impl)
    contrib = contrib * (w[:, None, None] / jnp.sum(same, axis=-1, keepdims=True))
    return out.at[ids.reshape(-1)].add(contrib.reshape(-1, contrib.shape[-1]))


def _kernel_fisher(a: jax.Array, g: jax.Array, sw: jax.Array, stacked: bool, impl: str) -> jax.Array:
    """``dense_fisher(a, g, sqrt w)``; stacked ``(L, B, T, .)`` operands: per layer, under one ``lax.map``."""
    if not stacked:
        return kf.dense_fisher(*_kernel_operands(a, g), sw, impl=impl)
    return jax.lax.map(lambda ag: kf.dense_fisher(*_kernel_operands(*ag), sw, impl=impl), (a, g))


def _fused_sums(params, examples, weight, *, graphdef, impl) -> list[jax.Array]:
    """Per params leaf, ``sum_n w_n (grad l_n)**2`` (float32) for one (micro-)batch."""
    kinds, config = _classify(params, graphdef)
    ids = jnp.asarray(examples["input_ids"]).astype(jnp.int32)
    am, lm = examples["attention_mask"], examples["loss_mask"]
    B, T = ids.shape
    cd = config.compute_dtype
    scan = config.scan_layers
    leaves, treedef = jax.tree_util.tree_flatten(params)
    scale_idx = [i for i, (kind, _, _) in enumerate(kinds) if kind == "scale"]
    shapes = stacked_dense_shapes(config) if scan else dense_shapes(config)
    lead = {p: (config.num_layers,) if scan and p.startswith("layers/") else () for p in shapes}
    taps = {p: jnp.zeros(lead[p] + (B, T, o), cd) for p, (_, o) in shapes.items()}
    emb_tap = jnp.zeros((B, T, config.hidden_size), cd)
    logits_tap = jnp.zeros((B, T, config.vocab_size), cd) if config.tie_word_embeddings else None
    # per-example copies of each scale: (B, 1, d), stacked (L, B, 1, d) (the scan slices the layer axis)
    scales = [jnp.broadcast_to(leaves[i][..., None, None, :], leaves[i].shape[:-1] + (B, 1, leaves[i].shape[-1]))
              for i in scale_idx]

    def total_loss(taps, emb_tap, logits_tap, scales):
        new = list(leaves)
        for i, s in zip(scale_idx, scales):
            new[i] = s
        model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, new))
        hook = _EmbedTaps(model.embed, emb_tap, logits_tap)
        model.embed = hook
        logits, inputs = model(ids, am, taps=taps, capture_inputs=True, **({"stacked": True} if scan else {}))
        nll = sequence_nll(logits, ids, lm)
        return jnp.sum(nll), (inputs, hook.head_input)

    grads, (inputs, head_in) = jax.grad(total_loss, argnums=(0, 1, 2, 3), has_aux=True)(
        taps, emb_tap, logits_tap, scales
    )
    g_taps, g_emb, g_logits, g_scales = grads
    sw = jnp.broadcast_to(jnp.sqrt(weight)[:, None], (B, T))
    scale_sums = dict(zip(scale_idx, g_scales))
    out = []
    for i, (kind, name, stacked) in enumerate(kinds):
        if kind == "kernel":
            out.append(_kernel_fisher(inputs[name], g_taps[name], sw, stacked, impl))
        elif kind == "bias":  # per-example bias gradients (B, out), stacked (L, B, out): sum over tokens
            gb = jnp.sum(g_taps[name].astype(jnp.float32), axis=-2)
            out.append(_weighted_sq_sum(jnp.swapaxes(gb, 0, 1) if stacked else gb, weight))
        elif kind == "scale":
            gs = scale_sums[i][..., 0, :]  # (B, d), stacked (L, B, d)
            out.append(_weighted_sq_sum(jnp.swapaxes(gs, 0, 1) if stacked else gs, weight))
        else:
            out.append(_embedding_fisher(ids, g_emb, weight, config.vocab_size, g_logits,
                                         head_in if config.tie_word_embeddings else None, impl=impl))
    return out


# ---------------------------------------------------------------- local sums and the public API


@dataclasses.dataclass(frozen=True)
class FusedFisherSums:
    """Local sums ``(sum_n w_n (grad l_n)**2 per params leaf, sum_n w_n)`` of a decoder, fused.

    A :class:`jaxunlearn.reduction.LocalSums` (hashable: compiled once per architecture and
    options). Rows are first sampled (``sample_fn``, true Fisher), rows of weight 0 then
    replaced by a row of positive weight (so no NaN reaches ``F``; a data shard of padding
    only contributes zeros), then the rows run in micro-batches of ``microbatch`` (one pass
    each, a ``lax.scan``; ``None``: one pass).

    Attributes:
      graphdef: the ``nnx.GraphDef`` of a :class:`~jaxunlearn.models.Decoder`.
      sample_fn: ``sample_fn(params, example, key) -> example`` or None.
      impl: :func:`jaxunlearn.kernels.fisher.dense_fisher` path.
      microbatch: rows per forward/backward pass, or None.
    """

    graphdef: nnx.GraphDef
    sample_fn: SampleFn | None = None
    impl: str = "auto"
    microbatch: int | None = None
    check_vma: ClassVar[bool] = False  # dense_fisher's scan starts from an invariant carry; Pallas is untyped

    def check_batch(self, params: PyTree, examples: PyTree, index: int) -> None:
        """Host-side checks before a batch runs: the keys, and (batch 0) the params' leaves."""
        _check_keys(examples, f"batch {index}")
        if index == 0:
            _classify(params, self.graphdef)

    def __call__(self, params: PyTree, data: Mapping[str, Any]) -> tuple[PyTree, jax.Array]:
        weight = data["w"]
        examples = {k: jnp.asarray(data["ex"][k]) for k in REQUIRED_KEYS}
        if self.sample_fn is not None:  # the vmap path's keys: fold_in(batch_key, n)
            drawn = jax.vmap(self.sample_fn, in_axes=(None, 0, 0))(jax.lax.stop_gradient(params), examples,
                                                                    data["key"])
            examples = {k: drawn[k] for k in REQUIRED_KEYS}
        examples = rd.valid_rows(examples, weight)
        leaves, treedef = jax.tree_util.tree_flatten(params)

        def body(carry, chunk):
            sums = _fused_sums(params, chunk["ex"], chunk["w"], graphdef=self.graphdef, impl=self.impl)
            return [c + s for c, s in zip(carry, sums)]

        zeros = [jnp.zeros(x.shape, jnp.float32) for x in leaves]
        sums = rd.scan_chunks(body, zeros, {"ex": examples, "w": weight}, self.microbatch)
        wsum = jnp.sum(weight)
        return jax.tree_util.tree_unflatten(treedef, [jnp.where(wsum > 0, x, 0.0) for x in sums]), wsum


def fisher_diagonal_fused(
    model: Any,
    params: PyTree,
    batches: Iterable[Mapping[str, jax.Array]],
    *,
    labels: Literal["empirical", "sampled"] = "empirical",
    rng: jax.Array | None = None,
    sample_fn: SampleFn | None = None,
    microbatch: int | None = None,
    impl: str = "auto",
    check_finite: bool = True,
    mesh: Mesh | None = None,
) -> PyTree:
    """Diagonal Fisher of a decoder's answer NLL, by one forward/backward pass per batch.

    ``F_i = (1/W) sum_n w_n (d l_n / d theta_i)**2`` with ``l_n`` the summed
    answer-token NLL of example ``n``, ``w_n`` the batch's ``"example_weight"`` (1 if
    absent) and ``W = sum_n w_n``: the same quantity as
    ``fisher_diagonal(fn.example_nll, params, batches, method="vmap")``, computed
    from per-example activations and cotangents instead of per-example gradients
    (the rules are in the module docstring). ``fisher_diagonal(fn.example_nll, ...)``
    (``method="auto"``) runs this; call it directly for ``microbatch`` and ``impl``.

    Args:
      model: a :class:`~jaxunlearn.models.Decoder`, its :class:`~jaxunlearn.models.DecoderFn`
        or its ``nnx.GraphDef``.
      params: the decoder's ``nnx.Param`` state (``DecoderFn.of(model)[1]``).
      batches: iterable of batch dicts with ``input_ids``, ``attention_mask`` and
        ``loss_mask`` of shape ``(B, T)`` and optionally ``example_weight`` ``(B,)``;
        other keys are ignored.
      labels: ``"empirical"`` (data tokens) or ``"sampled"`` (true Fisher: each
        example is first passed through ``sample_fn`` with the key
        ``fold_in(fold_in(rng, batch_index), n)``, as in the vmap path).
      rng: PRNG key, required with ``labels="sampled"``.
      sample_fn: ``sample_fn(params, example, key) -> example``, required with
        ``labels="sampled"`` (see :func:`jaxunlearn.fisher.sample_labels_fn`).
      microbatch: examples per forward/backward pass (a ``lax.scan`` over chunks,
        padded with weight-0 rows); ``None``: the whole batch at once. Bounds the
        memory at that of one gradient computation on ``microbatch`` examples.
      impl: :func:`jaxunlearn.kernels.fisher.dense_fisher` path (``"auto"``: Pallas on
        TPU/GPU, the XLA scan on CPU; ``"pallas"``, ``"xla"``, ``"reference"``).
      check_finite: raise ``FloatingPointError`` naming the first leaf with NaN/Inf.
      mesh: run data-parallel on this mesh, as :func:`jaxunlearn.fisher.fisher_diagonal`
        (``None``: the mesh the params, else the first batch, are sharded on).

    Returns:
      A pytree like ``params`` with float32 leaves (with the params' shardings on a
      mesh). With a bfloat16 compute dtype the dense layers' ``a^T g`` products accumulate
      in float32 (more accurate than the vmap path's bfloat16 per-example gradients) and the
      example weights enter ``dense_fisher`` as ``sqrt(w_n)`` rounded to bfloat16 (exact for
      0/1 weights).

    Raises:
      TypeError: ``model`` is not a Decoder / DecoderFn / GraphDef, batches not dicts.
      KeyError: a batch lacks ``input_ids``, ``attention_mask`` or ``loss_mask``.
      ValueError: empty ``batches``, mismatched batch sizes, negative or all-zero
        weights, params the fused rules do not cover, bad ``microbatch``, missing
        ``rng`` / ``sample_fn``.
      FloatingPointError: NaN or Inf in the result.

    Example:
      >>> from jaxunlearn.models import Decoder, DecoderFn, ModelConfig
      >>> cfg = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1,
      ...                   num_heads=2, num_kv_heads=1)
      >>> fn, params = DecoderFn.of(Decoder(cfg, rngs=nnx.Rngs(0)))
      >>> batch = {"input_ids": jnp.ones((2, 4), jnp.int32), "attention_mask": jnp.ones((2, 4)),
      ...          "loss_mask": jnp.ones((2, 4))}
      >>> F = fisher_diagonal_fused(fn, params, [batch], microbatch=1)
      >>> F["norm"]["scale"].shape
      (8,)
    """
    graphdef = _graphdef_of(model)
    name = "fisher_diagonal_fused"
    if labels not in ("empirical", "sampled"):
        raise ValueError(f"unknown labels {labels!r}; expected one of ('empirical', 'sampled')")
    sampled = labels == "sampled"
    if sampled and (rng is None or sample_fn is None):
        raise ValueError(f"{name}(labels='sampled') needs an `rng` key and `sample_fn`")
    if not sampled and sample_fn is not None:
        raise ValueError("sample_fn is only used with labels='sampled'")
    if microbatch is not None:
        rd.check_chunk_size(microbatch, "microbatch")
    rd.check_params(params, name)
    _classify(params, graphdef)  # unknown leaves / wrong shapes fail before any compilation
    local = FusedFisherSums(graphdef, sample_fn, impl, None if microbatch is None else int(microbatch))
    acc, total = rd.reduce_batches(local, params, batches, name=name, rng=rng if sampled else None, mesh=mesh)
    return rd.finish(acc, total, name, check_finite)
