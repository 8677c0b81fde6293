"""Sequence losses on answer tokens, and the unlearning objectives built on them.

Batch convention (shared by ``jaxunlearn.data``, training, evaluation and every
transform): a batch is a dict of arrays

- ``input_ids``      int32 (B, T): prompt tokens then answer tokens, padded;
- ``attention_mask`` int32 (B, T): 1 on real tokens, 0 on padding;
- ``loss_mask``      float32 (B, T): 1 on the tokens to be *predicted* (the
  answer tokens and the closing EOS), 0 on the prompt and the padding.

Logits at position t predict token t + 1, so the per-token log-probability of
token t (t >= 1) is ``log_softmax(logits[:, t-1])[input_ids[:, t]]`` and is
weighted by ``loss_mask[:, t]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "token_logprobs",
    "sequence_nll",
    "mean_token_nll",
    "batch_token_nll",
    "gradient_ascent",
    "grad_diff",
    "npo",
    "simnpo",
    "kl_to_reference",
    "wga",
    "undial",
]


def token_logprobs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Log-probability of each next token: ``out[b, t] = log p(x_{t+1} | x_{<=t})``.

    Args:
      logits: (..., T, V) model outputs.
      input_ids: (..., T) tokens.

    Returns:
      (..., T - 1) float32 log-probabilities of ``input_ids[..., 1:]``.
    """
    logits = logits[..., :-1, :].astype(jnp.float32)
    targets = input_ids[..., 1:]
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - logz


def sequence_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Summed NLL over answer tokens: ``-sum_t m_t log p(x_t | x_<t)`` per sequence.

    Args:
      logits: (..., T, V).
      input_ids: (..., T).
      loss_mask: (..., T), 1 on tokens to predict (see the module docstring).

    Returns:
      (...,) float32 summed negative log-likelihood of each sequence.
    """
    lp = token_logprobs(logits, input_ids)
    m = loss_mask[..., 1:].astype(jnp.float32)
    return -jnp.sum(lp * m, axis=-1)


def mean_token_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Length-normalised NLL ``sequence_nll / |y|`` per sequence (|y| = answer tokens, >= 1)."""
    m = loss_mask[..., 1:].astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return sequence_nll(logits, input_ids, loss_mask) / n


def batch_token_nll(nll_sum: jax.Array, lengths: jax.Array) -> jax.Array:
    """The Hugging Face causal-LM loss: every answer token of the batch pooled,
    ``sum_n NLL_n / max(sum_n |y_n|, 1)``.

    This is ``model(**batch).loss`` of a ``transformers`` causal LM (cross-entropy averaged over
    all label positions that are not -100), the retain term (and GA / GradDiff forget term) of
    open-unlearning's trainers. It weights long answers more than ``mean_n NLL_n / |y_n|``
    and differs from ``mean_n NLL_n`` (the mean over sequences of summed NLL) by about the
    mean answer length.

    Args:
      nll_sum: (B,) per-example summed answer NLL (:func:`sequence_nll`).
      lengths: (B,) answer tokens per example (``loss_mask[:, 1:].sum(-1)``).

    Returns:
      A float32 scalar.

    >>> float(batch_token_nll(jnp.array([2.0, 6.0]), jnp.array([1.0, 3.0])))
    2.0
    """
    if jnp.shape(nll_sum) != jnp.shape(lengths):
        raise ValueError(f"nll_sum {jnp.shape(nll_sum)} and lengths {jnp.shape(lengths)} must have the same shape")
    n = jnp.sum(jnp.asarray(lengths).astype(jnp.float32))
    return jnp.sum(jnp.asarray(nll_sum).astype(jnp.float32)) / jnp.maximum(n, 1.0)


# ------------------------------------------------------------ unlearning objectives
#
# Convention: every objective below is a scalar to be *minimised*; the total unlearning loss
# is ``gamma * L_f + alpha * L_r``. Per-example inputs have shape (B,) (any shape is accepted:
# the mean is over all entries), e.g. ``sequence_nll(...)`` of a forget or retain batch.


def _mean_f32(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x).astype(jnp.float32)
    if x.size == 0:
        raise ValueError("empty batch: cannot average a loss over 0 examples")
    return jnp.mean(x)


def gradient_ascent(nll_forget: jax.Array) -> jax.Array:
    """Gradient ascent forget loss ``L_f = -mean_n NLL_f,n`` (minimising it raises the NLL).

    Args:
      nll_forget: (B,) per-example summed answer NLL on the forget batch.

    Returns:
      A float32 scalar.

    References:
      Jang et al., "Knowledge Unlearning for Mitigating Privacy Risks in Language Models", 2023.
    """
    return -_mean_f32(nll_forget)


def grad_diff(
    nll_forget: jax.Array, nll_retain: jax.Array, *, gamma: float = 1.0, alpha: float = 1.0
) -> jax.Array:
    """GradDiff: ``gamma * (-mean NLL_f) + alpha * mean L_r``.

    Args:
      nll_forget: (B_f,) per-example forget NLL.
      nll_retain: (B_r,) per-example retain loss: the NLL, or for the KL variant the
        per-example (or already averaged) ``kl_to_reference`` on retain data.
      gamma: weight of the forget term.
      alpha: weight of the retain term.

    Returns:
      A float32 scalar.

    References:
      Liu et al., "Continual Learning and Private Unlearning", 2022; Maini et al., "TOFU", 2024.
    """
    return gamma * gradient_ascent(nll_forget) + alpha * _mean_f32(nll_retain)


def npo(logp_forget: jax.Array, ref_logp_forget: jax.Array, *, beta: float = 0.1) -> jax.Array:
    """Negative Preference Optimisation forget loss.

    ``L_NPO = -(2 / beta) mean_n log sigmoid(-beta (log p_theta(y_n|x_n) - log p_ref(y_n|x_n)))``

    with log p the *summed* answer log-probability (``-sequence_nll``). At
    ``log p_theta = log p_ref`` its value is ``(2 / beta) log 2`` and its gradient with respect
    to each ``logp_forget[n]`` is ``1 / B``, the gradient-ascent gradient; it vanishes as the
    model's log-probability drops below the reference, which bounds the divergence of GA.

    Args:
      logp_forget: (B,) ``log p_theta(y|x)`` on the forget batch.
      ref_logp_forget: (B,) the same under the frozen reference model (treated as constant).
      beta: inverse temperature (default 0.1).

    Returns:
      A float32 scalar.

    References:
      Zhang et al., "Negative Preference Optimization: From Catastrophic Collapse to Effective
      Unlearning", 2024.
    """
    if jnp.shape(logp_forget) != jnp.shape(ref_logp_forget):
        raise ValueError(
            f"logp_forget {jnp.shape(logp_forget)} and ref_logp_forget "
            f"{jnp.shape(ref_logp_forget)} must have the same shape"
        )
    if isinstance(beta, (int, float)) and beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    ref = jax.lax.stop_gradient(jnp.asarray(ref_logp_forget).astype(jnp.float32))
    ratio = jnp.asarray(logp_forget).astype(jnp.float32) - ref
    return -(2.0 / beta) * _mean_f32(jax.nn.log_sigmoid(-beta * ratio))


def simnpo(
    nll_sum: jax.Array, lengths: jax.Array, *, beta: float = 4.5, delta: float = 0.0
) -> jax.Array:
    """SimNPO forget loss (reference-free, length-normalised NPO).

    ``L = -(2 / beta) mean_n log sigmoid(beta (NLL_n / |y_n| - delta))``

    which is the paper's ``-(2/beta) log sigmoid(-(beta/|y|) log p_theta(y|x) - gamma)`` with
    ``log p = -NLL`` and margin ``gamma = beta * delta`` (open-unlearning's parametrisation).
    Its derivative in ``NLL_n`` is ``-(2 / (B |y_n|)) sigmoid(-beta (NLL_n/|y_n| - delta)) < 0``,
    so minimising it *increases* the forget NLL, with a weight that fades once the mean
    per-token NLL exceeds ``delta`` by a few ``1/beta``.

    Args:
      nll_sum: (B,) per-example summed answer NLL (``sequence_nll``).
      lengths: (B,) number of answer tokens |y| (clamped to >= 1).
      beta: inverse temperature (default 4.5).
      delta: margin on the mean per-token NLL (default 0).

    Returns:
      A float32 scalar.

    References:
      Fan et al., "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
      Unlearning", 2024.
    """
    if jnp.shape(nll_sum) != jnp.shape(lengths):
        raise ValueError(
            f"nll_sum {jnp.shape(nll_sum)} and lengths {jnp.shape(lengths)} must have the same shape"
        )
    if isinstance(beta, (int, float)) and beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    n = jnp.maximum(jnp.asarray(lengths).astype(jnp.float32), 1.0)
    per_token = jnp.asarray(nll_sum).astype(jnp.float32) / n
    return -(2.0 / beta) * _mean_f32(jax.nn.log_sigmoid(beta * (per_token - delta)))


def kl_to_reference(logits: jax.Array, ref_logits: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean per-token ``KL(p_ref || p_theta)`` over the masked next-token predictions.

    ``KL_t = sum_v p_ref(v) (log p_ref(v) - log p_theta(v))`` for the distribution predicting
    token t (``logits[..., t-1, :]``), weighted by ``loss_mask[..., t]`` (the batch
    convention of this module), summed over the batch and divided by ``max(sum m, 1)``. The
    direction is that of open-unlearning's GradDiff/NPO retain KL
    (``F.kl_div(log p_theta, log p_ref, log_target=True)``), which however averages over all
    positions; pass a mask of ones (or the attention mask) to cover every token.

    Args:
      logits: (..., T, V) logits of the model being unlearned.
      ref_logits: (..., T, V) logits of the frozen reference model (treated as constant).
      loss_mask: (..., T).

    Returns:
      A float32 scalar.
    """
    if jnp.shape(logits) != jnp.shape(ref_logits):
        raise ValueError(
            f"logits {jnp.shape(logits)} and ref_logits {jnp.shape(ref_logits)} must have the same shape"
        )
    if jnp.shape(loss_mask) != jnp.shape(logits)[:-1]:
        raise ValueError(
            f"loss_mask {jnp.shape(loss_mask)} must have the shape of logits without the vocab "
            f"axis {jnp.shape(logits)[:-1]}"
        )
    lp = jax.nn.log_softmax(jnp.asarray(logits)[..., :-1, :].astype(jnp.float32), axis=-1)
    ref = jax.lax.stop_gradient(jnp.asarray(ref_logits)[..., :-1, :].astype(jnp.float32))
    lq = jax.nn.log_softmax(ref, axis=-1)
    kl = jnp.sum(jnp.exp(lq) * (lq - lp), axis=-1)
    m = jnp.asarray(loss_mask)[..., 1:].astype(jnp.float32)
    return jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)


def wga(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array, *, beta: float = 1.0) -> jax.Array:
    """Weighted gradient ascent (WGA): gradient ascent with each answer token weighted by its
    own probability.

    ``L_WGA = -(1 / N) sum_{n,t} m_{n,t} sg(p_{n,t})^beta (-log p_{n,t})``, i.e. the negated
    token-pooled NLL with weights ``sg(p)^beta`` (``sg``: no gradient through the weight), over
    the ``N`` answer tokens of the batch (``p_{n,t} = p(x_t | x_<t)``). Tokens the model still
    predicts confidently drive the update; tokens already forgotten (``p -> 0``) stop
    contributing, which bounds the divergence of plain GA. ``beta = 0`` is GA's loss.

    Args:
      logits: (B, T, V).
      input_ids: (B, T).
      loss_mask: (B, T), 1 on the answer tokens (the batch convention of this module).
      beta: the weight's exponent (>= 0; open-unlearning's WGA config: 1.0).

    Returns:
      A float32 scalar.

    References:
      Wang, Zhang, Ding, Gu, Han, Liu, Sugiyama, "Rethinking LLM Unlearning Objectives: A Gradient
      Perspective and Go Beyond", ICLR 2025 (WGA); open-unlearning ``compute_wga_loss``.
    """
    if isinstance(beta, (int, float)) and beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    lp = token_logprobs(logits, input_ids)
    m = loss_mask[..., 1:].astype(jnp.float32)
    w = jax.lax.stop_gradient(jnp.exp(beta * lp))
    return jnp.sum(w * lp * m) / jnp.maximum(jnp.sum(m), 1.0)


def undial(logits: jax.Array, ref_logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array, *,
           beta: float = 10.0) -> jax.Array:
    """UNDIAL: self-distillation toward the reference's logits with the answer token's logit lowered.

    ``L = (1 / N) sum_{n,t} m_{n,t} CE(softmax(z^ref_{n,t} - beta e_{x_{t+1}}), softmax(z_{n,t}))``,
    the cross-entropy ``-sum_v q_v log p_v`` from the adjusted teacher distribution ``q`` (the
    frozen reference's next-token logits with ``beta`` subtracted from the logit of the true
    next token) to the model's, averaged over the ``N`` answer tokens. The model is pulled
    toward the reference everywhere except on the memorised token, which loses ``beta`` nats of
    logit: a bounded target, unlike gradient ascent.

    Normalisation: over answer tokens. open-unlearning's ``compute_undial_loss`` averages over
    every position of the sequence (prompt and padding included, where its label is -100 and the
    one-hot index -100 wraps to vocabulary entry V - 100); with every position an answer token
    the two are equal.

    Args:
      logits: (B, T, V), the model's.
      ref_logits: (B, T, V), the frozen reference's (treated as constant).
      input_ids: (B, T).
      loss_mask: (B, T), 1 on the answer tokens.
      beta: the logit reduction of the true token (>= 0; open-unlearning's UNDIAL config: 10).

    Returns:
      A float32 scalar.

    References:
      Dong, Lin, Belinkov, Goldstein, Shen, "UNDIAL: Self-Distillation with Adjusted Logits for
      Robust Unlearning in Large Language Models", NAACL 2025; open-unlearning ``compute_undial_loss``.
    """
    if isinstance(beta, (int, float)) and beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if jnp.shape(logits) != jnp.shape(ref_logits):
        raise ValueError(f"logits {jnp.shape(logits)} and ref_logits {jnp.shape(ref_logits)} must have the same shape")
    z = logits[..., :-1, :].astype(jnp.float32)
    zr = jax.lax.stop_gradient(ref_logits[..., :-1, :].astype(jnp.float32))
    onehot = jax.nn.one_hot(input_ids[..., 1:], z.shape[-1], dtype=jnp.float32)
    q = jax.nn.softmax(zr - beta * onehot, axis=-1)
    ce = -jnp.sum(q * jax.nn.log_softmax(z, axis=-1), axis=-1)
    m = loss_mask[..., 1:].astype(jnp.float32)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)
