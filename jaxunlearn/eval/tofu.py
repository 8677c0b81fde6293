"""TOFU aggregates: truth ratio, forget quality, model utility (host-side numpy / scipy).

Per-example inputs come from the jitted passes of :mod:`jaxunlearn.eval.runner` (mean answer
NLLs, probabilities, ROUGE-L recalls); the aggregates follow the reference implementations
line by line:

- TOFU (Maini et al., 2024; ``locuslab/tofu``, ``aggregate_eval_stat.py``);
- open-unlearning (Dorna et al., 2025; ``src/evals/metrics/memorization.py::truth_ratio``,
  ``probability``, ``rouge``, ``probability_w_options``, ``privacy.py::forget_quality``,
  ``utility.py::hm_aggregate``; the TOFU metric list of ``configs/eval/tofu_metrics/``).

Notation: for an example with question ``q``, ``P(a) = exp(-(1/|a|) sum_t NLL_t(a | q))`` is
the length-normalised probability of answer ``a`` (:func:`~jaxunlearn.eval.metrics.answer_probability`).

References:
  Maini, Feng, Schwarzschild, Lipton, Kolter, "TOFU: A Task of Fictitious Unlearning for
  LLMs", 2024.
  Dorna, Mekala, Zhao, McCallum, Lipton, Kolter, Maini, "OpenUnlearning: Accelerating LLM
  Unlearning via Unified Benchmarking of Methods and Metrics", 2025.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import scipy.stats

__all__ = [
    "TRUTH_RATIO_EPS",
    "truth_ratio",
    "truth_ratio_forget_score",
    "truth_ratio_retain_score",
    "normalized_probability",
    "forget_quality",
    "harmonic_mean",
    "utility_components",
    "model_utility",
    "forget_summary",
    "FORGET_SUMMARY_KEYS",
]

#: The ``1e-10`` open-unlearning adds to denominators (truth ratio, normalised probability).
TRUTH_RATIO_EPS = 1e-10


def _vector(name: str, x, *, ndim: int = 1) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name} is empty (empty split?)")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf at rows {np.nonzero(~np.isfinite(a))[0].tolist()[:10]}")
    return a


def truth_ratio(nll_correct, nll_perturbed, *, eps: float = TRUTH_RATIO_EPS) -> np.ndarray:
    """Per-example truth ratio ``R = P_pert / (P_correct + eps)``.

    ``P_correct = exp(-nll_correct)`` is the length-normalised probability of the correct answer
    (TOFU: the *paraphrased* answer; for sets without a paraphrase, the answer itself), and
    ``P_pert = exp(-(1/K) sum_k nll_perturbed_k)`` the geometric mean of the K perturbed
    answers' length-normalised probabilities. ``R`` near 0: the model prefers the truth; near 1:
    it cannot tell; > 1: it prefers the wrong answers. This is open-unlearning's ``truth_ratio``
    (``wrong_prob / (correct_prob + 1e-10)``, in float64); TOFU's original code uses its inverse
    ``exp(mean_k nll_pert - nll_para) = 1 / R`` with the aggregates flipped accordingly.

    Args:
      nll_correct: (N,) mean answer-token NLL of the correct (paraphrased) answer.
      nll_perturbed: (N, K) mean answer-token NLL of each perturbed answer.
      eps: added to ``P_correct`` as in open-unlearning (0 gives the exact ratio).

    Returns:
      float64 (N,) truth ratios.
    """
    c = _vector("nll_correct", nll_correct)
    p = _vector("nll_perturbed", nll_perturbed, ndim=2)
    if p.shape[0] != c.shape[0]:
        raise ValueError(f"nll_correct has {c.shape[0]} rows but nll_perturbed {p.shape[0]}")
    return np.exp(-p.mean(axis=1)) / (np.exp(-c) + eps)


def truth_ratio_forget_score(ratios, *, eps: float = TRUTH_RATIO_EPS) -> float:
    """Forget-set aggregate ``mean_n min(R_n, 1 / (R_n + eps))`` (open-unlearning's
    ``closer_to_1_better``; TOFU's ``mean(min(c, 1/c))`` with ``c = 1/R``): 1 when the model cannot
    tell the true from the perturbed answers, lower when it prefers either."""
    r = _vector("ratios", ratios)
    return float(np.mean(np.minimum(r, 1.0 / (r + eps))))


def truth_ratio_retain_score(ratios) -> float:
    """Retain-side aggregate ``mean_n max(0, 1 - R_n)`` (open-unlearning's ``true_better``; TOFU's
    ``mean(max(0, 1 - 1/c))`` with ``c = 1/R``): 1 when the model strongly prefers the truth."""
    r = _vector("ratios", ratios)
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def normalized_probability(p_correct, p_perturbed, *, eps: float = TRUTH_RATIO_EPS) -> np.ndarray:
    """Option-normalised probability ``p(a) / (p(a) + sum_k p(perturbed_k) + eps)`` per example.

    Used by TOFU for the multiple-choice-style retain-side sets (real authors, world facts) in
    model utility (open-unlearning's ``probability_w_options``).

    Args:
      p_correct: (N,) length-normalised probability of the answer.
      p_perturbed: (N, K) the same for each perturbed answer.
      eps: as in open-unlearning.

    Returns:
      float64 (N,) in [0, 1].
    """
    c = _vector("p_correct", p_correct)
    p = _vector("p_perturbed", p_perturbed, ndim=2)
    if p.shape[0] != c.shape[0]:
        raise ValueError(f"p_correct has {c.shape[0]} rows but p_perturbed {p.shape[0]}")
    return c / (c + p.sum(axis=1) + eps)


def forget_quality(truth_ratios, reference_truth_ratios) -> float:
    """Forget quality: p-value of the two-sample Kolmogorov-Smirnov test between the per-example
    forget-set truth ratios of the unlearned model and of the reference model (never trained on
    the forget set): ``scipy.stats.ks_2samp(R_unlearned, R_reference).pvalue``.

    A p-value near 1 means the two distributions are indistinguishable (ideal unlearning); the
    target model before unlearning typically scores orders of magnitude lower. KS is invariant
    under monotone maps, so TOFU's ``1/R`` convention gives the same value.

    Args:
      truth_ratios: (N,) :func:`truth_ratio` on the forget set, unlearned model.
      reference_truth_ratios: (M,) the same for the reference model.

    Returns:
      The p-value (a Python float in [0, 1]).
    """
    a = _vector("truth_ratios", truth_ratios)
    b = _vector("reference_truth_ratios", reference_truth_ratios)
    return float(scipy.stats.ks_2samp(a, b).pvalue)


def harmonic_mean(values) -> float:
    """``n / sum_i (1 / x_i)`` of non-negative numbers; 0 if any ``x_i`` is 0 (as ``scipy.stats.hmean``).

    Raises:
      ValueError: empty input, a negative, NaN or infinite value.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("harmonic mean of no values")
    if not np.all(np.isfinite(x)) or np.any(x < 0):
        raise ValueError(f"harmonic mean needs finite non-negative values, got {x.tolist()}")
    if np.any(x == 0):
        return 0.0
    return float(x.size / np.sum(1.0 / x))


def _mean_of(results: Mapping[str, Mapping[str, np.ndarray]], split: str, key: str) -> float:
    if split not in results:
        raise KeyError(f"split {split!r} not in the results (have {sorted(results)})")
    if key not in results[split]:
        raise KeyError(f"results[{split!r}] has no {key!r} (have {sorted(results[split])}); "
                       "was it evaluated with the columns / generation this metric needs?")
    return float(np.mean(_vector(f"results[{split!r}][{key!r}]", results[split][key])))


def utility_components(
    results: Mapping[str, Mapping[str, np.ndarray]],
    *,
    retain_sets: Sequence[str] = ("retain",),
    option_sets: Sequence[str] = ("general",),
) -> dict[str, float]:
    """The 3 x S numbers whose harmonic mean is model utility.

    For each retain-side set ``s``: ``s/probability`` (the mean answer probability; for the
    multiple-choice-style ``option_sets`` the mean :func:`normalized_probability`),
    ``s/rouge_l`` (mean ROUGE-L recall of the greedy generations) and ``s/truth_ratio``
    (:func:`truth_ratio_retain_score`). TOFU uses retain + real authors + world facts, the
    latter two option-normalised.

    Args:
      results: per-split arrays from :func:`~jaxunlearn.eval.runner.evaluate_model` (keys
        ``probability``, ``normalized_probability``, ``rouge_l_recall``, ``truth_ratio``).
      retain_sets: splits scored with the plain probability.
      option_sets: splits scored with the option-normalised probability.

    Returns:
      ``{"<split>/<metric>": value}`` in a fixed order.
    """
    sets = [(s, False) for s in retain_sets] + [(s, True) for s in option_sets]
    if not sets:
        raise ValueError("model utility needs at least one retain-side set")
    out: dict[str, float] = {}
    for s, options in sets:
        out[f"{s}/probability"] = _mean_of(results, s, "normalized_probability" if options else "probability")
        out[f"{s}/rouge_l"] = _mean_of(results, s, "rouge_l_recall")
        if s not in results or "truth_ratio" not in results[s]:
            _mean_of(results, s, "truth_ratio")  # raises the KeyError naming what is missing
        out[f"{s}/truth_ratio"] = truth_ratio_retain_score(results[s]["truth_ratio"])
    return out


def model_utility(
    results: Mapping[str, Mapping[str, np.ndarray]],
    *,
    retain_sets: Sequence[str] = ("retain",),
    option_sets: Sequence[str] = ("general",),
) -> float:
    """Model utility: the harmonic mean of :func:`utility_components` (TOFU, Section 3.2).

    Args:
      results, retain_sets, option_sets: as in :func:`utility_components`.

    Returns:
      A float in [0, 1]; 0 as soon as one component is 0.
    """
    return harmonic_mean(list(utility_components(results, retain_sets=retain_sets,
                                                 option_sets=option_sets).values()))


#: ``forget_summary`` key -> (per-example key, open-unlearning TOFU metric it reproduces). Not
#: ported: ``forget_Q_A_gibberish`` (a score from an external gibberish classifier).
FORGET_SUMMARY_KEYS: dict[str, tuple[str, str | None]] = {
    "probability": ("probability", "forget_Q_A_Prob"),
    "paraphrased_probability": ("correct_probability", "forget_Q_A_PARA_Prob"),
    "perturbed_probability": ("perturbed_probability", "forget_Q_A_PERT_Prob"),
    "rouge_l": ("rouge_l_recall", "forget_Q_A_ROUGE"),
    "rouge_l_f1": ("rouge_l_f1", None),
    "paraphrased_rouge_l": ("paraphrased_rouge_l_recall", "forget_Q_A_PARA_ROUGE"),
    "perturbed_rouge_l": ("perturbed_rouge_l_recall", "forget_Q_A_PERT_ROUGE"),
    "extraction_strength": ("extraction_strength", "extraction_strength"),
    "token_acc": ("token_acc", None),
    "fact_acc": ("fact_acc", None),
    "nll": ("nll", None),
}


def _row_means(name: str, x) -> np.ndarray:
    """open-unlearning's ``aggregate_to_1D``: the mean over every axis but the first."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty array with a row axis, got shape {a.shape}")
    return _vector(name, a.reshape(a.shape[0], -1).mean(axis=1))


def forget_summary(split: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Forget-set aggregates of one split's per-example results.

    Each key of :data:`FORGET_SUMMARY_KEYS` is the mean over the examples of its per-example
    array, a row of K values (the perturbed answers) first averaged over K, as open-unlearning's
    ``aggregate_to_1D`` then ``np.mean``: ``probability`` (of the answer),
    ``paraphrased_probability`` (of the paraphrased answer: the truth ratio's correct answer,
    which on a forget split is always the paraphrase), ``perturbed_probability``
    (``mean_n mean_k P(perturbed_nk)``, the arithmetic mean, unlike the truth ratio's geometric
    one), ``rouge_l`` (ROUGE-L recall of the greedy generation against the answer), ``rouge_l_f1``,
    ``paraphrased_rouge_l`` and ``perturbed_rouge_l`` (recall of the same generation against the
    paraphrased / each perturbed answer), ``extraction_strength``, ``token_acc``, ``fact_acc``,
    ``nll``. ``exact_memorization``: the mean over the examples where it is defined (NaN rows,
    i.e. no answer token before the EOS, are left out as open-unlearning leaves out its ``None``;
    NaN if none is defined); ``truth_ratio``: :func:`truth_ratio_forget_score`. Keys absent from
    ``split`` are skipped.

    Args:
      split: per-example arrays of one split (from ``evaluate_model``).

    Returns:
      ``{metric: float}``.
    """
    out = {new: float(np.mean(_row_means(old, split[old])))
           for new, (old, _) in FORGET_SUMMARY_KEYS.items() if old in split}
    if "exact_memorization" in split:
        em = np.asarray(split["exact_memorization"], np.float64)
        if em.ndim != 1 or em.shape[0] == 0:
            raise ValueError(f"exact_memorization must be a non-empty 1-D array, got shape {em.shape}")
        if np.isinf(em).any():
            raise ValueError(f"exact_memorization contains inf at rows {np.nonzero(np.isinf(em))[0].tolist()[:10]}")
        defined = em[~np.isnan(em)]
        out["exact_memorization"] = float(defined.mean()) if defined.size else float("nan")
    if "truth_ratio" in split:
        out["truth_ratio"] = truth_ratio_forget_score(split["truth_ratio"])
    return out
