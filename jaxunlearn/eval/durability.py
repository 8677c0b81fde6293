"""Durability of unlearning across deployment precisions: FA / RA per precision, the INT4
recovery, and the (epsilon, P) durability certificate.

An unlearned model is not served as it was trained: it is *deployed* at a lower precision.
DurableUn (2026) evaluates it at BF16, INT8 and INT4 (also NF4 / FP4), because forgotten
content can come back once the weights are quantised (the quantisation recovery attack of
Zhang et al., 2025). The definitions used here:

**Deployment** ``D_p(theta)`` (:func:`deploy`). ``transformers`` loads a checkpoint in
bfloat16 and then hands it to bitsandbytes, so

- ``"fp32"``: ``theta`` unchanged (optional; the weights as trained);
- ``"bf16"``: ``bf16(theta)``, every floating leaf rounded to bfloat16;
- ``"int8"``, ``"int4"``, ``"nf4"``, ``"fp4"``: ``Q_s(bf16(theta))``, the bf16-cast weights
  fake-quantised by :func:`jaxunlearn.quant.fake_quantize` with its deployment defaults (only
  the decoder blocks' linear kernels, bitsandbytes' block layout: 64 consecutive input features
  per 4-bit block, LLM.int8 per-row int8; embeddings, ``lm_head`` and norms stay bf16).

The deployed values are returned in each leaf's *own* dtype (a float32 model gets float32
leaves holding exactly the bf16 / dequantised values, bf16 being a subset of float32), so every
precision has the parameters' shapes and dtypes and the evaluation compiles once for all of
them. Activations run at the model's compute dtype (``ModelConfig.dtype``): this is a
weight-level deployment.

**Forget accuracy** ``FA_p`` = exact memorisation of the forget answers under ``D_p``: per
example ``EM = (1/n) sum_i [argmax p(. | y_<i, q) == y_i]`` over the answer tokens (teacher
forcing, closing EOS left out; :func:`jaxunlearn.eval.metrics.exact_memorization`), averaged
over the forget split's examples (rows without a scored token left out, as
:func:`~jaxunlearn.eval.tofu.forget_summary`). **Retain accuracy** ``RA_p`` is the same on the
retain split(s). ``Q-INT4 = FA_int4``. **Recovery ratio** ``FA_int4 / FA_bf16``
(:func:`recovery_ratio`; with ``FA_bf16 = 0`` it is 1 when ``FA_int4 = 0`` too and +inf
otherwise, +inf written as ``None`` so results stay valid JSON).

**Certificate.** A run certifies ``(epsilon, P)`` when ``FA_p <= epsilon`` for every ``p`` in
``P`` (equality certifies); a method's certificate rate is the fraction of its seeds (runs)
that certify (:func:`certificate`). Defaults ``epsilon = 0.047``, ``P = (bf16, int8, int4)``.

Results are plain dicts of Python floats, NaN-free (a non-finite secondary metric is ``None``),
ready for ``json.dump``. A run record -- what :func:`certificate` and
:func:`format_durability_table` read -- is ``{"method": name, "seed": seed,
**evaluate_precisions(...)}``, i.e. ``{"method", "seed", "precisions": {p: {"fa", "ra", ...}}}``.

>>> certificate([{"method": "npo", "seed": 0, "precisions": {"bf16": {"fa": 0.01}, "int8": {"fa": 0.02},
...                                                           "int4": {"fa": 0.30}}},
...              {"method": "npo", "seed": 1, "precisions": {"bf16": {"fa": 0.0}, "int8": {"fa": 0.0},
...                                                           "int4": {"fa": 0.047}}}])["npo"]["cert_rate"]
0.5

References:
  DurableUn: "Quantization-Induced Recovery Attacks in Machine Unlearning", 2026 (deployment
  precisions, FA / RA, Q-INT4, the (epsilon, P) certificate).
  Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025 (recovery
  of forgotten knowledge after 4-bit quantisation).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.eval.quant_recovery import forget_metrics
from jaxunlearn.eval.runner import EvalResult, evaluate_model
from jaxunlearn.eval.splits import EvalSplit, encode_eval_splits
from jaxunlearn.quant import fake_quantize
from jaxunlearn.tree import check_finite
from jaxunlearn.validate import check_float, check_int

__all__ = [
    "PRECISIONS",
    "DEFAULT_PRECISIONS",
    "DEFAULT_EPSILON",
    "FA_METRICS",
    "deploy",
    "evaluate_precisions",
    "recovery_ratio",
    "certificate",
    "check_precisions",
]

#: Every deployment precision :func:`deploy` knows, from the widest.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8", "int4", "nf4", "fp4")
#: DurableUn's deployment set P.
DEFAULT_PRECISIONS: tuple[str, ...] = ("bf16", "int8", "int4")
#: DurableUn's default forget-accuracy threshold.
DEFAULT_EPSILON: float = 0.047
#: How FA / RA score one answer (:func:`evaluate_precisions`): ``"exact_match"`` (default) counts
#: an answer when every one of its tokens is the model's greedy prediction; ``"token"`` is the
#: fraction of its tokens that are (open-unlearning's ``exact_memorization``).
FA_METRICS: tuple[str, ...] = ("exact_match", "token")


# =========================================================================== validation helpers

def _check_precision(owner: str, precision: Any) -> str:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"{owner}: unknown precision {precision!r}; expected one of {PRECISIONS}")
    return precision


def check_precisions(owner: str, precisions: Any) -> tuple[str, ...]:
    """``precisions`` as a tuple of names of :data:`PRECISIONS`, checked: a non-empty sequence
    (not a string) of known, distinct names.

    Raises:
      TypeError: not a sequence of names. ValueError: empty, unknown (named) or repeated.
    """
    if isinstance(precisions, str) or not isinstance(precisions, Sequence):
        raise TypeError(f"{owner}: precisions must be a sequence of precision names (e.g. ('bf16', 'int4')), "
                        f"got {precisions!r}")
    out = tuple(_check_precision(owner, p) for p in precisions)
    if not out:
        raise ValueError(f"{owner}: precisions is empty; name at least one of {PRECISIONS}")
    if len(set(out)) != len(out):
        raise ValueError(f"{owner}: repeated precision in {list(out)}")
    return out


def _finite_or_none(v: Any) -> float | None:
    """A Python float, or ``None`` for NaN / +-inf / missing (JSON has neither)."""
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _is_float_leaf(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


# =========================================================================== deployment

@functools.partial(jax.jit, static_argnames=("precision", "block_size"))
def _deploy(params, *, precision: str, block_size: int):
    """``D_p(params)`` in each leaf's own dtype (no checks; ``precision != "fp32"``)."""
    dep = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if _is_float_leaf(x) else x, params)
    if precision != "bf16":
        dep = fake_quantize(dep, precision, block_size=block_size)  # bf16 in, bf16 out
    return jax.tree.map(lambda d, x: d.astype(jnp.result_type(x)) if _is_float_leaf(x) else d, dep, params)


def deploy(params, precision: str, *, block_size: int = 64):
    """The weights as deployed at ``precision``: ``D_p(theta)`` (see the module docstring).

    ``"fp32"``: ``theta`` itself (returned as is). ``"bf16"``: every floating leaf rounded to
    bfloat16 (round to nearest even). ``"int8"`` / ``"int4"`` / ``"nf4"`` / ``"fp4"``:
    ``fake_quantize(bf16(theta), scheme, block_size=block_size)`` with the deployment defaults
    of :func:`jaxunlearn.quant.fake_quantize` (decoder-block linear kernels only, bitsandbytes
    layout), as ``transformers`` quantises a checkpoint it loaded in bfloat16. The dequantised
    bf16 values are cast back to each leaf's dtype, exactly (bf16 is a subset of float32 and
    float64), so every precision returns a pytree of the same structure, shapes and dtypes as
    ``params`` and a jitted evaluator compiles once for all precisions. Non-floating leaves
    pass through. Jitted (one compilation per precision, block size and parameter shapes).

    Args:
      params: a pytree of arrays (an ``nnx.State`` such as ``DecoderFn.of(model)[1]``, a dict).
      precision: one of :data:`PRECISIONS`.
      block_size: block length of the 4-bit schemes (bitsandbytes' default 64).

    Returns:
      A pytree like ``params`` holding the deployed values.

    Raises:
      ValueError: an unknown precision (named), ``block_size < 1``, NaN/Inf in a leaf of
        ``params`` (named; :class:`jaxunlearn.tree.NonFiniteError`), or a decoder-block kernel
        that is not 2-D (from ``fake_quantize``).
      TypeError: a non-integer ``block_size``.

    References:
      DurableUn, "Quantization-Induced Recovery Attacks in Machine Unlearning", 2026;
      Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025.

    >>> p = {"layers": [{"mlp": {"up_proj": {"kernel": jnp.array([[0.1], [-1.0], [0.52]])}}}]}
    >>> deploy(p, "bf16")["layers"][0]["mlp"]["up_proj"]["kernel"].ravel().tolist()
    [0.10009765625, -1.0, 0.51953125]
    >>> deploy(p, "int4")["layers"][0]["mlp"]["up_proj"]["kernel"].ravel().tolist()   # steps of 1/7
    [0.142578125, -1.0, 0.5703125]
    """
    _check_precision("deploy", precision)
    block_size = check_int("deploy", "block_size", block_size, min=1)
    if precision == "fp32":
        return params
    check_finite(params, "params")
    return _deploy(params, precision=precision, block_size=block_size)


# =========================================================================== FA / RA per precision

def _em_rate(per_example: np.ndarray, what: str, metric: str = "token") -> float:
    """FA / RA from the per-example exact memorisation, over the rows where it is defined
    (``forget_summary``'s rule): its mean (``"token"``) or the fraction of rows at 1
    (``"exact_match"``: every answer token predicted)."""
    em = np.asarray(per_example, np.float64).reshape(-1)
    defined = em[~np.isnan(em)]
    if defined.size == 0:
        raise ValueError(f"{what}: exact memorisation is undefined on every row (no answer token before the EOS)")
    if metric == "exact_match":  # EM = k / n in float32: exactly 1.0 when all n tokens are right
        return float(np.mean(defined >= 1.0))
    return float(defined.mean())


def _precision_metrics(res: EvalResult, forget: str, retain: list[str], fa_metric: str) -> dict[str, Any]:
    fm = forget_metrics(res)
    f_em = res.splits[forget]["exact_memorization"]
    r_em = np.concatenate([res.splits[r]["exact_memorization"] for r in retain])
    f_what, r_what = f"forget split {forget!r}", f"retain split(s) {retain}"
    row: dict[str, Any] = {
        "fa": _em_rate(f_em, f_what, fa_metric),
        "ra": _em_rate(r_em, r_what, fa_metric),
        # both scorings, whichever FA uses
        "fa_exact_match": _em_rate(f_em, f_what, "exact_match"), "fa_token": _em_rate(f_em, f_what, "token"),
        "ra_exact_match": _em_rate(r_em, r_what, "exact_match"), "ra_token": _em_rate(r_em, r_what, "token"),
        "forget_probability": _finite_or_none(fm["probability"]),
        "retain_probability": _finite_or_none(np.mean(np.concatenate([res.splits[r]["probability"]
                                                                       for r in retain]))),
    }
    if "rouge_l" in fm:
        row["forget_rouge_l"] = _finite_or_none(fm["rouge_l"])
    if "model_utility" in res.aggregates:
        row["model_utility"] = _finite_or_none(res.aggregates["model_utility"])
    if "forget_quality" in fm:
        row["forget_quality"] = _finite_or_none(fm["forget_quality"])
    row["forget"] = {k: _finite_or_none(v) for k, v in fm.items()}
    return row


def _names(value, what: str) -> list[str]:
    names = [value] if isinstance(value, str) else list(value or [])
    if not names:
        raise ValueError(f"evaluate_precisions: name the {what} split(s)")
    return names


def evaluate_precisions(
    model,
    tokenizer,
    data: Mapping[str, "datasets.Dataset | EvalSplit"],
    *,
    forget: str,
    retain: str | Sequence[str],
    general: str | Sequence[str] | None = None,
    holdout: str | None = None,
    precisions: Sequence[str] = DEFAULT_PRECISIONS,
    params=None,
    block_size: int = 64,
    reference: EvalResult | None = None,
    rouge_examples: int | None = 0,
    fa_metric: str = "exact_match",
    **eval_kwargs,
) -> dict[str, Any]:
    """FA, RA and the other forget / utility numbers of one model at each deployment precision.

    For each ``p`` in ``precisions`` the deployed weights ``D_p(theta)`` (:func:`deploy`) are
    evaluated by :func:`~jaxunlearn.eval.runner.evaluate_model`, and

    - ``FA_p``: with ``EM = (1/n) sum_i [argmax p(. | y_<i, q) == y_i]`` the exact
      memorisation of one answer (teacher forcing, EOS left out), ``fa_metric="exact_match"``
      (default) is the fraction of forget answers with ``EM = 1``, i.e. answers the model
      reproduces verbatim under greedy decoding; ``"token"`` is the mean ``EM``
      (open-unlearning's ``exact_memorization``). The token mean also credits the answer's
      template words, which a model predicts for people it never saw (on the embedded
      benchmark the target scores 0.81 on the held-out people), so an epsilon of a few percent
      is reachable only by breaking the answer format; the exact match counts an answer only
      when its facts are right. Both are reported (``fa_exact_match``, ``fa_token``);
    - ``RA_p`` = the same over the retain examples (all retain splits pooled);
    - ``Q-INT4 = FA_int4`` and the recovery ratio ``FA_int4 / FA_bf16``
      (:func:`recovery_ratio`), with ``recovery_delta = FA_int4 - FA_bf16``.

    Every precision's parameters have the same shapes and dtypes, and ``datasets`` splits are
    encoded once here, so the jitted passes of the evaluation (and the decoding, when ROUGE is
    asked for) compile once for all precisions.

    Args:
      model: the :class:`~jaxunlearn.models.Decoder` (its architecture; its weights unless
        ``params`` is given).
      tokenizer: its tokenizer.
      data: ``{split: datasets.Dataset}`` (TOFU column schema) or ``{split: EvalSplit}``
        (:func:`~jaxunlearn.eval.splits.encode_eval_splits`), as for ``evaluate_model``.
      forget: the forget split.
      retain: the retain split(s).
      general: optional further utility sets (model utility needs generation, see below).
      holdout: optional holdout split (adds the MIA AUCs to ``"forget"``).
      precisions: deployment precisions (:data:`PRECISIONS`), in the order wanted.
      params: the (merged, unlearned) parameters (default the model's ``nnx.Param`` state).
      block_size: block length of the 4-bit schemes.
      reference: the reference model's :class:`EvalResult` (adds ``forget_quality``).
      fa_metric: ``"exact_match"`` or ``"token"`` (:data:`FA_METRICS`), see above.
      rouge_examples: rows generated per split for ROUGE-L (default 0: no generation, the
        cheap FA / RA evaluation; ``None``: all rows). With generation the rows also carry
        ``forget_rouge_l`` and, with retain and generated rows, ``model_utility``.
      **eval_kwargs: passed to ``evaluate_model`` (``max_new_tokens``, ``batch_size``, ``k``,
        ``use_stemmer``, ``separator``, ``chat_template``).

    Returns:
      ``{"precisions": {p: {"fa", "ra", "fa_exact_match", "fa_token", "ra_exact_match", "ra_token",
      "forget_probability", "retain_probability"
      [, "forget_rouge_l"] [, "model_utility"] [, "forget_quality"], "forget": {...}}},
      "q_int4", "recovery_ratio", "recovery_delta"}``: ``"forget"`` is the full
      :func:`~jaxunlearn.eval.quant_recovery.forget_metrics` of that precision; ``q_int4``
      is present with ``"int4"``, ``recovery_ratio`` / ``recovery_delta`` with ``"int4"`` and
      ``"bf16"``. Plain floats; a non-finite secondary metric is ``None``, as is an infinite
      recovery ratio (JSON-ready).

    Raises:
      ValueError: an unknown or repeated precision; no retain split; FA or RA undefined (no
        forget / retain row with an answer token before the EOS); NaN/Inf in ``params``; and
        what ``evaluate_model`` raises (missing split, ...).

    References:
      DurableUn, "Quantization-Induced Recovery Attacks in Machine Unlearning", 2026;
      Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025.
    """
    from jaxunlearn.models import DecoderFn

    owner = "evaluate_precisions"
    precisions = check_precisions(owner, precisions)
    if fa_metric not in FA_METRICS:
        raise ValueError(f"{owner}: unknown fa_metric {fa_metric!r}; expected one of {FA_METRICS}")
    block_size = check_int(owner, "block_size", block_size, min=1)
    retain_names = _names(retain, "retain")
    if params is None:
        params = DecoderFn.of(model)[1]
    check_finite(params, "params")
    roles = {forget: "forget", **{r: "retain" for r in retain_names},
             **{g: "general" for g in ([general] if isinstance(general, str) else list(general or []))}}
    if holdout is not None:
        roles[holdout] = "holdout"
    chosen = {name: data[name] for name in roles if name in data}
    if len(chosen) == len(roles) and all(isinstance(v, datasets.Dataset) for v in chosen.values()):
        # encode once (evaluate_model would re-encode these for every precision)
        data = encode_eval_splits(tokenizer, chosen, roles=roles, separator=eval_kwargs.get("separator"),
                                  chat_template=eval_kwargs.get("chat_template"))
    run = functools.partial(evaluate_model, model, tokenizer, data, forget=forget, retain=retain, general=general,
                            holdout=holdout, reference=reference, rouge_examples=rouge_examples, **eval_kwargs)
    per: dict[str, Any] = {}
    for p in precisions:
        deployed = params if p == "fp32" else _deploy(params, precision=p, block_size=block_size)
        per[p] = _precision_metrics(run(params=deployed), forget, retain_names, fa_metric)
    out: dict[str, Any] = {"fa_metric": fa_metric, "precisions": per}
    if "int4" in per:
        out["q_int4"] = per["int4"]["fa"]
        if "bf16" in per:
            out["recovery_ratio"] = recovery_ratio(per["int4"]["fa"], per["bf16"]["fa"])
            out["recovery_delta"] = per["int4"]["fa"] - per["bf16"]["fa"]
    return out


def recovery_ratio(fa_int4: float, fa_bf16: float) -> float | None:
    """The quantisation recovery ratio ``FA_int4 / FA_bf16``.

    Above 1: INT4 deployment brings forgotten answers back (Zhang et al., 2025). With
    ``FA_bf16 = 0`` the ratio is ``1.0`` when ``FA_int4 = 0`` as well (nothing forgotten comes
    back: no recovery, as for equal accuracies) and +inf when ``FA_int4 > 0``, returned as
    ``None`` (JSON has no infinity; ``None`` here always means +inf).

    Args:
      fa_int4: forget accuracy at INT4, finite and >= 0.
      fa_bf16: forget accuracy at BF16, finite and >= 0.

    Returns:
      The ratio, or ``None`` for +inf.

    Raises:
      ValueError / TypeError: a negative, non-finite or non-numeric accuracy.

    References:
      Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025;
      DurableUn, "Quantization-Induced Recovery Attacks in Machine Unlearning", 2026.

    >>> recovery_ratio(0.2, 0.1), recovery_ratio(0.0, 0.0), recovery_ratio(0.2, 0.0)
    (2.0, 1.0, None)
    """
    q = check_float("recovery_ratio", "fa_int4", fa_int4, min=0.0)
    b = check_float("recovery_ratio", "fa_bf16", fa_bf16, min=0.0)
    if b > 0.0:
        return q / b
    return 1.0 if q == 0.0 else None


# =========================================================================== the certificate

def _run_record(run: Any, i: int, owner: str) -> tuple[str, Any, Mapping[str, Any]]:
    if not isinstance(run, Mapping):
        raise ValueError(f"{owner}: run {i} is not a mapping (got {type(run).__name__})")
    for key in ("method", "precisions"):
        if key not in run:
            raise ValueError(f"{owner}: run {i} has no {key!r} (a run is {{'method', 'seed', 'precisions'}})")
    method, per = run["method"], run["precisions"]
    if not isinstance(method, str):
        raise ValueError(f"{owner}: run {i} has a non-string method {method!r}")
    if not isinstance(per, Mapping):
        raise ValueError(f"{owner}: run {i} (method {method!r}) has 'precisions' of type {type(per).__name__}, "
                         "expected {precision: {'fa': ...}}")
    return method, run.get("seed"), per


def _fa(per: Mapping[str, Any], p: str, where: str, owner: str) -> float:
    entry = per[p]
    fa = entry.get("fa") if isinstance(entry, Mapping) else None
    if fa is None or isinstance(fa, bool) or not isinstance(fa, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(fa)):
        raise ValueError(f"{owner}: {where} has no finite FA at precision {p!r} (got {fa!r})")
    return float(fa)


def certificate(
    runs: Sequence[Mapping[str, Any]],
    *,
    epsilon: float = DEFAULT_EPSILON,
    precisions: Sequence[str] = DEFAULT_PRECISIONS,
) -> dict[str, dict[str, Any]]:
    """The (epsilon, P) durability certificate of each method over its seeds.

    A run certifies when its forget accuracy is at most ``epsilon`` at every deployment
    precision of ``P``: ``max_{p in P} FA_p <= epsilon`` (equality certifies). A method's
    certificate rate is ``#{certifying seeds} / #{seeds}``.

    Args:
      runs: run records ``{"method": str, "seed": any, "precisions": {p: {"fa": float, ...}}}``
        (``{"method": m, "seed": s, **evaluate_precisions(...)}``); one per (method, seed).
      epsilon: the FA threshold, finite and >= 0 (DurableUn: 0.047).
      precisions: the deployment set P (DurableUn: bf16, int8, int4).

    Returns:
      ``{method: {"epsilon", "precisions" (list), "cert_rate", "certified_seeds", "seeds",
      "worst_fa"}}``, methods in order of first appearance; ``seeds`` in input order,
      ``worst_fa[i] = max_{p in P} FA_p`` of ``seeds[i]`` (the margin to ``epsilon``).

    Raises:
      ValueError: no runs; ``epsilon`` negative or not finite; an empty, repeated or unknown
        precision in P; a run that is not a record, lacks a precision of P or has no finite
        FA there (the run, method, seed and precision are named); a seed repeated within a
        method. TypeError: a non-numeric ``epsilon``, ``precisions`` a bare string.

    References:
      DurableUn, "Quantization-Induced Recovery Attacks in Machine Unlearning", 2026.

    >>> runs = [{"method": "ga", "seed": s, "precisions": {"bf16": {"fa": fa}, "int4": {"fa": fa}}}
    ...         for s, fa in enumerate((0.0, 0.05))]
    >>> c = certificate(runs, precisions=("bf16", "int4"))["ga"]
    >>> c["cert_rate"], c["certified_seeds"]
    (0.5, [0])
    """
    owner = "certificate"
    eps = check_float(owner, "epsilon", epsilon, min=0.0)
    P = check_precisions(owner, precisions)
    if isinstance(runs, Mapping) or not isinstance(runs, Sequence):
        raise TypeError(f"{owner}: runs must be a sequence of run records, got {type(runs).__name__}")
    if not runs:
        raise ValueError(f"{owner}: no runs")
    out: dict[str, dict[str, Any]] = {}
    for i, run in enumerate(runs):
        method, seed, per = _run_record(run, i, owner)
        where = f"run {i} (method {method!r}, seed {seed!r})"
        missing = [p for p in P if p not in per]
        if missing:
            raise ValueError(f"{owner}: {where} lacks precision(s) {missing} of P = {list(P)} "
                             f"(it has {list(per)})")
        worst = max(_fa(per, p, where, owner) for p in P)
        entry = out.setdefault(method, {"epsilon": eps, "precisions": list(P), "cert_rate": 0.0,
                                        "certified_seeds": [], "seeds": [], "worst_fa": []})
        if seed in entry["seeds"]:
            raise ValueError(f"{owner}: {where}: seed {seed!r} of method {method!r} appears twice")
        entry["seeds"].append(seed)
        entry["worst_fa"].append(worst)
        if worst <= eps:
            entry["certified_seeds"].append(seed)
    for entry in out.values():
        entry["cert_rate"] = len(entry["certified_seeds"]) / len(entry["seeds"])
    return out
