"""Batched, jitted evaluation: encoded QA data with fixed batch shapes, and the full TOFU-style
evaluation of a model (:func:`evaluate_model`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Callable, Mapping

import datasets
import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.data import ChatFormat
from jaxunlearn.eval.metrics import answer_stats, exact_memorization, extraction_strength
from jaxunlearn.eval.mia import mia_aucs, mia_scores, privleak, zlib_score
from jaxunlearn.eval.rouge import rouge_l_f1, rouge_l_recall
from jaxunlearn.eval.splits import ROLE_COLUMNS, EvalSplit, encode_eval_splits, split_not_available, truth_ratio_columns
from jaxunlearn.eval.tofu import (
    forget_quality,
    forget_summary,
    model_utility,
    normalized_probability,
    truth_ratio,
    utility_components,
)
from jaxunlearn.losses import mean_token_nll
from jaxunlearn.models import Decoder, DecoderFn, check_tokenizer, generate

__all__ = [
    "fixed_batches",
    "greedy_decode",
    "evaluate_encoded",
    "ROLE_COLUMNS",
    "EvalSplit",
    "EvalResult",
    "encode_eval_splits",
    "score_split",
    "evaluate_model",
]


def fixed_batches(data: Mapping[str, np.ndarray], batch_size: int, keys=None):
    """Yield ``(batch, n_valid)`` in order; the last batch is padded by repeating row 0
    so every batch has the same shape (one compilation); only the first ``n_valid``
    rows of a batch are real."""
    keys = list(keys or data.keys())
    n = len(data[keys[0]])
    if n == 0:
        raise ValueError("cannot evaluate an empty split")
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        n_valid = len(idx)
        if n_valid < batch_size:
            idx = np.concatenate([idx, np.zeros(batch_size - n_valid, idx.dtype)])
        yield {k: np.asarray(data[k])[idx] for k in keys}, n_valid


def evaluate_encoded(
    apply_fn: Callable, params, data: Mapping[str, np.ndarray], *, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Per-example :func:`~jaxunlearn.eval.metrics.answer_stats` over a whole encoded split.

    Args:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits``: a
        :class:`~jaxunlearn.models.DecoderFn` (``DecoderFn.of(model)``) or any such function;
        a static argument of the jitted pass (equal adapters share its compilation).
      params: the model parameters.
      data: encoded split (``input_ids``, ``attention_mask``, ``loss_mask``, optional ``fact_mask``).
      batch_size: rows per jitted call.

    Returns:
      ``{metric: np.ndarray of shape (N,)}``.
    """
    keys = [k for k in ("input_ids", "attention_mask", "loss_mask", "fact_mask") if k in data]
    parts: dict[str, list] = {}
    for batch, n_valid in fixed_batches(data, batch_size, keys):
        out = _stats_pass(apply_fn, params, {k: jnp.asarray(v) for k, v in batch.items()})
        for k, v in out.items():
            parts.setdefault(k, []).append(np.asarray(v)[:n_valid])
    return {k: np.concatenate(v) for k, v in parts.items()}


# =========================================================================== full TOFU-style evaluation
#
# ``encode_eval_splits`` (:mod:`jaxunlearn.eval.splits`) turns benchmark splits (TOFU column
# schema) into fixed-shape arrays with one common padded length; ``score_split`` runs the
# teacher-forced metrics of one split through jitted passes (any ``apply(params, input_ids,
# attention_mask) -> logits``); ``evaluate_model`` adds greedy generation (ROUGE-L) for a
# ``jaxunlearn.models.Decoder`` and the aggregates.

@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _stats_pass(apply_fn, params, batch):
    return answer_stats(apply_fn(params, batch["input_ids"], batch["attention_mask"]), batch)


@functools.partial(jax.jit, static_argnames=("apply_fn", "k"))
def _answer_pass(apply_fn, params, batch, *, k: float):
    logits = apply_fn(params, batch["input_ids"], batch["attention_mask"])
    ids, lm = batch["input_ids"], batch["loss_mask"]
    out = answer_stats(logits, batch)
    out["extraction_strength"] = extraction_strength(logits, ids, lm)
    out["exact_memorization"] = exact_memorization(logits, ids, lm)
    for name, v in mia_scores(logits, ids, lm, k=k).items():
        out[f"mia_{name}"] = v
    return out


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _nll_pass(apply_fn, params, batch):
    logits = apply_fn(params, batch["input_ids"], batch["attention_mask"])
    return mean_token_nll(logits, batch["input_ids"], batch["loss_mask"])


def _run_batched(fn, data: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    parts: dict[str, list] = {}
    for batch, n_valid in fixed_batches(data, batch_size):
        out = fn({k: jnp.asarray(v) for k, v in batch.items()})
        if not isinstance(out, Mapping):
            out = {"value": out}
        for key, v in out.items():
            parts.setdefault(key, []).append(np.asarray(v)[:n_valid])
    return {key: np.concatenate(v) for key, v in parts.items()}


def _check_vocab(apply_fn, params, split: EvalSplit) -> None:
    ids = split.answer["input_ids"][:1]
    shape = jax.eval_shape(apply_fn, params, jnp.asarray(ids), jnp.asarray(split.answer["attention_mask"][:1])).shape
    vocab = shape[-1]
    top = max(int(np.max(p["input_ids"])) for p in (split.answer, split.correct, split.perturbed, split.prompts)
              if p is not None)
    if top >= vocab:
        raise ValueError(f"token id {top} >= the model's vocabulary size {vocab}: the model's vocabulary is "
                         "smaller than the tokenizer's (wrong tokenizer for this model?)")


def score_split(
    apply_fn: Callable,
    params,
    split: EvalSplit,
    *,
    batch_size: int = 32,
    k: float = 0.4,
) -> dict[str, np.ndarray]:
    """Teacher-forced per-example metrics of one encoded split (jitted, fixed batch shapes).

    Args:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits``; a static argument of
        the jitted passes, so pass the *same* (hashable) function across calls to reuse the
        compilation.
      params: its parameters.
      split: from :func:`encode_eval_splits`.
      batch_size: rows per jitted call.
      k: Min-k / Min-k++ fraction.

    Returns:
      float (N,) arrays: ``nll`` (mean answer NLL), ``probability``, ``token_acc``,
      ``fact_acc`` (with a fact mask), ``extraction_strength``, ``exact_memorization`` (NaN for
      a row with no answer token before the EOS), ``mia_loss``, ``mia_zlib``, ``mia_min_k``,
      ``mia_min_k_plus_plus`` (``token_acc`` counts the EOS; ``extraction_strength``,
      ``exact_memorization`` and Min-k / Min-k++ leave its prediction out, as open-unlearning);
      and with truth-ratio columns ``correct_nll``, ``correct_probability``, ``truth_ratio``,
      ``normalized_probability`` plus ``perturbed_probability`` (N, K).

    Raises:
      ValueError: a token id outside the model's vocabulary.
    """
    _check_vocab(apply_fn, params, split)
    keys = [key for key in ("input_ids", "attention_mask", "loss_mask", "fact_mask") if key in split.answer]
    out = _run_batched(lambda b: _answer_pass(apply_fn, params, b, k=float(k)),
                       {key: split.answer[key] for key in keys}, batch_size)
    out["mia_zlib"] = zlib_score(out["mia_loss"], split.answers)
    if split.correct is not None:
        tf = ("input_ids", "attention_mask", "loss_mask")
        nll = lambda b: _nll_pass(apply_fn, params, b)  # noqa: E731
        correct = _run_batched(nll, {key: split.correct[key] for key in tf}, batch_size)["value"]
        n, kk, t = split.perturbed["input_ids"].shape
        flat = {key: split.perturbed[key].reshape(n * kk, t) for key in tf}
        pert = _run_batched(nll, flat, batch_size)["value"].reshape(n, kk)
        out["correct_nll"] = correct
        out["correct_probability"] = np.exp(-correct.astype(np.float64))
        out["perturbed_probability"] = np.exp(-pert.astype(np.float64))
        out["truth_ratio"] = truth_ratio(correct, pert)
        out["normalized_probability"] = normalized_probability(out["probability"], out["perturbed_probability"])
    return out


def greedy_decode(model, tokenizer, prompts: Mapping[str, np.ndarray], n: int, max_new_tokens: int,
                  batch_size: int, *, strip: bool = True) -> list[str]:
    """Greedy continuations of the first ``n`` encoded prompts (``input_ids``/``attention_mask``,
    left-padded), in fixed-shape batches of :func:`~jaxunlearn.models.generate`, each cut at its
    first EOS and decoded without special tokens (Hugging Face ``generate(do_sample=False)`` +
    ``batch_decode``); ``strip`` removes surrounding whitespace (open-unlearning's TOFU eval does,
    MUSE does not)."""
    eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    data = {key: prompts[key][:n] for key in ("input_ids", "attention_mask")}
    texts: list[str] = []
    for batch, n_valid in fixed_batches(data, batch_size):
        out = np.asarray(generate(model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                                  max_new_tokens, eos_token_id=eos, pad_token_id=pad))
        for row in out[:n_valid]:
            stop = np.nonzero(row == eos)[0]
            row = row[: stop[0]] if stop.size else row
            text = tokenizer.decode(row.tolist(), skip_special_tokens=True)
            texts.append(text.strip() if strip else text)
    return texts


def _rouge_scores(gen: list[str], split: EvalSplit, n: int, forget: bool, use_stemmer: bool) -> dict[str, np.ndarray]:
    out = {"rouge_l_recall": rouge_l_recall(gen, split.answers[:n], use_stemmer=use_stemmer),
           "rouge_l_f1": rouge_l_f1(gen, split.answers[:n], use_stemmer=use_stemmer)}
    if forget and split.paraphrased_answers is not None:
        out["paraphrased_rouge_l_recall"] = rouge_l_recall(gen, split.paraphrased_answers[:n], use_stemmer=use_stemmer)
    if forget and split.perturbed_answers is not None:
        pert = split.perturbed_answers[:n]
        flat = rouge_l_recall([g for g, row in zip(gen, pert) for _ in row], [a for row in pert for a in row],
                              use_stemmer=use_stemmer)
        out["perturbed_rouge_l_recall"] = flat.reshape(n, len(pert[0]))
    return out


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Output of :func:`evaluate_model`.

    Attributes:
      splits: ``{split: {metric: per-example np.ndarray}}`` (see :func:`score_split`, plus
        ``rouge_l_recall`` and ``rouge_l_f1`` over the first ``rouge_examples`` rows of the
        generated splits, and on the forget split ``paraphrased_rouge_l_recall`` (n,) and
        ``perturbed_rouge_l_recall`` (n, K)).
      generations: ``{split: [greedy generation, ...]}`` for the generated rows.
      aggregates: ``{"forget": forget_summary, "utility_components": {...},
        "model_utility": float, "mia_auc": {attack: auc}, "forget_quality": float,
        "privleak": {attack: %}}`` (each present when its inputs are).
      roles: ``{split: role}``.
      not_available: ``{metric: "needs column(s) ..."}``: what the splits' columns could not
        give: ``"<split>/<metric>"`` per split (:func:`~jaxunlearn.eval.splits.split_not_available`)
        and the aggregates ``forget_quality`` and ``model_utility`` (split named); empty with the
        full TOFU columns.
    """

    splits: Mapping[str, Mapping[str, np.ndarray]]
    generations: Mapping[str, list[str]]
    aggregates: Mapping[str, Any]
    roles: Mapping[str, str]
    not_available: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def split_of(self, role: str) -> str:
        """The name of the split with ``role`` (KeyError naming the roles present)."""
        for name, r in self.roles.items():
            if r == role:
                return name
        raise KeyError(f"no split with role {role!r} (roles: {dict(self.roles)})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (arrays as lists, numpy scalars as floats)."""
        return to_jsonable({"splits": self.splits, "generations": self.generations,
                            "aggregates": self.aggregates, "roles": self.roles,
                            "not_available": self.not_available})


def to_jsonable(x: Any) -> Any:
    """A JSON-ready copy: arrays become lists, numpy scalars Python numbers, dataclasses and
    mappings dicts with string keys, tuples lists."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return to_jsonable(dataclasses.asdict(x))
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Mapping):
        return {str(key): to_jsonable(v) for key, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    return x


def _needs_in(what: list[tuple[str, str]]) -> str:
    """``"needs column(s) X in split 'a', Y in split 'b'"`` for ``[(split, role), ...]``."""
    return "needs " + "; ".join(f"column{'s' if len(truth_ratio_columns(r)) > 1 else ''} "
                                f"{', '.join(truth_ratio_columns(r))} in split {s!r}" for s, r in what)


def _aggregate(splits, roles: Mapping[str, str], reference: "EvalResult | None",
               not_available: dict[str, str]) -> dict[str, Any]:
    by_role: dict[str, list[str]] = {}
    for name, role in roles.items():
        by_role.setdefault(role, []).append(name)
    agg: dict[str, Any] = {}
    forget = by_role.get("forget", [None])[0]
    holdout = by_role.get("holdout", [None])[0]
    if forget is not None:
        agg["forget"] = forget_summary(splits[forget])
    retain_sets, option_sets = by_role.get("retain", []), by_role.get("general", [])
    no_ratio = [(s, roles[s]) for s in retain_sets + option_sets if "truth_ratio" not in splits[s]]
    if (retain_sets or option_sets) and all("rouge_l_recall" in splits[s] for s in retain_sets + option_sets):
        if no_ratio:
            not_available["model_utility"] = _needs_in(no_ratio)
        else:
            agg["utility_components"] = utility_components(splits, retain_sets=retain_sets, option_sets=option_sets)
            agg["model_utility"] = model_utility(splits, retain_sets=retain_sets, option_sets=option_sets)
    if forget is not None and holdout is not None:
        agg["mia_auc"] = mia_aucs(splits[forget], splits[holdout])
    if reference is not None and forget is not None:
        ref_forget = reference.split_of("forget")
        if "truth_ratio" not in splits[forget]:
            not_available["forget_quality"] = _needs_in([(forget, "forget")])
        elif "truth_ratio" not in reference.splits[ref_forget]:
            not_available["forget_quality"] = _needs_in([(ref_forget, "forget")]) + " (the reference's)"
        else:
            agg["forget_quality"] = forget_quality(splits[forget]["truth_ratio"],
                                                   reference.splits[ref_forget]["truth_ratio"])
        if "mia_auc" in agg and "mia_auc" in reference.aggregates:
            agg["privleak"] = {a: privleak(agg["mia_auc"][a], reference.aggregates["mia_auc"][a])
                               for a in agg["mia_auc"]}
    return agg


def evaluate_model(
    model,
    tokenizer,
    data: Mapping[str, "datasets.Dataset | EvalSplit"],
    *,
    forget: str | None = None,
    retain: str | Sequence[str] | None = None,
    general: str | Sequence[str] | None = None,
    holdout: str | None = None,
    params=None,
    reference: EvalResult | None = None,
    rouge_examples: int | None = None,
    max_new_tokens: int | None = 200,
    batch_size: int = 32,
    k: float = 0.4,
    use_stemmer: bool = True,
    separator: str | None = None,
    chat_template: bool | ChatFormat | None = None,
) -> EvalResult:
    """The TOFU-style evaluation of a decoder on forget / retain / general / holdout splits.

    Per example (every split): answer probability and mean NLL, token and fact accuracy,
    extraction strength, the MIA scores (LOSS, zlib, Min-k, Min-k++); with perturbed answers
    the truth ratio and the option-normalised probability; for forget / retain / general the
    ROUGE-L recall and F1 of the greedy generation (the first ``rouge_examples`` rows), and on
    the forget split its ROUGE-L recall against the paraphrased and each perturbed answer (as
    open-unlearning's ``forget_Q_A_PARA_ROUGE`` / ``forget_Q_A_PERT_ROUGE``: one greedy
    generation per question, scored against each target). A split needs only ``question`` and
    ``answer``: a metric whose column is missing is left out and named, with the column it needs,
    in :attr:`EvalResult.not_available`. Aggregates:
    forget-set summary, model utility (retain + general), MIA AUCs (forget vs holdout), and with
    a ``reference`` result (the model never trained on the forget set) forget quality and
    privleak.

    Args:
      model: a :class:`~jaxunlearn.models.Decoder`.
      tokenizer: its tokenizer (``len(tokenizer)`` must not exceed the model's vocabulary).
      data: ``{split: datasets.Dataset}`` in the TOFU column schema (encoded here with one
        padded length) or ``{split: EvalSplit}`` from :func:`encode_eval_splits`. Only the
        splits named by a role below are evaluated. To evaluate many models (or subsets of
        splits) with one compilation, encode once with :func:`encode_eval_splits` and pass
        the ``EvalSplit`` dict: the padded length is then the same for every call.
      forget: name of the forget split (its truth ratio, hence forget quality, needs paraphrased and
        perturbed answers).
      retain: name(s) of the retain split(s) (same columns) for model utility.
      general: name(s) of further retain-side sets scored with option-normalised probability
        (TOFU's real authors / world facts; that and model utility need ``perturbed_answer``).
      holdout: name of the never-trained split (MIA non-members).
      params: evaluate these parameters (an ``nnx.State`` of ``nnx.Param`` like
        ``DecoderFn.of(model)[1]``, e.g. fake-quantised) instead of the model's.
      reference: the :class:`EvalResult` of the reference model on the same splits.
      rouge_examples: generate for the first n rows of each forget / retain / general split
        (``None``: all rows; 0: no generation, hence no ROUGE and no model utility).
      max_new_tokens: generation budget; 200 is open-unlearning's default
        (``configs/generation/default.yaml``). ``None``: twice the longest answer, EOS included,
        of the evaluated splits (enough for short-answer data, and faster). Decoding stops early
        once every row has emitted EOS, and the text after the first EOS is dropped.
      batch_size: rows per jitted call.
      k: Min-k / Min-k++ fraction (TOFU: 0.4).
      use_stemmer: ROUGE tokenisation with the Porter stemmer (TOFU: True).
      separator: question/answer separator used when encoding ``datasets`` splits.
      chat_template: how ``datasets`` splits are encoded: ``None`` (the tokenizer's chat
        template when it has one, as open-unlearning), ``False`` (plain format), ``True`` or a
        :class:`~jaxunlearn.data.ChatFormat` (see :func:`encode_eval_splits`).

    Returns:
      An :class:`EvalResult`.

    Raises:
      KeyError: a missing split, or a split without ``question`` / ``answer`` (named);
      ValueError: an empty split, a tokenizer larger than the model's vocabulary.
    """
    if not isinstance(model, Decoder):
        raise TypeError(f"model must be a jaxunlearn.models.Decoder, got {type(model).__name__}")
    check_tokenizer(tokenizer, model.config)
    roles: dict[str, str] = {}
    for role, names in (("forget", forget), ("retain", retain), ("general", general), ("holdout", holdout)):
        for name in ([names] if isinstance(names, str) else list(names or [])):
            if name in roles:
                raise ValueError(f"split {name!r} given two roles ({roles[name]!r} and {role!r})")
            roles[name] = role
    if not roles:
        raise ValueError("name at least one split (forget=, retain=, general=, holdout=)")
    missing = [name for name in roles if name not in data]
    if missing:
        raise KeyError(f"split(s) {missing} not in the data (have {sorted(data)})")
    if rouge_examples is not None and rouge_examples < 0:
        raise ValueError(f"rouge_examples must be >= 0 or None, got {rouge_examples}")
    chosen = {name: data[name] for name in roles}
    if all(isinstance(v, datasets.Dataset) for v in chosen.values()):
        encoded = encode_eval_splits(tokenizer, chosen, roles=roles, separator=separator, chat_template=chat_template)
    elif all(isinstance(v, EvalSplit) for v in chosen.values()):
        encoded = chosen
    else:
        raise TypeError("data must map split names to datasets.Dataset, or all to EvalSplit")

    apply_fn, own_params = DecoderFn.of(model)  # hashable: the jitted passes compile once per architecture
    if params is None:
        params = own_params
    elif jax.tree.structure(params) != jax.tree.structure(own_params):
        raise ValueError("params do not have the structure of the model's nnx.Param state")
    run_model = apply_fn.merge(params)

    if max_new_tokens is None:  # one value for every split: one compilation of the decode
        max_new_tokens = 2 * max(int(np.max(s.answer["lengths"] - s.answer["prompt_lengths"]))
                                 for s in encoded.values())
    elif max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    splits, generations = {}, {}
    not_available = {f"{name}/{m}": why for name, split in encoded.items()
                     for m, why in split_not_available(split, roles[name]).items()}
    for name, split in encoded.items():
        res = score_split(apply_fn, params, split, batch_size=batch_size, k=k)
        n_gen = split.num_rows if rouge_examples is None else min(rouge_examples, split.num_rows)
        if roles[name] != "holdout" and n_gen > 0:
            gen = greedy_decode(run_model, tokenizer, split.prompts, n_gen, int(max_new_tokens), batch_size)
            res.update(_rouge_scores(gen, split, n_gen, roles[name] == "forget", use_stemmer))
            generations[name] = gen
        splits[name] = res
    aggregates = _aggregate(splits, roles, reference, not_available)
    return EvalResult(splits, generations, aggregates, roles, not_available)
