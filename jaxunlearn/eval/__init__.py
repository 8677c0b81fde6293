"""Evaluation: TOFU-style metrics, membership inference, quantisation recovery.

- ``metrics``: per-example answer metrics from logits (probability, token accuracy,
  extraction strength, exact memorisation);
- ``tofu``: truth ratio, forget quality (KS p-value), model utility (harmonic mean), forget
  summary (open-unlearning's forget-set TOFU metrics, :data:`FORGET_SUMMARY_KEYS`);
- ``mia``: LOSS / zlib / Min-k / Min-k++ scores, ROC-AUC, privleak;
- ``rouge``: ROUGE-L recall and F1 exactly as ``rouge_score`` (with its Porter stemmer) computes them;
- ``splits``: benchmark splits encoded with one padded length (:func:`encode_eval_splits`);
- ``runner``: fixed-shape jitted passes, :func:`evaluate_model`;
- ``muse``: MUSE's KnowMem, VerbMem and PrivLeak (:func:`muse_eval`);
- ``quant_recovery``: the forget metrics again after int8 / int4 / nf4 fake quantisation;
- ``durability``: FA / RA at each deployment precision (bf16, int8, int4, ...), the INT4
  recovery ratio, the (epsilon, P) durability certificate and its table;
- ``relearn``: the relearning attack (fine-tune on part of the forget set, measure the rest);
- ``remind``: REMIND, the input-loss-landscape detector of residual memorisation;
- ``probes``: per-model extra evaluations the benchmark runs (relearning, overlap splits, REMIND).

>>> from jaxunlearn.eval import evaluate_model, forget_quality
>>> # ref = evaluate_model(reference_model, tok, dd, forget="forget10", retain="retain90",
>>> #                      general="general", holdout="holdout")
>>> # res = evaluate_model(unlearned, tok, dd, forget="forget10", retain="retain90",
>>> #                      general="general", holdout="holdout", reference=ref)
>>> # res.aggregates["forget_quality"], res.aggregates["model_utility"]
"""

from jaxunlearn.eval.durability import (
    DEFAULT_EPSILON,
    DEFAULT_PRECISIONS,
    PRECISIONS,
    certificate,
    deploy,
    evaluate_precisions,
    recovery_ratio,
)
from jaxunlearn.eval.durability_table import durability_summary, format_durability_table
from jaxunlearn.eval.metrics import (
    answer_probability,
    answer_stats,
    exact_memorization,
    extraction_strength,
    token_accuracy,
)
from jaxunlearn.eval.mia import (
    MIA_ATTACKS,
    mia_auc,
    mia_aucs,
    mia_scores,
    min_k_from_logprobs,
    min_k_plus_plus_score,
    min_k_score,
    privleak,
    roc_auc,
    token_logprob_moments,
    tokenwise_mask,
    zlib_length,
    zlib_score,
)
from jaxunlearn.eval.muse import (
    MUSE_COLUMNS,
    MUSE_STOP_WORDS,
    GenerationScores,
    knowmem,
    knowmem_prompt,
    muse_eval,
    passage_min_k,
    verbmem,
)
from jaxunlearn.eval.quant_recovery import QUANT_SCHEMES, forget_metrics, quantization_recovery
from jaxunlearn.eval.probes import benchmark_probes, fact_scores, overlap_probe, relearn_probe, remind_probe
from jaxunlearn.eval.relearn import RelearnConfig, recovered_fraction, relearn, split_for_relearning
from jaxunlearn.eval.remind import (
    REMIND_FEATURES,
    RemindConfig,
    embedding_neighbours,
    landscape_features,
    landscape_losses,
    neighbourhood,
    remind_auc,
    remind_evaluate,
)
from jaxunlearn.eval.rouge import (
    RougeScore,
    lcs_length,
    porter_stem,
    rouge_l,
    rouge_l_f1,
    rouge_l_recall,
    rouge_tokenize,
)
from jaxunlearn.eval.runner import (
    ROLE_COLUMNS,
    EvalResult,
    EvalSplit,
    encode_eval_splits,
    evaluate_encoded,
    evaluate_model,
    fixed_batches,
    score_split,
)
from jaxunlearn.eval.tofu import (
    FORGET_SUMMARY_KEYS,
    forget_quality,
    forget_summary,
    harmonic_mean,
    model_utility,
    normalized_probability,
    truth_ratio,
    truth_ratio_forget_score,
    truth_ratio_retain_score,
    utility_components,
)

__all__ = [
    "DEFAULT_EPSILON",
    "DEFAULT_PRECISIONS",
    "PRECISIONS",
    "certificate",
    "deploy",
    "durability_summary",
    "evaluate_precisions",
    "format_durability_table",
    "recovery_ratio",
    "RelearnConfig",
    "recovered_fraction",
    "relearn",
    "REMIND_FEATURES", "RemindConfig", "embedding_neighbours", "landscape_features", "landscape_losses",
    "neighbourhood", "remind_auc", "remind_evaluate",
    "benchmark_probes", "fact_scores", "overlap_probe", "relearn_probe", "remind_probe",
    "split_for_relearning",
    "verbmem",
    "passage_min_k",
    "muse_eval",
    "knowmem_prompt",
    "knowmem",
    "GenerationScores",
    "MUSE_STOP_WORDS",
    "MUSE_COLUMNS",
    "FORGET_SUMMARY_KEYS",
    "MIA_ATTACKS",
    "QUANT_SCHEMES",
    "ROLE_COLUMNS",
    "EvalResult",
    "EvalSplit",
    "RougeScore",
    "answer_probability",
    "answer_stats",
    "encode_eval_splits",
    "evaluate_encoded",
    "evaluate_model",
    "exact_memorization",
    "extraction_strength",
    "fixed_batches",
    "forget_metrics",
    "forget_quality",
    "forget_summary",
    "harmonic_mean",
    "lcs_length",
    "mia_auc",
    "mia_aucs",
    "mia_scores",
    "min_k_from_logprobs",
    "min_k_plus_plus_score",
    "min_k_score",
    "model_utility",
    "normalized_probability",
    "porter_stem",
    "privleak",
    "quantization_recovery",
    "roc_auc",
    "rouge_l",
    "rouge_l_f1",
    "rouge_l_recall",
    "rouge_tokenize",
    "score_split",
    "token_accuracy",
    "token_logprob_moments",
    "tokenwise_mask",
    "truth_ratio",
    "truth_ratio_forget_score",
    "truth_ratio_retain_score",
    "utility_components",
    "zlib_length",
    "zlib_score",
]
