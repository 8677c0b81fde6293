"""Model sparsity for unlearning: prune first, then unlearn; and sparsity-aware (l1) unlearning.

Jia et al. (NeurIPS 2023) show that a sparse model is easier to unlearn approximately and
give two recipes, both composable here with every gradient method of
:class:`jaxunlearn.UnlearnConfig`:

- **Prune first, then unlearn** (:func:`magnitude_prune_mask`): one-shot global magnitude
  pruning (the paper's OMP: ``torch.nn.utils.prune.global_unstructured`` with
  ``L1Unstructured``) removes the fraction ``sparsity`` of smallest ``|theta_i|`` over all the
  targeted weight matrices together (one threshold for all of them), the pruned weights are
  set to 0, and the mask stays fixed while unlearning: the updates are masked
  (:func:`jaxunlearn.masked_updates`), so the model stays exactly that sparse
  (:func:`sparsity` reports it). ``GradientMethod(prune_sparsity=...)`` runs it. The paper
  prunes convolution weights; here the targets are the decoder blocks' linear kernels (the
  leaves :func:`jaxunlearn.quant.quant_targets` selects: embeddings, head and norms stay dense).
- **Sparsity-aware unlearning** (:func:`l1_regularization`): the objective gains
  ``alpha_t ||theta||_1`` with ``alpha_t = alpha (1 - t / T)`` for ``t < T`` and 0 after (the
  paper's linear decay over the unlearning epochs, ``unlearn/FT.py``: ``current_alpha = alpha *
  (1 - epoch / (unlearn_epochs - no_l1_epochs))``; here per step, ``T`` = ``l1_decay_steps``).
  As an optax transform it adds the subgradient ``alpha_t sign(theta)`` (0 at 0, as torch's
  ``|x|``) to the incoming gradient; ``UnlearnConfig(l1=alpha, l1_decay_steps=T)`` puts it
  after the projection and before clipping, as a term of the loss would be.

References:
  Jia, Liu, Ram, Yao, Liu, Liu, Sharma, Liu, "Model Sparsity Can Simplify Machine Unlearning",
  NeurIPS 2023 (code: OPTML-Group/Unlearn-Sparse).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxunlearn import tree as jt
from jaxunlearn import validate as V
from jaxunlearn.quant import quant_targets
from jaxunlearn.saliency import top_k_mask
from jaxunlearn.tree import PyTree

__all__ = ["magnitude_prune_mask", "sparsity", "l1_regularization"]


def magnitude_prune_mask(params: PyTree, sparsity: float, *, targets: str = "auto") -> PyTree:
    """Global magnitude pruning: ``False`` on the ``sparsity`` fraction of smallest ``|theta_i|``.

    Over the targeted leaves together (``targets`` as :func:`jaxunlearn.quant.quant_targets`:
    ``"auto"`` = the decoder blocks' linear kernels when the tree has them, else every leaf of
    ``ndim >= 2``), ``round(sparsity N)`` entries are pruned (as torch's ``global_unstructured``)
    and the other ``k`` kept, the largest in
    magnitude (ties at the threshold: earliest in flattening order, as
    :func:`jaxunlearn.saliency.top_k_mask`); other leaves are all ``True``.

    Args:
      params: the parameter pytree.
      sparsity: fraction to prune, in ``[0, 1)``.
      targets: which leaves are pruned (``"auto"``, ``"blocks"``, ``"all"``).

    Returns:
      A pytree of boolean masks like ``params`` (``True`` = kept).

    Raises:
      ValueError: ``sparsity`` outside ``[0, 1)``, no targeted leaf, NaN/Inf in a target.

    >>> m = magnitude_prune_mask({"w": jnp.array([[0.1, -3.0], [2.0, 0.5]])}, 0.5, targets="all")
    >>> m["w"].tolist()
    [[False, True], [True, False]]
    """
    s = V.check_float("magnitude_prune_mask", "sparsity", sparsity, min=0.0)
    if s >= 1.0:
        raise ValueError(f"magnitude_prune_mask: sparsity must be in [0, 1), got {sparsity!r}")
    chosen = quant_targets(params, targets)
    leaves, treedef = jax.tree.flatten(params)
    flags = treedef.flatten_up_to(chosen)
    picked = [x for x, f in zip(leaves, flags) if f]
    if not picked:
        raise ValueError("magnitude_prune_mask: no leaf to prune (targets selected none)")
    jt.check_finite(jax.tree.unflatten(treedef, [x if f else jnp.zeros(()) for x, f in zip(leaves, flags)]),
                    "params")
    n = sum(int(x.size) for x in picked)
    k = max(1, n - round(s * n))  # torch's prune count: round(amount * n)
    kept = iter(top_k_mask([jnp.abs(jnp.asarray(x).astype(jnp.float32)) for x in picked], k) if k < n
                else [jnp.ones(jnp.shape(x), bool) for x in picked])
    return jax.tree.unflatten(treedef, [next(kept) if f else jnp.ones(jnp.shape(x), bool)
                                        for x, f in zip(leaves, flags)])


def sparsity(params: PyTree, *, targets: str = "auto") -> float:
    """Fraction of exact zeros among the targeted entries (``targets`` as
    :func:`magnitude_prune_mask`): what pruning and the masked unlearning leave.

    >>> sparsity({"w": jnp.array([[0.0, 1.0], [0.0, 2.0]])}, targets="all")
    0.5
    """
    chosen = quant_targets(params, targets)
    leaves, treedef = jax.tree.flatten(params)
    picked = [x for x, f in zip(leaves, treedef.flatten_up_to(chosen)) if f]
    n = sum(int(x.size) for x in picked)
    if n == 0:
        raise ValueError("sparsity: no targeted leaf")
    return float(sum(int(jnp.sum(jnp.asarray(x) == 0)) for x in picked)) / n


def l1_regularization(alpha: float, decay_steps: int) -> optax.GradientTransformation:
    """Add the subgradient of ``alpha_t ||theta||_1``: ``u <- u + alpha_t sign(theta)``.

    ``alpha_t = alpha * max(0, 1 - t / decay_steps)`` at the ``t``-th update (t = 0, 1, ...),
    the linear decay of sparsity-aware unlearning (module docstring). Needs ``params`` in
    ``update``; adds in float32, returns the updates' dtypes.

    Args:
      alpha: the initial weight (>= 0).
      decay_steps: steps over which it decays to 0 (>= 1).

    Returns:
      An ``optax.GradientTransformation`` whose state is the step count (``optax.ScaleByScheduleState``).

    >>> tx = l1_regularization(0.5, decay_steps=2)
    >>> p = {"w": jnp.array([2.0, -1.0, 0.0])}
    >>> u, s = tx.update({"w": jnp.zeros(3)}, tx.init(p), p)
    >>> u["w"].tolist()
    [0.5, -0.5, 0.0]
    >>> u, s = tx.update({"w": jnp.zeros(3)}, s, p)
    >>> u["w"].tolist()
    [0.25, -0.25, 0.0]
    """
    alpha = V.check_float("l1_regularization", "alpha", alpha, min=0.0)
    decay_steps = V.check_int("l1_regularization", "decay_steps", decay_steps, min=1)

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("l1_regularization needs the params: tx.update(updates, state, params)")
        frac = 1.0 - state.count.astype(jnp.float32) / decay_steps
        a = alpha * jnp.maximum(frac, 0.0)
        out = jax.tree.map(lambda u, p: (jnp.asarray(u).astype(jnp.float32) + a * jnp.sign(p).astype(jnp.float32)
                                         ).astype(jnp.result_type(u)), updates, params)
        return out, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
