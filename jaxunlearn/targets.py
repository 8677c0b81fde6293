"""The target model of a benchmark run, trained once per data configuration and reused.

The stream (:mod:`jaxunlearn.stream`) and durability (:mod:`jaxunlearn.durability_bench`)
benchmarks both start from a *target*: the synthetic QA decoder of a
:class:`jaxunlearn.pipeline.DemoConfig`, trained on forget + retain. Training it is most of a
quick run, so each run saves it as ``<out>/models/target`` (a Hugging Face-layout checkpoint,
:func:`jaxunlearn.models.save_pretrained`) with a *record* file beside it: the benchmark's kind
and the ``DemoConfig`` it was trained with. :func:`provide_target` reuses the first cached
checkpoint whose record equals the run's and whose tokenizer has the same vocabulary (a
directory from another configuration, or a damaged one, is passed over), else trains one.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

__all__ = ["check_qa_demo", "target_record", "load_cached_target", "provide_target", "ProvidedTarget"]


def check_qa_demo(owner: str, demo: Any, why: str) -> None:
    """Check that ``demo`` is a :class:`jaxunlearn.pipeline.DemoConfig` of the QA (not MUSE) kind.

    Raises:
      TypeError: ``demo`` is not a ``DemoConfig``.
      ValueError: ``demo.muse`` is set (``why`` says what needs QA rows).
    """
    from jaxunlearn.pipeline import DemoConfig

    if not isinstance(demo, DemoConfig):
        raise TypeError(f"{owner}.demo must be a DemoConfig, got {type(demo).__name__}")
    if demo.muse:
        raise ValueError(f"{owner}.demo.muse must be False: {why}")


def target_record(kind: str, demo: Any) -> dict[str, Any]:
    """The record saved beside a target: ``{"format": "jaxunlearn-<kind>-target", "demo": {...}}``."""
    from jaxunlearn.eval.runner import to_jsonable

    return {"format": f"jaxunlearn-{kind}-target", "demo": to_jsonable(dataclasses.asdict(demo))}


def load_cached_target(dirs: Sequence[Path], record_file: str, record: dict[str, Any], tokenizer):
    """The first checkpoint of ``dirs`` whose ``record_file`` holds ``record`` and whose tokenizer
    has ``tokenizer``'s vocabulary: ``(model, dir)``, else ``(None, None)``. Unreadable or
    unloadable directories are passed over."""
    import json

    from jaxunlearn.models import from_pretrained

    for d in dirs:
        rec = Path(d) / record_file
        try:
            if not rec.is_file() or json.loads(rec.read_text()) != record:
                continue
            model, tok = from_pretrained(d)
        except (OSError, ValueError):
            continue
        if tok is not None and tok.get_vocab() == tokenizer.get_vocab():
            return model, Path(d)
    return None, None


class ProvidedTarget(NamedTuple):
    """What :func:`provide_target` gives: the model, where it was reused from (None: trained now)
    and the training history (None when reused)."""

    model: Any
    reused_from: Path | None
    history: Any


def provide_target(target_dir: Path, caches: Sequence[Path], data: Any, demo: Any, *, kind: str,
                   record_file: str, log: Callable[[str], None] = lambda msg: None,
                   progress: bool = False) -> ProvidedTarget:
    """Reuse a cached target of ``demo`` (:func:`load_cached_target` over ``caches``) or train one,
    and leave it in ``target_dir`` with its record (``record_file``, :func:`target_record`).

    ``data`` is ``demo``'s :class:`jaxunlearn.pipeline.PreparedData`; a trained target is the
    decoder of :func:`jaxunlearn.pipeline.model_config_for` trained on its ``"target"`` set
    (forget + retain) with ``demo.train``, initialised from ``demo.seed``.
    """
    from flax import nnx

    from jaxunlearn.models import Decoder, save_pretrained
    from jaxunlearn.outputs import write_json_atomic
    from jaxunlearn.pipeline import model_config_for, training_sets
    from jaxunlearn.train import train

    record = target_record(kind, demo)
    model, cached = load_cached_target(caches, record_file, record, data.tokenizer)
    history = None
    if model is None:
        log(f"training the target ({demo.train.steps} steps) ...")
        model = Decoder(model_config_for(demo, data.tokenizer, data.max_length), rngs=nnx.Rngs(demo.seed))
        model, history = train(model, training_sets(data)["target"][0], demo.train, progress=progress,
                               desc="train target")
        save_pretrained(model, target_dir, tokenizer=data.tokenizer)
    else:
        log(f"reusing the target in {cached}")
        shutil.copytree(cached, target_dir)
    write_json_atomic(target_dir / record_file, record)
    return ProvidedTarget(model, cached, history)
