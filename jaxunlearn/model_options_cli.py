"""Command-line model options for the commands that differentiate a loaded checkpoint (train, unlearn, bench).

- ``--param-dtype float32|bfloat16``: the parameters' storage dtype (tensors cast on load;
  :func:`jaxunlearn.models.from_pretrained` ``param_dtype``). Computation stays float32 (softmax,
  norms and logits always are), the optimizers keep float32 moments
  (:func:`jaxunlearn.optim.float32_state`) and the Fisher accumulates in float32; the result is
  saved in the parameters' dtype. Default: float32 (the checkpoint's values, exactly).
- ``--remat none|full|dots_saveable``: activation rematerialisation of each decoder block under
  differentiation (:class:`jaxunlearn.models.ModelConfig` ``remat``): less memory, the same
  values and gradients.
- ``--scan-layers``: the decoder blocks stacked along a leading layer axis and run by one
  ``lax.scan`` (``ModelConfig.scan_layers``): the program's size stays flat in depth; values equal
  the unrolled model's; the checkpoint is written per layer as before.
"""

from __future__ import annotations

import argparse
import dataclasses

__all__ = ["add_model_options", "load_kwargs", "apply_model_options"]

PARAM_DTYPES = ("float32", "bfloat16")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Add ``--param-dtype`` and ``--remat`` (module docstring) to ``p``."""
    from jaxunlearn.models.config import REMAT_POLICIES

    p.add_argument("--param-dtype", default="float32", choices=PARAM_DTYPES,
                   help="parameter storage dtype (compute, optimizer moments and the Fisher stay float32); "
                        "the output is saved in it")
    p.add_argument("--remat", default="none", choices=REMAT_POLICIES,
                   help="recompute each block's activations in the backward pass (less memory, same values)")
    p.add_argument("--scan-layers", action="store_true",
                   help="stack the decoder blocks and run them under one lax.scan (program size and compile "
                        "time flat in depth; same values; not with --adapter)")


def load_kwargs(args: argparse.Namespace) -> dict:
    """The :func:`jaxunlearn.models.from_pretrained` keywords of ``args`` (compute float32, the chosen
    parameter dtype)."""
    return {"dtype": "float32", "param_dtype": getattr(args, "param_dtype", "float32"),
            "scan_layers": bool(getattr(args, "scan_layers", False))}


def apply_model_options(model, args: argparse.Namespace):
    """``model`` with ``args.remat`` set in its config (in place; returned for chaining).

    The decoder reads its config at every call, so this changes how the next traced forward
    differentiates, not its values.
    """
    remat = getattr(args, "remat", "none")
    if model.config.remat != remat:
        model.config = dataclasses.replace(model.config, remat=remat)
    return model
