"""Typed method configurations: one frozen dataclass per method kind, parsed strictly from JSON.

A method config file (``experiments/configs/<name>.json``) is a JSON object whose
``"kind"`` picks the dataclass; every other key must be a field of it::

    {"kind": "gradient", "batch_size": 32,
     "unlearn": {"method": "npo", "steps": 30, "learning_rate": 5e-4, "beta": 0.1}}

:func:`parse_method_config` checks, before any model is loaded, that there are no unknown
keys (a typo'd ``batchsize`` is an error with a suggestion, not a silently-run default),
no missing required keys, and that every value has the field's type and range; each error
names the source (file) and the key path (``unlearn.learning_rate``). Kinds:

- ``task_vector`` (:class:`TaskVectorMethod`): ``theta_0 - scale * (theta_ft - theta_0)``,
  ``theta_ft`` the target fine-tuned on the forget set (:class:`FinetuneConfig`).
- ``perta`` (:class:`PertaMethod`): ``theta_0 - strength * (w * tau)``,
  ``w = I_f / (I_f + retain_scale * I_r + eps)`` with Fisher or gradient importances.
- ``ssd`` (:class:`SSDMethod`): selective synaptic dampening, ``theta_i *= min(lam I_D/I_f, 1)``
  where ``I_f > threshold I_D``.

Each name means one thing across kinds: ``alpha`` is only the retain-loss weight of gradient
methods (``unlearn.alpha``); the negation scale is ``scale``, SSD's selection threshold
``threshold`` (the paper's alpha). A config using a renamed key gets an error that names its
new name.
- ``gradient`` (:class:`GradientMethod`): an :class:`~jaxunlearn.unlearn.UnlearnConfig` run
  on forget (and retain) batches, optionally under a SalUn mask (``salun_fraction``).
- ``rmu`` (:class:`RMUMethod`): representation misdirection (:mod:`jaxunlearn.rmu`): one layer's
  hidden states on forget data steered toward ``steering_coeff * u``, retain ones kept.

Adapter space: ``task_vector``, ``perta`` and ``gradient`` take ``"adapter": {"rank": 8,
"alpha": 16, "base": "nf4", ...}`` (:class:`jaxunlearn.adapters.LoraConfig`): the fine-tuning
or the unlearning then trains a LoRA adapter over the frozen (NF4) target, and the result is the
adapter merged into the full-precision target (:func:`jaxunlearn.methods.run_method`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from pathlib import Path
from typing import Any, Mapping, Union

from jaxunlearn.adapters import LoraConfig
from jaxunlearn.continual import ContinualConfig
from jaxunlearn.unlearn import UnlearnConfig
from jaxunlearn.validate import check_choice, check_float, check_int

__all__ = ["FinetuneConfig", "TaskVectorMethod", "PertaMethod", "SSDMethod", "GradientMethod", "RMUMethod",
           "MethodConfig", "METHOD_KINDS", "parse_method_config", "load_method_config", "method_config_to_dict",
           "parse_adapter_spec", "with_adapter"]

IMPORTANCES = ("fisher", "grad")
GRAD_KINDS = ("squared_mean", "abs_mean", "abs_sum", "mean_abs")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning on the forget set (AdamW, linear warmup then constant), for the task vector.

    Attributes:
      steps: optimisation steps (>= 1).
      learning_rate: AdamW learning rate (> 0).
      batch_size: rows per step (>= 1; capped at the forget set's size).
      warmup_steps: linear warmup steps (>= 0).
    """

    steps: int
    learning_rate: float
    batch_size: int = 32
    warmup_steps: int = 0

    def __post_init__(self):
        check_int("FinetuneConfig", "steps", self.steps, min=1)
        check_float("FinetuneConfig", "learning_rate", self.learning_rate, min=0.0, min_exclusive=True)
        check_int("FinetuneConfig", "batch_size", self.batch_size, min=1)
        check_int("FinetuneConfig", "warmup_steps", self.warmup_steps, min=0)


def _check_importance(owner: str, cfg) -> None:
    check_choice(owner, "importance", cfg.importance, IMPORTANCES)
    check_choice(owner, "grad_kind", cfg.grad_kind, GRAD_KINDS)
    check_int(owner, "importance_batch_size", cfg.importance_batch_size, min=1)
    if cfg.max_importance_examples is not None:
        check_int(owner, "max_importance_examples", cfg.max_importance_examples, min=1)


@dataclasses.dataclass(frozen=True)
class TaskVectorMethod:
    """Task-vector negation (Ilharco et al., "Editing Models with Task Arithmetic", 2023).

    Attributes:
      finetune: how ``theta_ft`` is obtained from the target.
      scale: negation scale (> 0) in ``theta_0 - scale * tau``.
      adapter: fine-tune a LoRA adapter instead of every weight (None: full fine-tuning); the
        task vector is then the adapter's low-rank update ``s a b`` and its negation keeps the
        adapter, ``b -> -scale b``.
    """

    finetune: FinetuneConfig
    scale: float
    adapter: LoraConfig | None = None
    kind: str = dataclasses.field(default="task_vector", init=False)

    def __post_init__(self):
        check_float("TaskVectorMethod", "scale", self.scale, min=0.0, min_exclusive=True)


@dataclasses.dataclass(frozen=True)
class PertaMethod:
    """PerTA: the task vector rescaled per parameter by forget/retain importances.

    Attributes:
      finetune: how ``theta_ft`` is obtained from the target.
      strength: ``lambda`` in ``theta_0 - lambda * (w * tau)`` (> 0).
      retain_scale: ``a`` in ``w = I_f / (I_f + a I_r + eps)`` (>= 0).
      importance: ``"fisher"`` (diagonal Fisher) or ``"grad"`` (gradient importance).
      grad_kind: the gradient importance's formula (:func:`jaxunlearn.grad_importance`).
      importance_batch_size: rows per importance batch.
      max_importance_examples: a seeded subset of at most this many rows per set (None: all).
      adapter: fine-tune a LoRA adapter (None: every weight); ``tau`` is then its update
        ``s a b`` in weight space, rescaled per weight by the importances of the target's
        weights.
    """

    finetune: FinetuneConfig
    strength: float
    retain_scale: float = 1.0
    importance: str = "fisher"
    grad_kind: str = "squared_mean"
    importance_batch_size: int = 32
    max_importance_examples: int | None = None
    adapter: LoraConfig | None = None
    kind: str = dataclasses.field(default="perta", init=False)

    def __post_init__(self):
        check_float("PertaMethod", "strength", self.strength, min=0.0, min_exclusive=True)
        check_float("PertaMethod", "retain_scale", self.retain_scale, min=0.0)
        _check_importance("PertaMethod", self)


@dataclasses.dataclass(frozen=True)
class SSDMethod:
    """Selective synaptic dampening (Foster et al., 2024) with importances on forget and all data.

    Attributes:
      threshold: selection threshold (> 0; the paper's alpha): parameter i is dampened iff
        ``I_f,i > threshold I_D,i``.
      lam: dampening constant (> 0; the paper's lambda) in ``min(lam I_D,i / I_f,i, 1)``.
      importance, grad_kind, importance_batch_size, max_importance_examples: as in
        :class:`PertaMethod`.
    """

    threshold: float = 10.0
    lam: float = 1.0
    importance: str = "fisher"
    grad_kind: str = "squared_mean"
    importance_batch_size: int = 32
    max_importance_examples: int | None = None
    kind: str = dataclasses.field(default="ssd", init=False)

    def __post_init__(self):
        check_float("SSDMethod", "threshold", self.threshold, min=0.0, min_exclusive=True)
        check_float("SSDMethod", "lam", self.lam, min=0.0, min_exclusive=True)
        _check_importance("SSDMethod", self)


@dataclasses.dataclass(frozen=True)
class GradientMethod:
    """A gradient unlearning run (GA, GradDiff, NPO, SimNPO and their variants).

    Attributes:
      unlearn: the step's hyperparameters (validated by :class:`~jaxunlearn.unlearn.UnlearnConfig`).
      batch_size: forget rows per step (>= 1; capped at the forget set's size).
      retain_batch_size: retain rows per step (None: ``batch_size``).
      salun_fraction: SalUn mask over the top fraction of forget-gradient saliency, in (0, 1]
        (None: no mask).
      prune_sparsity: prune first, then unlearn (Jia et al., NeurIPS 2023): one-shot global
        magnitude pruning of the decoder blocks' linear kernels to this sparsity, in [0, 1),
        before unlearning, the mask then fixed (:func:`jaxunlearn.sparsity.magnitude_prune_mask`;
        None: no pruning).
      adapter: unlearn in adapter space (:class:`~jaxunlearn.adapters.LoraConfig`): a LoRA
        adapter over the frozen target (held as NF4 with ``base="nf4"``) is trained, the
        reference model is the frozen base, SalUn saliency and masks are over the adapter, and
        the result is the adapter merged into the full-precision target. None: every weight.
      continual: a continual method's importance-aware update (:class:`~jaxunlearn.continual.ContinualConfig`):
        ``"lwf"`` adds the Fisher-weighted anchor ``strength sum_i F_i (theta_i - theta*_i)^2``
        (EWC's penalty; F the retain Fisher at the target, theta* the target: one request of
        :mod:`jaxunlearn.stream`), ``"fit"`` updates only FIT's top attributed layers. None: off.
        Not with ``adapter``.
    """

    unlearn: UnlearnConfig
    batch_size: int = 32
    retain_batch_size: int | None = None
    salun_fraction: float | None = None
    prune_sparsity: float | None = None
    adapter: LoraConfig | None = None
    continual: ContinualConfig | None = None
    kind: str = dataclasses.field(default="gradient", init=False)

    def __post_init__(self):
        check_int("GradientMethod", "batch_size", self.batch_size, min=1)
        if self.retain_batch_size is not None:
            check_int("GradientMethod", "retain_batch_size", self.retain_batch_size, min=1)
        if self.salun_fraction is not None:
            f = check_float("GradientMethod", "salun_fraction", self.salun_fraction, min=0.0, min_exclusive=True)
            if f > 1.0:
                raise ValueError(f"GradientMethod.salun_fraction must be in (0, 1], got {self.salun_fraction!r}")
        if self.prune_sparsity is not None:
            f = check_float("GradientMethod", "prune_sparsity", self.prune_sparsity, min=0.0)
            if f >= 1.0:
                raise ValueError(f"GradientMethod.prune_sparsity must be in [0, 1), got {self.prune_sparsity!r}")
            if self.adapter is not None:
                raise ValueError("GradientMethod.prune_sparsity prunes the model's weights and cannot be combined "
                                 "with adapter (which trains a LoRA adapter over frozen weights)")
        if self.continual is not None and self.adapter is not None:
            raise ValueError("GradientMethod.continual weighs the model's weights and cannot be combined with "
                             "adapter (which trains a LoRA adapter over frozen weights)")


RMU_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class RMUMethod:
    """RMU, representation misdirection for unlearning (Li et al., "The WMDP Benchmark", ICML 2024).

    Minimises ``gamma L_f + alpha L_r`` (:mod:`jaxunlearn.rmu`) with ``h_l`` the residual stream
    after block ``layer``: ``L_f`` the squared distance of ``h_l(theta; x_f)`` to
    ``steering_coeff * u`` (``u`` a random unit vector drawn from the run's seed), ``L_r`` that of
    ``h_l(theta; x_r)`` to the frozen model's, both over the answer tokens; only the MLP
    projections ``trainable_params`` of blocks ``trainable_layers`` are updated (AdamW, constant
    learning rate after ``warmup_steps``, global-norm clip).

    Defaults: open-unlearning's RMU (``configs/trainer/RMU.yaml`` and
    ``configs/experiment/unlearn/wmdp/default.yaml``: ``steering_coeff`` 2, ``alpha`` 1,
    ``gamma`` 1, module ``model.layers.7``, trainable ``model.layers.(5|6|7).mlp.down_proj.weight``
    as the WMDP code, learning rate 5e-5 constant, 80 steps of 16 rows (1 x 16 gradient
    accumulation), no weight decay (``configs/trainer/finetune.yaml``), clip 1.0 (Hugging Face's
    ``max_grad_norm``)). They are for a 7B model; ``experiments/configs/rmu.json`` scales them to
    the embedded 2-layer model.

    Attributes:
      layer: the steered block (>= 0; < the model's ``num_layers``, checked at run time).
      steering_coeff: ``c`` (> 0), the norm of the forget target ``c u``.
      alpha: retain weight (>= 0).
      gamma: forget weight (>= 0).
      trainable_layers: the blocks whose MLP is updated (None: ``layer - 2 .. layer``, the
        existing ones, as WMDP's 5, 6, 7 for layer 7).
      trainable_params: which MLP projections of those blocks (``gate_proj``, ``up_proj``,
        ``down_proj``; kernel and bias).
      steps: optimisation steps (>= 0).
      learning_rate: AdamW learning rate (> 0).
      weight_decay: AdamW weight decay (>= 0; only the trainable parameters).
      grad_clip: global-norm clip (>= 0; 0: off).
      warmup_steps: linear warmup (>= 0).
      batch_size: forget rows per step (>= 1; capped at the forget set's size).
      retain_batch_size: retain rows per step (None: ``batch_size``).
    """

    layer: int = 7
    steering_coeff: float = 2.0
    alpha: float = 1.0
    gamma: float = 1.0
    trainable_layers: tuple[int, ...] | None = None
    trainable_params: tuple[str, ...] = ("down_proj",)
    steps: int = 80
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    batch_size: int = 16
    retain_batch_size: int | None = None
    kind: str = dataclasses.field(default="rmu", init=False)

    def __post_init__(self):
        o = "RMUMethod"
        check_int(o, "layer", self.layer, min=0)
        check_float(o, "steering_coeff", self.steering_coeff, min=0.0, min_exclusive=True)
        for name in ("alpha", "gamma", "weight_decay", "grad_clip"):
            check_float(o, name, getattr(self, name), min=0.0)
        check_float(o, "learning_rate", self.learning_rate, min=0.0, min_exclusive=True)
        for name, lo in (("steps", 0), ("warmup_steps", 0), ("batch_size", 1)):
            check_int(o, name, getattr(self, name), min=lo)
        if self.retain_batch_size is not None:
            check_int(o, "retain_batch_size", self.retain_batch_size, min=1)
        layers = self.trainable_layers
        if layers is None:
            layers = tuple(range(max(0, self.layer - 2), self.layer + 1))
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple)) or not layers:
            raise TypeError(f"{o}.trainable_layers must be a non-empty list of block indices or None, got {layers!r}")
        layers = tuple(check_int(o, f"trainable_layers[{i}]", x, min=0) for i, x in enumerate(layers))
        names = self.trainable_params
        if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple)) or not names:
            raise TypeError(f"{o}.trainable_params must be a non-empty list of {RMU_PROJECTIONS}, got {names!r}")
        names = tuple(check_choice(o, f"trainable_params[{i}]", x, RMU_PROJECTIONS) for i, x in enumerate(names))
        object.__setattr__(self, "trainable_layers", tuple(sorted(set(layers))))
        object.__setattr__(self, "trainable_params", tuple(dict.fromkeys(names)))


MethodConfig = Union[TaskVectorMethod, PertaMethod, SSDMethod, GradientMethod, RMUMethod]
METHOD_KINDS: dict[str, type] = {"task_vector": TaskVectorMethod, "perta": PertaMethod, "ssd": SSDMethod,
                                 "gradient": GradientMethod, "rmu": RMUMethod}
"""``kind`` -> its config dataclass."""


_RENAMED = {"TaskVectorMethod": {"alpha": "scale"}, "SSDMethod": {"alpha": "threshold"}}
"""Keys renamed so that one name means one thing (``alpha``: the retain weight of gradient methods)."""


def _dataclass_of(hint) -> type | None:
    """The dataclass in a field's type hint (``X`` or ``X | None``), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _build(cls: type, obj: Any, source: str, prefix: str) -> Any:
    where = f"key '{prefix[:-1]}'" if prefix else "the top level"
    if not isinstance(obj, Mapping):
        raise TypeError(f"{source}: {where} must be a JSON object, got {type(obj).__name__} {obj!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in obj:
        if key not in fields and not (key == "kind" and not prefix):
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            if key in _RENAMED.get(cls.__name__, {}):
                hint = f"; it is called '{_RENAMED[cls.__name__][key]}' now"
            raise ValueError(f"{source}: unknown key '{prefix}{key}' for {cls.__name__} "
                             f"(known: {', '.join(sorted(fields))}){hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{source}: missing key '{prefix}{name}' for {cls.__name__}")
            continue
        sub = _dataclass_of(hints[name])
        value = obj[name]
        kwargs[name] = _build(sub, value, source, f"{prefix}{name}.") if sub is not None and value is not None \
            else value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        msg = str(e)
        field = msg.split(" ", 1)[0].split(".", 1)[-1] if msg.startswith(f"{cls.__name__}.") else None
        key = f" (key '{prefix}{field}')" if field else ""
        raise type(e)(f"{source}{key}: {msg}") from None


def parse_method_config(obj: Mapping[str, Any] | MethodConfig, source: str = "method config") -> MethodConfig:
    """The typed config of a JSON-like method config (a typed config is returned as is).

    Args:
      obj: ``{"kind": ..., ...}`` as read from a config file.
      source: how errors name where ``obj`` came from (the file path).

    Returns:
      A :data:`MethodConfig` (frozen dataclass of the ``kind``).

    Raises:
      ValueError: unknown ``kind``, unknown or missing keys (the key path named, with a
        close match suggested), out-of-range values.
      TypeError: a value of the wrong type (the key path named).
    """
    if isinstance(obj, tuple(METHOD_KINDS.values())):
        return obj
    if not isinstance(obj, Mapping):
        raise TypeError(f"{source}: a method config must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind")
    if kind not in METHOD_KINDS:
        raise ValueError(f"{source}: key 'kind' must be one of {tuple(METHOD_KINDS)}, got {kind!r}")
    return _build(METHOD_KINDS[kind], obj, source, "")


def load_method_config(path: str | os.PathLike) -> MethodConfig:
    """Read and parse one method config file (errors name the file and the key).

    Raises:
      FileNotFoundError: no such file. ValueError / TypeError: as :func:`parse_method_config`,
      and for a file that is not UTF-8 JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"method config '{path}' does not exist" +
                                (" (it is a directory)" if path.is_dir() else ""))
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"method config '{path}' is corrupt (not UTF-8 text: {e.reason} at byte {e.start})") \
            from None
    except json.JSONDecodeError as e:
        raise ValueError(f"method config '{path}' is not valid JSON: {e}") from None
    return parse_method_config(obj, f"method config '{path}'")


def method_config_to_dict(cfg: MethodConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The JSON form of a method config, every field present (defaults filled in)."""
    cfg = parse_method_config(cfg)
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def parse_adapter_spec(spec: str) -> LoraConfig:
    """A :class:`~jaxunlearn.adapters.LoraConfig` from a command-line spec ``"key=value,key=value"``.

    Keys are the config's fields (``rank``, ``alpha``, ``base``, ``base_block_size``, ``init``,
    ``targets``; ``targets`` last if its pattern holds a comma: everything after ``targets=`` is
    the pattern); values are converted to the field's type. ``""`` or ``"default"`` is the default
    config; ``"nf4"`` is shorthand for ``base=nf4``.

    >>> c = parse_adapter_spec("rank=4,alpha=8,base=nf4")
    >>> c.rank, c.alpha, c.base, c.scale
    (4, 8.0, 'nf4', 2.0)

    Raises:
      ValueError: an unknown key (with the known ones), a malformed item, or a bad value (the
        field named, as :class:`~jaxunlearn.adapters.LoraConfig` raises).
    """
    if not isinstance(spec, str):
        raise TypeError(f"an adapter spec must be a string, got {spec!r}")
    spec = spec.strip()
    if spec in ("", "default"):
        return LoraConfig()
    if spec == "nf4":
        return LoraConfig(base="nf4")
    fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
    kwargs: dict[str, Any] = {}
    rest = spec
    if "targets=" in rest:  # the pattern may contain commas: it runs to the end
        rest, _, pattern = rest.partition("targets=")
        kwargs["targets"] = pattern
        rest = rest.rstrip(",")
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"adapter spec item {item!r} is not key=value (spec {spec!r})")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            raise ValueError(f"adapter spec: unknown key {key!r} (known: {', '.join(fields)})"
                             + (f"; did you mean '{close[0]}'?" if close else ""))
        kind = {"rank": int, "base_block_size": int, "alpha": float}.get(key, str)
        try:
            kwargs[key] = kind(value)
        except ValueError:
            raise ValueError(f"adapter spec: {key}={value!r} is not a{'n int' if kind is int else ' number'}") \
                from None
    return LoraConfig(**kwargs)


def with_adapter(cfg: MethodConfig, adapter: LoraConfig | None, name: str = "method") -> MethodConfig:
    """``cfg`` run in adapter space (its ``adapter`` field set; None returns ``cfg`` unchanged).

    Raises:
      ValueError: a kind without an adapter form (SSD dampens the target's own weights), naming
        the method; an adapter on a config that prunes its weights.
    """
    if adapter is None:
        return cfg
    if not hasattr(cfg, "adapter"):
        raise ValueError(f"{name} (kind {cfg.kind!r}) has no adapter form: it edits the target's own weights "
                         "(adapters: kinds task_vector, perta, gradient)")
    try:
        return dataclasses.replace(cfg, adapter=adapter)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
