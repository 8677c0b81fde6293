"""Quantisation recovery: does forgotten content come back after low-bit quantisation?

Zhang et al. (2025) observed that unlearned models quantised to 4 bits recover much of the
forgotten knowledge: unlearning updates are small, and rounding to the quantisation grid maps
the unlearned weights back onto (nearly) the same codes as the target's. This module re-runs
the forget-set metrics of :func:`~jaxunlearn.eval.runner.evaluate_model` after
:func:`jaxunlearn.quant.fake_quantize` of the parameters, as a transformers + bitsandbytes
deployment quantises them (its defaults: only the decoder blocks' linear weights, 64 consecutive
input features per 4-bit block, LLM.int8 per-row int8) and reports, per scheme, the metrics and
their change ``recovery[m] = m(Q(theta)) - m(theta)`` (positive forget-probability recovery =
forgotten answers became more likely again).

References:
  Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from jaxunlearn.eval.runner import EvalResult, evaluate_model

__all__ = ["QUANT_SCHEMES", "forget_metrics", "quantization_recovery"]

#: The schemes reported by default.
QUANT_SCHEMES: tuple[str, ...] = ("int8", "int4", "nf4", "fp4")


def forget_metrics(result: EvalResult) -> dict[str, float]:
    """Flat forget-side numbers of an :class:`EvalResult`: its ``aggregates["forget"]`` summary
    (probability, truth ratio, ROUGE-L, extraction strength, exact memorisation, ...; see
    :func:`~jaxunlearn.eval.tofu.forget_summary`), ``forget_quality`` (with a reference) and
    ``mia_auc/<attack>`` (with a holdout split)."""
    agg = result.aggregates
    if "forget" not in agg:
        raise KeyError("the result has no forget split (evaluate with forget=...)")
    out = dict(agg["forget"])
    if "forget_quality" in agg:
        out["forget_quality"] = float(agg["forget_quality"])
    for attack, auc in agg.get("mia_auc", {}).items():
        out[f"mia_auc/{attack}"] = float(auc)
    return out


def quantization_recovery(
    model,
    tokenizer,
    data: Mapping[str, Any],
    *,
    forget: str,
    holdout: str | None = None,
    schemes: Sequence[str] = QUANT_SCHEMES,
    params=None,
    block_size: int = 64,
    reference: EvalResult | None = None,
    baseline: EvalResult | None = None,
    **eval_kwargs,
) -> dict[str, Any]:
    """Forget metrics before and after fake quantisation of the (unlearned) weights.

    Args:
      model: the :class:`~jaxunlearn.models.Decoder` (its architecture; its weights unless
        ``params`` is given).
      tokenizer: its tokenizer.
      data: as in :func:`evaluate_model` (``datasets`` splits or ``EvalSplit``).
      forget: the forget split.
      holdout: optional holdout split (adds the MIA AUCs).
      schemes: ``fake_quantize`` schemes (default int8, int4, nf4).
      params: the parameters to quantise (default the model's ``nnx.Param`` state).
      block_size: block length of the int4 / nf4 schemes.
      reference: the reference model's :class:`EvalResult` (adds forget quality).
      baseline: an :class:`EvalResult` of these unquantised params on the same splits, to skip
        re-evaluating them.
      **eval_kwargs: passed to :func:`evaluate_model` (``rouge_examples``, ``max_new_tokens``,
        ``batch_size``, ``k``, ``use_stemmer``, ``separator``).

    Returns:
      ``{"baseline": metrics, scheme: {"metrics": metrics, "recovery": {m: after - before}}}``
      with ``metrics`` as :func:`forget_metrics`.

    Raises:
      ValueError: an unknown scheme (from ``fake_quantize``), a repeated scheme.
    """
    from jaxunlearn.models import DecoderFn
    from jaxunlearn.quant import SCHEMES, fake_quantize

    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise ValueError(f"unknown quantisation scheme(s) {unknown}; known: {list(SCHEMES)}")
    if len(set(schemes)) != len(schemes):
        raise ValueError(f"repeated scheme in {list(schemes)}")
    if params is None:
        params = DecoderFn.of(model)[1]
    run = functools.partial(evaluate_model, model, tokenizer, data, forget=forget, holdout=holdout,
                            reference=reference, **eval_kwargs)
    base = baseline if baseline is not None else run(params=params)
    before = forget_metrics(base)
    out: dict[str, Any] = {"baseline": before}
    for scheme in schemes:
        q = jax.jit(functools.partial(fake_quantize, scheme=scheme, block_size=block_size))(params)
        after = forget_metrics(run(params=q))
        out[scheme] = {"metrics": after, "recovery": {m: after[m] - before[m] for m in before if m in after}}
    return out
