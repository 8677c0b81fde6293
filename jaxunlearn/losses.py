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

A preference batch (IdkNLL, IdkDPO) also carries the preferred ("alternate") completion of each
row, e.g. the same question with a refusal as its answer, under :data:`ALT_KEYS`
(``alt_input_ids``, ``alt_attention_mask``, ``alt_loss_mask``: the same convention, row-aligned
with the main arrays; :mod:`jaxunlearn.data.refusal` builds them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "ALT_KEYS",
    "alt_batch",
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
    "dpo",
    "activation_loss",
]

ALT_KEYS = ("alt_input_ids", "alt_attention_mask", "alt_loss_mask")
"""The batch keys of each row's preferred (alternate) completion, in the batch convention."""


def alt_batch(batch) -> dict:
    """The alternate completions of a preference batch as a plain batch:
    ``{"input_ids": batch["alt_input_ids"], "attention_mask": ..., "loss_mask": ...}``.

    Raises:
      KeyError: a key of :data:`ALT_KEYS` missing (named).
    """
    missing = [k for k in ALT_KEYS if k not in batch]
    if missing:
        raise KeyError(f"a preference batch needs {ALT_KEYS}; missing {missing} (have {sorted(batch)})")
    return {k[len("alt_"):]: batch[k] for k in ALT_KEYS}


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


def dpo(logp_win: jax.Array, ref_logp_win: jax.Array, logp_lose: jax.Array, ref_logp_lose: jax.Array, *,
        beta: float = 0.1) -> jax.Array:
    """Direct Preference Optimisation loss of preferred (``win``) over rejected (``lose``) completions.

    ``L_DPO = -(2 / beta) mean_n log sigmoid(beta ((log p_theta(w_n) - log p_ref(w_n))
    - (log p_theta(l_n) - log p_ref(l_n))))``

    with log p the *summed* answer log-probability of a completion (``-sequence_nll``), the
    reference's log-probabilities treated as constants. This is open-unlearning's
    ``compute_dpo_loss`` (``src/trainer/utils.py``, with its ``2 / beta`` scale): IdkDPO takes the
    refusal answer as ``w`` and the forget answer as ``l``. Without the ``w`` terms it is
    :func:`npo`. At ``theta = ref`` its value is ``(2 / beta) log 2`` and its gradient is
    ``(1 / B) (grad log p(l_n) - grad log p(w_n))`` per example (a step raises the preferred
    answer's likelihood and lowers the rejected one's).

    Args:
      logp_win: (B,) ``log p_theta(w|x)``.
      ref_logp_win: (B,) the same under the frozen reference.
      logp_lose: (B,) ``log p_theta(l|x)``.
      ref_logp_lose: (B,) the same under the frozen reference.
      beta: inverse temperature (> 0; open-unlearning's DPO config: 0.1).

    Returns:
      A float32 scalar.

    References:
      Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward
      Model", NeurIPS 2023; Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", 2024
      (IdkDPO); open-unlearning ``compute_dpo_loss``, ``configs/trainer/DPO.yaml``.

    >>> z = jnp.zeros(3)
    >>> round(float(dpo(z, z, z, z, beta=0.1)), 4)   # (2 / beta) log 2
    13.8629
    """
    shapes = [jnp.shape(x) for x in (logp_win, ref_logp_win, logp_lose, ref_logp_lose)]
    if len(set(shapes)) != 1:
        raise ValueError(f"logp_win, ref_logp_win, logp_lose, ref_logp_lose must have one shape, got {shapes}")
    if isinstance(beta, (int, float)) and beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    f32 = lambda x: jnp.asarray(x).astype(jnp.float32)  # noqa: E731
    ratio_w = f32(logp_win) - jax.lax.stop_gradient(f32(ref_logp_win))
    ratio_l = f32(logp_lose) - jax.lax.stop_gradient(f32(ref_logp_lose))
    return -(2.0 / beta) * _mean_f32(jax.nn.log_sigmoid(beta * (ratio_w - ratio_l)))


def activation_loss(hidden: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean squared distance of hidden states to a target over the masked tokens (RMU's losses).

    ``L = mean_n [ sum_t m_{n,t} mean_d (h_{n,t,d} - c_{n,t,d})^2 / max(sum_t m_{n,t}, 1) ]``:
    per row the token mean (over the masked positions t) of the squared error averaged over the
    hidden width, then the mean over rows. This is open-unlearning's RMU
    ``compute_activation_loss`` (``src/trainer/unlearn/rmu.py``), whose mask is
    ``labels != -100``, i.e. ``loss_mask`` here (the hidden state *at* each scored token; a row
    without scored tokens contributes 0 where the reference divides by 0).

    Args:
      hidden: (B, T, D) hidden states.
      target: broadcastable to ``hidden``: ``c u`` (D,) for RMU's forget term, the frozen model's
        hidden states (B, T, D) for its retain term (treated as constant).
      mask: (B, T) weights of the positions (the batch's ``loss_mask``).

    Returns:
      A float32 scalar.

    References:
      Li et al., "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning", ICML
      2024 (RMU); open-unlearning ``RMU.compute_activation_loss``.

    >>> h = jnp.ones((1, 2, 4))
    >>> float(activation_loss(h, jnp.zeros(4), jnp.array([[1.0, 0.0]])))
    1.0
    """
    if jnp.ndim(hidden) != 3:
        raise ValueError(f"hidden must be (B, T, D), got shape {jnp.shape(hidden)}")
    if jnp.shape(mask) != jnp.shape(hidden)[:2]:
        raise ValueError(f"mask {jnp.shape(mask)} must have the shape of hidden without its last axis "
                         f"{jnp.shape(hidden)[:2]}")
    try:
        jnp.broadcast_shapes(jnp.shape(target), jnp.shape(hidden))
    except ValueError:
        raise ValueError(f"target {jnp.shape(target)} does not broadcast to hidden {jnp.shape(hidden)}") from None
    h = jnp.asarray(hidden).astype(jnp.float32)
    c = jax.lax.stop_gradient(jnp.asarray(target).astype(jnp.float32))
    m = jnp.asarray(mask).astype(jnp.float32)
    per_token = jnp.mean((h - c) ** 2, axis=-1)
    per_row = jnp.sum(per_token * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return _mean_f32(per_row)
