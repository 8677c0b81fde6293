"""jaxunlearn: machine-unlearning transforms for language models, in JAX.

Pure functions over parameter pytrees and optax ``GradientTransformation``s, all
jit-compiled and shardable. The public API is re-exported here, as in
``optax/__init__.py``:

>>> import jaxunlearn as ju
>>> tau = ju.task_vector(finetuned, base)                          # doctest: +SKIP
>>> fn, base = ju.DecoderFn.of(model)                              # doctest: +SKIP
>>> F_f = ju.fisher_diagonal(fn.example_nll, base, forget_batches) # doctest: +SKIP
>>> F_r = ju.fisher_diagonal(fn.example_nll, base, retain_batches) # doctest: +SKIP
>>> unlearned = ju.perta(base, tau, F_f, F_r, strength=3.5)        # doctest: +SKIP

Sub-packages: ``jaxunlearn.models`` (Llama-family nnx decoders, Hugging Face IO),
``jaxunlearn.data`` (synthetic benchmark, TOFU loader, batching), ``jaxunlearn.eval``
(TOFU metrics, membership inference), ``jaxunlearn.kernels`` (Pallas kernels).
"""

from jaxunlearn import tree
from jaxunlearn.checkpoint import restore_pytree, save_pytree
from jaxunlearn.dampening import ssd, ssd_factors
from jaxunlearn.fisher import fisher_diagonal, grad_importance, mean_grad, per_example_grads, sample_labels_fn
from jaxunlearn.fisher_fused import fisher_diagonal_fused
from jaxunlearn.models import DecoderFn
from jaxunlearn.continual import ContinualConfig, ContinualState, fisher_penalty, fold_fisher, layer_masked_updates
from jaxunlearn.losses import (
    activation_loss,
    batch_token_nll,
    dpo,
    grad_diff,
    gradient_ascent,
    kl_to_reference,
    mean_token_nll,
    npo,
    sequence_nll,
    simnpo,
    token_logprobs,
    undial,
    wga,
)
from jaxunlearn.projection import ProjectOrthogonalState, orthogonal_projection, project_orthogonal
from jaxunlearn.quant import NF4_LEVELS, fake_quantize
from jaxunlearn.saliency import masked_updates, salun_mask
from jaxunlearn.sam import saf_loss, saf_perturbation_radius, sam, sam_gradient, sam_perturbation
from jaxunlearn.task_vector import apply_task_vector, perta, perta_weights, ratio_weight_fn, task_vector
from jaxunlearn import train  # the module (jaxunlearn.train.train is the training loop)
from jaxunlearn.train import TrainConfig
from jaxunlearn.estimators import plain_estimator, saf_estimator, sam_estimator
from jaxunlearn.unlearn import UnlearnConfig, Unlearner, UnlearnState, forget_loss_fn, retain_loss_fn, unlearner

__version__ = "0.1.0"

__all__ = [
    "ContinualConfig",
    "ContinualState",
    "activation_loss",
    "dpo",
    "fisher_penalty",
    "fold_fisher",
    "layer_masked_updates",
    "undial",
    "wga",
    "DecoderFn",
    "NF4_LEVELS",
    "ProjectOrthogonalState",
    "TrainConfig",
    "UnlearnConfig",
    "UnlearnState",
    "Unlearner",
    "apply_task_vector",
    "fake_quantize",
    "fisher_diagonal",
    "fisher_diagonal_fused",
    "forget_loss_fn",
    "grad_diff",
    "grad_importance",
    "gradient_ascent",
    "kl_to_reference",
    "masked_updates",
    "mean_grad",
    "mean_token_nll",
    "batch_token_nll",
    "npo",
    "orthogonal_projection",
    "per_example_grads",
    "perta",
    "perta_weights",
    "plain_estimator",
    "project_orthogonal",
    "ratio_weight_fn",
    "restore_pytree",
    "retain_loss_fn",
    "saf_estimator",
    "saf_loss",
    "saf_perturbation_radius",
    "salun_mask",
    "sam",
    "sam_estimator",
    "sam_gradient",
    "sam_perturbation",
    "sample_labels_fn",
    "save_pytree",
    "sequence_nll",
    "simnpo",
    "ssd",
    "ssd_factors",
    "task_vector",
    "token_logprobs",
    "train",  # module
    "tree",
    "unlearner",
]
