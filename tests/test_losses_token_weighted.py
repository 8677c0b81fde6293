"""WGA and UNDIAL forget losses against ports of open-unlearning's reference code.

``compute_wga_loss`` and ``compute_undial_loss`` (locuslab/open-unlearning,
``src/trainer/utils.py``) are ported to torch below, fed the same random logits, and compared
value for value and gradient for gradient. WGA's reference averages over the label positions
that are not -100, as ours over the answer tokens; UNDIAL's averages over every position, so it
is compared on batches whose every position after the first is an answer token, and the
answer-token normalisation is checked against a loop on a masked batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jaxunlearn as ju
from jaxunlearn.losses import undial, wga
from toy_lm import bigram_apply, bigram_params, lm_batch


def ref_wga(logits, labels, beta):  # open-unlearning compute_wga_loss, on logits
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    lm_loss = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(
        shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
    weight_ce = ((-lm_loss).exp().detach()) ** beta
    return -(weight_ce * lm_loss)[shift_labels.view(-1) != -100].mean()


def ref_undial(logits, teacher_logits, labels, beta):  # open-unlearning compute_undial_loss, on logits
    shift_labels = labels[..., 1:].contiguous()
    shift_logits = logits[..., :-1, :].contiguous()
    shift_teacher_logits = teacher_logits[..., :-1, :].contiguous()
    mask = torch.zeros_like(shift_teacher_logits)
    batch_idx = torch.arange(mask.shape[0]).view(-1, 1, 1)
    seq_idx = torch.arange(mask.shape[1]).view(1, -1, 1)
    mask[batch_idx, seq_idx, shift_labels.unsqueeze(-1)] = 1.0
    soft_label = F.softmax(shift_teacher_logits - mask * beta, dim=-1)
    loss = nn.CrossEntropyLoss(reduction="none")(shift_logits.view(-1, shift_logits.size(-1)),
                                                 soft_label.view(-1, soft_label.size(-1)))
    return loss.mean()


def _case(seed, B=3, T=7, V=11, prompt=3):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((B, T, V)).astype(np.float32) * 2
    ids = rng.integers(0, V, (B, T))
    mask = np.zeros((B, T), np.float32)
    mask[:, prompt:] = 1
    mask[0, -2:] = 0  # a shorter answer (right padding)
    labels = np.where(mask > 0, ids, -100)
    return logits, ids, mask, labels


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.5])
def test_wga_equals_open_unlearning(beta):
    logits, ids, mask, labels = _case(0)
    tl = torch.tensor(logits, requires_grad=True)
    want = ref_wga(tl, torch.tensor(labels), beta)
    want.backward()
    got, grad = jax.value_and_grad(lambda z: wga(z, jnp.asarray(ids), jnp.asarray(mask), beta=beta))(jnp.asarray(logits))
    np.testing.assert_allclose(float(got), float(want.detach()), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), tl.grad.numpy(), atol=1e-6)


def test_wga_with_beta_zero_is_token_pooled_gradient_ascent():
    logits, ids, mask, _ = _case(1)
    nll = ju.sequence_nll(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    want = -ju.batch_token_nll(nll, jnp.asarray(mask)[:, 1:].sum(-1))
    np.testing.assert_allclose(float(wga(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), beta=0.0)),
                               float(want), rtol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 3.0, 10.0])
def test_undial_equals_open_unlearning_when_every_position_is_an_answer(beta):
    logits, ids, _, _ = _case(2)
    teacher = np.random.default_rng(3).standard_normal(logits.shape).astype(np.float32)
    mask = np.ones(ids.shape, np.float32)  # every position after the first is scored
    tl = torch.tensor(logits, requires_grad=True)
    want = ref_undial(tl, torch.tensor(teacher), torch.tensor(ids), beta)
    want.backward()
    got, grad = jax.value_and_grad(lambda z: undial(z, jnp.asarray(teacher), jnp.asarray(ids), jnp.asarray(mask),
                                                    beta=beta))(jnp.asarray(logits))
    np.testing.assert_allclose(float(got), float(want.detach()), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), tl.grad.numpy(), atol=1e-6)


def test_undial_averages_over_answer_tokens_only():
    logits, ids, mask, _ = _case(4)
    teacher = np.random.default_rng(5).standard_normal(logits.shape)
    beta, total, n = 4.0, 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask[b, t + 1]:
                z = teacher[b, t].copy()
                z[ids[b, t + 1]] -= beta
                q = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                lp = logits[b, t] - np.log(np.exp(logits[b, t].astype(np.float64)).sum())
                total, n = total - float(q @ lp), n + 1
    got = undial(jnp.asarray(logits), jnp.asarray(teacher, jnp.float32), jnp.asarray(ids), jnp.asarray(mask), beta=beta)
    np.testing.assert_allclose(float(got), total / n, rtol=1e-5)


def test_bad_beta_and_shapes():
    logits, ids, mask, _ = _case(6)
    with pytest.raises(ValueError, match="beta"):
        wga(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), beta=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        undial(jnp.asarray(logits), jnp.asarray(logits[:, :-1]), jnp.asarray(ids), jnp.asarray(mask))


def test_unlearning_steps_read_the_reference_logits_for_undial():
    params = bigram_params(8, 4)
    fb = {k: jnp.asarray(v) for k, v in lm_batch(4, 0, vocab=8, seq=6, prompt=2).items()}
    u = ju.UnlearnConfig(method="undial", alpha=0.0, learning_rate=1e-2).build(bigram_apply)
    assert u.needs_reference and not u.uses_retain
    with pytest.raises(ValueError, match="ref_logits"):
        u.step(u.init(params), fb)
    ref = jax.tree.map(lambda x: x * 0.5, params)
    _, m = u.step(u.init(params), fb, None, ref)
    want = undial(bigram_apply(params, fb["input_ids"]), bigram_apply(ref, fb["input_ids"]), fb["input_ids"],
                  fb["loss_mask"], beta=10.0)
    np.testing.assert_allclose(float(m["forget_loss"]), float(want), rtol=1e-6)
    w = ju.UnlearnConfig(method="wga", beta=2.0, learning_rate=1e-2).build(bigram_apply)
    _, m = w.step(w.init(params), fb, fb)
    np.testing.assert_allclose(float(m["forget_loss"]),
                               float(wga(bigram_apply(params, fb["input_ids"]), fb["input_ids"], fb["loss_mask"],
                                         beta=2.0)), rtol=1e-6)
