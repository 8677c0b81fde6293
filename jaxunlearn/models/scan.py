"""Decoder blocks as one scanned layer: stacked parameters and the ``jax.lax.scan`` that runs them.

With ``ModelConfig(scan_layers=True)`` the :class:`~jaxunlearn.models.Decoder` keeps its ``L``
uniform blocks as one ``Block`` whose every parameter carries a leading layer axis
(``layers/attn/q_proj/kernel`` is ``(L, in, out)``, row ``i`` the kernel of block ``i``), and its
forward is

    x_{i+1}, y_i = block(params[i], x_i, xs[i])      for i = 0 .. n-1   (one ``lax.scan``)

with ``xs`` the per-layer inputs (taps, KV cache) and ``y`` the per-layer outputs (captured
inputs, new KV cache) stacked along the same axis. The compiled program holds the block once, so
its size and compile time do not grow with ``L`` (the flax nnx "scan over layers" pattern, written
here as ``jax.lax.scan`` over the ``nnx.split`` state and an ``nnx.merge`` in the body). Remat
(``ModelConfig.remat``) wraps the scan body in ``jax.checkpoint``.

Layouts:

- parameters: :func:`stack_layer_params` / :func:`unstack_layer_params` convert a pure parameter
  dict (``nnx.to_pure_dict``) between ``{"layers": {i: block}}`` (unrolled) and
  ``{"layers": block with (L, ...) leaves}`` (scanned); a model converts with
  :func:`to_scanned` / :func:`to_unrolled` (same weights, same function).
- taps and captured inputs: per layer (``layers/{i}/attn/q_proj``, ``(B, T, out)``: the
  Decoder's default, identical for both layouts) or stacked (``layers/attn/q_proj``,
  ``(L, B, T, out)``: ``Decoder.__call__(..., stacked=True)`` of a scanned model, the scan's own
  layout without per-layer slices); :func:`stack_taps` / :func:`unstack_taps` convert.
- KV cache of a scanned model: ``{"k": (L, B, S, K, d), "v": (L, B, S, K, d)}``.

References:
  Flax nnx guide "Scan over layers" (``nnx.vmap`` to create, ``nnx.scan`` to apply);
  MaxText ``scan_layers`` (the same option for Llama models in JAX).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxunlearn.models.config import ModelConfig
from jaxunlearn.tree import path_str

__all__ = [
    "BLOCK_DENSE",
    "block_dense_shapes",
    "stacked_dense_shapes",
    "stack_modules",
    "scan_modules",
    "stack_layer_params",
    "unstack_layer_params",
    "stack_taps",
    "unstack_taps",
    "to_scanned",
    "to_unrolled",
    "is_stacked",
    "check_unrolled",
]

Array = jax.Array
_STACKED = re.compile(r"(?:^|/)layers/(?:attn|mlp|attn_norm|mlp_norm)(?:/|$)")

BLOCK_DENSE = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj",
               "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
"""The Dense layers of one block, in forward order (paths relative to the block)."""


def block_dense_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """``{sub: (in_features, out_features)}`` of one block's Dense layers (:data:`BLOCK_DENSE` order)."""
    c = config
    qd, kvd, d, f = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
    return dict(zip(BLOCK_DENSE, [(d, qd), (d, kvd), (d, kvd), (qd, d), (d, f), (d, f), (f, d)]))


def stacked_dense_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """``{path: (in, out)}`` of the Dense layers in the stacked layout: ``layers/{sub}`` (taps and
    captured inputs carry a leading layer axis there), then ``lm_head`` unless tied."""
    out = {f"layers/{sub}": shape for sub, shape in block_dense_shapes(config).items()}
    if not config.tie_word_embeddings:
        out["lm_head"] = (config.hidden_size, config.vocab_size)
    return out


# --------------------------------------------------------------------------- modules


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module of the common graph whose every state leaf is ``stack([m_0 leaf, m_1 leaf, ...])``.

    Args:
      modules: modules of one structure (equal ``nnx.GraphDef``), e.g. the blocks of a decoder.

    Returns:
      The stacked module (only meaningful through :func:`scan_modules`).

    Raises:
      ValueError: no modules, or modules of different structures.
    """
    if not modules:
        raise ValueError("stack_modules: no modules to stack")
    splits = [nnx.split(m) for m in modules]
    graphdef = splits[0][0]
    for i, (g, _) in enumerate(splits[1:], start=1):
        if g != graphdef:
            raise ValueError(f"stack_modules: module {i} differs in structure from module 0 (layers must be uniform)")
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[s for _, s in splits])
    return nnx.merge(graphdef, stacked)


def _checkpoint_policy(remat: str):
    return jax.checkpoint_policies.dots_saveable if remat == "dots_saveable" else None


def scan_modules(stacked: nnx.Module, step: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], carry: Any,
                 xs: Any = None, *, length: int, remat: str = "none") -> tuple[Any, Any]:
    """``carry, ys = lax.scan`` of ``step(module_i, carry, xs_i) -> (carry, y_i)`` over layers ``0 .. length-1``.

    ``module_i`` is the module with row ``i`` of every stacked leaf (``nnx.merge`` of the sliced
    state in the body; the body must not mutate it). ``xs`` leaves carry a leading axis of size
    ``length``; ``ys`` come back stacked the same way.

    Args:
      stacked: from :func:`stack_modules` (leaves ``(L, ...)``, ``L >= length``).
      step: the per-layer function.
      carry: the initial carry (e.g. the residual stream).
      xs: per-layer inputs, or None.
      length: the number of leading layers to run (``L`` for all; fewer to stop early).
      remat: ``"none"``, ``"full"`` (the body under ``jax.checkpoint``: only the carry is saved per
        layer) or ``"dots_saveable"`` (its matmul outputs are saved too).

    Returns:
      ``(final carry, stacked ys)``.
    """
    graphdef, state = nnx.split(stacked)
    total = jax.tree.leaves(state)[0].shape[0]
    if not 1 <= length <= total:
        raise ValueError(f"scan_modules: length must be in [1, {total}], got {length}")
    if length < total:
        state = jax.tree.map(lambda a: a[:length], state)

    def body(carry, inputs):
        st, x = inputs
        return step(nnx.merge(graphdef, st), carry, x)

    if remat != "none":
        body = jax.checkpoint(body, policy=_checkpoint_policy(remat), prevent_cse=False)
    return jax.lax.scan(body, carry, (state, xs))


# --------------------------------------------------------------------------- parameter layouts


def _layer_keys(layers: Mapping) -> list:
    keys = list(layers)
    if not keys or sorted(int(k) for k in keys) != list(range(len(keys))):
        raise ValueError(f"expected per-layer entries 0 .. L-1 under 'layers', got keys {keys[:5]}")
    return sorted(keys, key=int)


def stack_layer_params(pure: Mapping) -> dict:
    """The scanned layout of an unrolled pure parameter dict: ``{"layers": {i: tree_i}}`` ->
    ``{"layers": stack(tree_0, tree_1, ...)}`` (leaves ``(L, ...)``); other entries unchanged.

    Raises:
      ValueError: no ``layers`` entry, or its keys are not ``0 .. L-1``.
    """
    if "layers" not in pure:
        raise ValueError("stack_layer_params: the parameter dict has no 'layers' entry")
    layers = pure["layers"]
    trees = [layers[k] for k in _layer_keys(layers)]
    return {**pure, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *trees)}


def unstack_layer_params(pure: Mapping, num_layers: int) -> dict:
    """The unrolled layout of a scanned pure parameter dict (inverse of :func:`stack_layer_params`):
    ``{"layers": {i: tree with row i of every leaf}}``.

    Raises:
      ValueError: no ``layers`` entry, or a leaf whose leading axis is not ``num_layers``.
    """
    if "layers" not in pure:
        raise ValueError("unstack_layer_params: the parameter dict has no 'layers' entry")
    for x in jax.tree.leaves(pure["layers"]):
        if jnp.ndim(x) < 1 or jnp.shape(x)[0] != num_layers:
            raise ValueError(f"unstack_layer_params: a 'layers' leaf has shape {jnp.shape(x)}, expected a leading "
                             f"layer axis of {num_layers}")
    stacked = pure["layers"]
    return {**pure, "layers": {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(num_layers)}}


def stack_taps(taps: Mapping[str, Array], config: ModelConfig) -> dict[str, Array]:
    """Per-layer taps (``layers/{i}/{sub}``) -> stacked (``layers/{sub}``, ``(L, ...)``); a block
    Dense tapped at some layers only gets zeros (the identity tap) at the others; ``lm_head`` is
    passed through.

    Raises:
      ValueError: a key that is neither ``layers/{i}/{sub}`` with ``i < num_layers`` nor ``lm_head``.
    """
    out: dict[str, Array] = {}
    per_sub: dict[str, dict[int, Array]] = {}
    for key, tap in taps.items():
        if key == "lm_head":
            out[key] = tap
            continue
        head, _, rest = key.partition("/")
        idx, _, sub = rest.partition("/")
        if head != "layers" or not idx.isdigit() or int(idx) >= config.num_layers or sub not in BLOCK_DENSE:
            raise ValueError(f"unknown tap path '{key}'; valid paths come from dense_paths()")
        per_sub.setdefault(sub, {})[int(idx)] = tap
    for sub in BLOCK_DENSE:
        if sub in per_sub:
            given = per_sub[sub]
            ref = next(iter(given.values()))
            zero = jnp.zeros(jnp.shape(ref), ref.dtype)
            out[f"layers/{sub}"] = jnp.stack([given.get(i, zero) for i in range(config.num_layers)])
    return out


def unstack_taps(stacked: Mapping[str, Array], num_layers: int | None = None) -> dict[str, Array]:
    """Stacked (``layers/{sub}``, ``(n, ...)``) -> per layer (``layers/{i}/{sub}``, layer-major
    order); other keys (``lm_head``) passed through. ``num_layers`` defaults to the leading axis."""
    out: dict[str, Array] = {}
    subs = [k for k in stacked if k.startswith("layers/")]
    n = num_layers if num_layers is not None else (jnp.shape(stacked[subs[0]])[0] if subs else 0)
    for i in range(n):
        for k in subs:
            out[f"layers/{i}/{k.removeprefix('layers/')}"] = stacked[k][i]
    out.update({k: v for k, v in stacked.items() if not k.startswith("layers/")})
    return out


def _convert(model: nnx.Module, scan: bool) -> nnx.Module:
    c = getattr(model, "config", None)
    if not isinstance(model, nnx.Module) or not isinstance(c, ModelConfig):
        raise TypeError(f"model must be a jaxunlearn.models.Decoder, got {type(model).__name__}")
    if c.scan_layers == scan:
        return model
    new_cfg = c.replace(scan_layers=scan)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: type(model)(new_cfg, rngs=nnx.Rngs(0))))
    pure = nnx.to_pure_dict(nnx.state(model))
    pure = stack_layer_params(pure) if scan else unstack_layer_params(pure, c.num_layers)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def to_scanned(model: nnx.Module) -> nnx.Module:
    """The same decoder with ``scan_layers=True`` (stacked copies of the block parameters;
    ``model`` itself is unchanged, and returned as is when already scanned)."""
    return _convert(model, True)


def to_unrolled(model: nnx.Module) -> nnx.Module:
    """The same decoder with ``scan_layers=False`` (per-layer slices of the stacked parameters)."""
    return _convert(model, False)


def is_stacked(params: Any) -> bool:
    """Whether a pytree holds stacked decoder blocks: a leaf under ``layers/{attn,mlp,attn_norm,
    mlp_norm}`` with no layer index in its path (also below a prefix: ``0/mu/layers/attn/...``)."""
    return any(_STACKED.search(path_str(p)) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def check_unrolled(params: Any, owner: str) -> None:
    """Raise ``ValueError`` naming ``owner`` and ``scan_layers`` if ``params`` holds stacked blocks
    (:func:`is_stacked`): for code that walks per-layer ``layers/{i}/...`` paths. Reads paths only.
    """
    if is_stacked(params):
        raise ValueError(
            f"{owner} needs per-layer parameter paths 'layers/{{i}}/...', but these parameters hold stacked "
            "decoder blocks ('layers/attn/...' with a leading layer axis: ModelConfig.scan_layers=True); "
            "convert with jaxunlearn.models.scan.to_unrolled(model) (or unstack_layer_params) first, or load "
            "the model with scan_layers=False")
