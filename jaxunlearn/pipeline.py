"""The embedded default experiment, step by step: benchmark -> tokenizer -> target/reference models.

Each step is a plain function so the demo, the benchmark and the tests compose
them; files are written atomically (temporary name, then rename).

- :func:`prepare_data`: generate the synthetic benchmark, train its tokenizer, encode splits.
- :func:`train_pair`: train the *target* (retain + forget + general) and the
  *reference* (retain + general: never saw the forget people) from scratch.
- :func:`evaluate_splits`: per-split answer probability / token / fact accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import datasets
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxunlearn.data import encode_split, generate_benchmark, train_tokenizer
from jaxunlearn.data.tokenizer import benchmark_texts
from jaxunlearn.eval.runner import evaluate_encoded
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig
from jaxunlearn.outputs import write_json_atomic  # noqa: F401 - re-exported (experiments use it)
from jaxunlearn.placement import resolve_mesh
from jaxunlearn.sharding import shard_params
from jaxunlearn.train import TrainConfig, train
from jaxunlearn.validate import check_choice, check_int

__all__ = [
    "DemoConfig",
    "PreparedData",
    "prepare_data",
    "model_config_for",
    "train_pair",
    "evaluate_splits",
    "write_json_atomic",
    "concat_encoded",
]


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the embedded default (measured: 2 layers, d 128 memorise 1,600 QA pairs in < 1,200 steps)."""

    seed: int = 0
    num_people: int = 200
    num_general: int = 200
    forget_split: str = "forget10"
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    train: TrainConfig = TrainConfig(steps=900, batch_size=64, learning_rate=3e-3, warmup_steps=100)

    def __post_init__(self):
        check_int("DemoConfig", "seed", self.seed, min=0)
        for name in ("num_people", "num_general", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads"):
            check_int("DemoConfig", name, getattr(self, name), min=1)
        check_choice("DemoConfig", "forget_split", self.forget_split, ("forget01", "forget05", "forget10"))
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"DemoConfig.train must be a TrainConfig, got {type(self.train).__name__}")


@dataclasses.dataclass
class PreparedData:
    """The benchmark (``datasets``), its tokenizer, and encoded arrays per split."""

    dataset: datasets.DatasetDict
    tokenizer: Any
    encoded: dict[str, dict[str, np.ndarray]]
    max_length: int
    forget_split: str
    retain_split: str


def _retain_of(forget_split: str) -> str:
    pct = int(forget_split.removeprefix("forget"))
    return f"retain{100 - pct:02d}"


def concat_encoded(*parts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate encoded splits (same keys, same padded length) along the rows."""
    keys = set(parts[0])
    for p in parts[1:]:
        keys &= set(p)
    return {k: np.concatenate([p[k] for p in parts]) for k in sorted(keys)}


def prepare_data(cfg: DemoConfig) -> PreparedData:
    """Generate the benchmark, train a tokenizer on all its text, and encode every split.

    All splits share one padded length (the longest row of any split, answer or
    paraphrase or perturbed answer), so every jitted function compiles once.
    """
    if not cfg.forget_split.startswith("forget"):
        raise ValueError(f"forget_split must be forget01/forget05/forget10, got {cfg.forget_split!r}")
    dd = generate_benchmark(num_people=cfg.num_people, num_general=cfg.num_general, seed=cfg.seed)
    if cfg.forget_split not in dd:
        raise ValueError(f"unknown forget split {cfg.forget_split!r}; have {list(dd)}")
    tok = train_tokenizer(benchmark_texts(dd), vocab_size=cfg.vocab_size)
    # first pass: find the longest row over all answer columns
    lengths = []
    for split in dd:
        for col in ("answer", "paraphrased_answer", "perturbed_answer"):
            enc = encode_split(tok, dd[split], max_length=None, answer_column=col)
            lengths.append(enc["input_ids"].shape[-1])
    max_len = max(lengths)
    encoded = {s: encode_split(tok, dd[s], max_length=max_len) for s in dd}
    return PreparedData(dd, tok, encoded, max_len, cfg.forget_split, _retain_of(cfg.forget_split))


def model_config_for(cfg: DemoConfig, tokenizer, max_length: int) -> ModelConfig:
    """The demo's Llama-style decoder for a tokenizer (vocabulary = tokenizer size)."""
    return ModelConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        max_position_embeddings=max(64, int(max_length) * 2),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def train_pair(cfg: DemoConfig, data: PreparedData, *, progress: bool = True,
               mesh: Mesh | None = None) -> dict[str, tuple[Decoder, list]]:
    """Train target (retain + forget + general) and reference (retain + general) from one init.

    Args:
      cfg: the demo's sizes and training hyperparameters.
      data: the prepared benchmark.
      progress: progress bars.
      mesh: shard both models' parameters on this mesh by
        :func:`jaxunlearn.sharding.partition_rules` before training (the optimizer state
        follows them). None: the mesh set by ``jax.set_mesh``, if any, else one device.

    Returns:
      ``{"target": (model, history), "reference": (model, history)}``.
    """
    mesh = resolve_mesh(mesh)
    mcfg = model_config_for(cfg, data.tokenizer, data.max_length)
    e = data.encoded
    sets = {
        "target": concat_encoded(e[data.retain_split], e[data.forget_split], e["general"]),
        "reference": concat_encoded(e[data.retain_split], e["general"]),
    }
    out = {}
    for name, train_data in sets.items():
        model = Decoder(mcfg, rngs=nnx.Rngs(cfg.seed))
        if mesh is not None:
            nnx.update(model, shard_params(nnx.state(model, nnx.Param), mesh))
        out[name] = train(model, train_data, cfg.train, progress=progress, desc=f"train {name}")
    return out


def evaluate_splits(model: Decoder, encoded: Mapping[str, Mapping[str, np.ndarray]], splits,
                    *, batch_size: int = 128) -> dict[str, dict[str, float]]:
    """Mean answer probability, token accuracy and fact-token accuracy per split."""
    fn, params = DecoderFn.of(model)
    out = {}
    for s in splits:
        stats = evaluate_encoded(fn, params, encoded[s], batch_size=batch_size)
        out[s] = {k: float(np.mean(v)) for k, v in stats.items()}
    return out
