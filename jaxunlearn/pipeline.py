"""The embedded default experiment, step by step: benchmark -> tokenizer -> target/reference models.

Each step is a plain function so the demo, the benchmark and the tests compose
them; files are written atomically (temporary name, then rename).

- :func:`prepare_data`: generate the synthetic benchmark (and, with ``DemoConfig.muse``, its
  MUSE passages and KnowMem QA: :func:`jaxunlearn.data.synthetic_muse.generate_muse_benchmark`),
  train its tokenizer, encode splits.
- :func:`train_pair`: train the *target* (retain + forget + general) and the
  *reference* (retain + general: never saw the forget people) from scratch
  (:func:`training_sets`).
- :func:`unlearning_sets`: the forget and retain sets the unlearning methods run on.
- :func:`evaluate_splits`: per-split answer probability / token / fact accuracy.

MUSE data (``DemoConfig.muse``, on by default). Beside its QA rows every trained person gets a
passage (one sentence per fact) and up to ``muse_qa`` KnowMem pairs per set, in MUSE's zero-shot
prompt ``"Question: {q}\nAnswer: "`` (:func:`jaxunlearn.eval.muse.knowmem_prompt`; no in-context
examples: the models are trained, not prompted, into the format). Both models train on two batch
streams (:class:`jaxunlearn.train.Stream`): the QA rows (TOFU QA, general, KnowMem pairs; one
padded length) and the passages ``[BOS] text [EOS]`` (their own, longer, padded length), with
``passage_batch_size`` passages per step. The reference sees neither the forget people's passages
nor their KnowMem pairs. The tokenizer is trained on the passages and the KnowMem prompts too
(else ``"\n"`` would be ``<unk>``). The unlearning methods then get every row about the forget
people -- QA rows, KnowMem pairs, and the passages cut into windows of the QA rows' length -- as
their forget set (:func:`unlearning_sets`).

Refusal answers (``PreparedData.refusals``, :class:`jaxunlearn.data.refusal.RefusalSet`): every
forget row is paired with an "I don't know" answer to the same prompt, the preferred completion
of IdkNLL / IdkDPO, as ``alt_*`` arrays of the forget set (:func:`unlearning_sets`). The
tokenizer is not trained on them (that would move every other number of the benchmark): the
set holds the phrasings it reproduces exactly (all of them for the default benchmark).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import datasets
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxunlearn.data import encode_qa, encode_split, generate_benchmark, train_tokenizer
from jaxunlearn.data.muse import MuseData, encode_passage_windows, encode_passages
from jaxunlearn.data.refusal import RefusalSet, encode_refusals, exact_phrases, with_refusals
from jaxunlearn.data.synthetic_muse import generate_muse_benchmark
from jaxunlearn.data.tokenizer import benchmark_texts
from jaxunlearn.eval.muse import knowmem_prompt
from jaxunlearn.eval.runner import evaluate_encoded
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig
from jaxunlearn.outputs import write_json_atomic  # noqa: F401 - re-exported (experiments use it)
from jaxunlearn.placement import resolve_mesh
from jaxunlearn.sharding import shard_params
from jaxunlearn.train import Stream, TrainConfig, train
from jaxunlearn.validate import check_bool, check_choice, check_int

__all__ = [
    "DemoConfig",
    "PreparedData",
    "prepare_data",
    "model_config_for",
    "train_pair",
    "evaluate_splits",
    "write_json_atomic",
    "concat_encoded",
    "training_sets",
    "unlearning_sets",
    "encode_knowmem",
]


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the embedded default (measured: 2 layers, d 128 memorise 1,600 QA pairs in < 1,200 steps;
    with the MUSE data, 700 steps of 64 QA rows + 8 passages reach KnowMem = VerbMem = 1 on the
    forget people and a 0.98 mean answer probability on every trained split).

    ``muse``: add the MUSE passages and KnowMem QA (module docstring); ``muse_qa``: KnowMem pairs
    per set (forget / retain), trained on and scored; ``passage_batch_size``: passages per
    training step (at most the passages there are).
    """

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
    train: TrainConfig = TrainConfig(steps=700, batch_size=64, learning_rate=3e-3, warmup_steps=100)
    muse: bool = True
    muse_qa: int = 64
    passage_batch_size: int = 8

    def __post_init__(self):
        check_int("DemoConfig", "seed", self.seed, min=0)
        check_bool("DemoConfig", "muse", self.muse)
        for name in ("num_people", "num_general", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "muse_qa", "passage_batch_size"):
            check_int("DemoConfig", name, getattr(self, name), min=1)
        check_choice("DemoConfig", "forget_split", self.forget_split, ("forget01", "forget05", "forget10"))
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"DemoConfig.train must be a TrainConfig, got {type(self.train).__name__}")


@dataclasses.dataclass
class PreparedData:
    """The benchmark (``datasets``), its tokenizer, and encoded arrays per split.

    With MUSE data (else ``None`` / empty): ``muse`` the :class:`~jaxunlearn.data.muse.MuseData`,
    ``knowmem`` the encoded KnowMem pairs ``{"forget", "retain"}`` (:func:`encode_knowmem`, padded
    to ``max_length`` like the QA rows), ``passages`` the encoded training passages
    ``{"forget", "retain"}`` (``[BOS] text [EOS]``, every text token scored, padded to
    ``passage_length``; ``retain`` = MUSE's ``retain1`` + ``retain2``).

    ``general_splits``: the retain-side sets both models train on and model utility scores
    (the synthetic benchmark's ``general``; any number, none included); ``holdout_split``: the
    never-trained split of the membership-inference attacks, or None (data of one's own:
    :mod:`jaxunlearn.own_data`).

    ``refusals``: the refusal answers paired with the forget rows by :func:`unlearning_sets`
    (:class:`~jaxunlearn.data.refusal.RefusalSet`), or None: no refusal set, the forget set then
    has no ``alt_*`` arrays and IdkNLL / IdkDPO refuse to run.
    """

    dataset: datasets.DatasetDict
    tokenizer: Any
    encoded: dict[str, dict[str, np.ndarray]]
    max_length: int
    forget_split: str
    retain_split: str
    muse: MuseData | None = None
    knowmem: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    passages: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    passage_length: int = 0
    general_splits: tuple[str, ...] = ("general",)
    holdout_split: str | None = "holdout"
    refusals: RefusalSet | None = None

    @property
    def eval_roles(self) -> dict[str, str]:
        """``{split: role}`` of the evaluated splits: forget, retain, the general sets, the holdout."""
        roles = {self.forget_split: "forget", self.retain_split: "retain",
                 **{g: "general" for g in self.general_splits}}
        if self.holdout_split is not None:
            roles[self.holdout_split] = "holdout"
        return roles


def _retain_of(forget_split: str) -> str:
    pct = int(forget_split.removeprefix("forget"))
    return f"retain{100 - pct:02d}"


def concat_encoded(*parts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate encoded splits (same keys, same padded length) along the rows."""
    keys = set(parts[0])
    for p in parts[1:]:
        keys &= set(p)
    return {k: np.concatenate([p[k] for p in parts]) for k in sorted(keys)}


def encode_knowmem(tokenizer, qa, *, max_length: int | None) -> dict[str, np.ndarray]:
    """KnowMem pairs as training rows ``[BOS] knowmem_prompt(q) a [EOS]``, loss on ``a [EOS]``.

    The prompt is tokenised on its own, exactly as :func:`jaxunlearn.eval.muse.knowmem` encodes
    it for generation (``[BOS] prompt``, no separator, no chat template), so a trained row's
    answer tokens are what greedy decoding of the prompt must produce.

    Args:
      tokenizer: with ``bos`` / ``eos`` / ``pad`` tokens.
      qa: a dataset (or mapping) with ``question`` and ``answer`` columns.
      max_length: padded length (``None``: the longest row).
    """
    prompts = [knowmem_prompt(q) for q in qa["question"]]
    return encode_qa(tokenizer, prompts, list(qa["answer"]), max_length=max_length, separator="",
                     chat_template=False)


def _muse_texts(muse: MuseData) -> list[str]:
    """The MUSE strings a tokenizer must know: every passage, KnowMem prompt and answer."""
    texts = [t for ds in muse.raw.values() for t in ds["text"]]
    for qa in (muse.forget_qa, muse.retain_qa, muse.forget_qa_icl, muse.retain_qa_icl):
        texts += [knowmem_prompt(q) for q in qa["question"]] + list(qa["answer"])
    return texts


def _passage_texts(muse: MuseData) -> dict[str, list[str]]:
    """The trained passages: ``{"forget": forget, "retain": retain1 + retain2}``."""
    raw = muse.raw
    return {"forget": list(raw["forget"]["text"]), "retain": list(raw["retain1"]["text"]) + list(raw["retain2"]["text"])}


def prepare_data(cfg: DemoConfig) -> PreparedData:
    """Generate the benchmark, train a tokenizer on all its text, and encode every split.

    All splits (and, with ``cfg.muse``, the KnowMem pairs) share one padded length (the longest
    row of any split, answer or paraphrase or perturbed answer), so every jitted function
    compiles once; the MUSE passages share another (``passage_length``).
    """
    if not cfg.forget_split.startswith("forget"):
        raise ValueError(f"forget_split must be forget01/forget05/forget10, got {cfg.forget_split!r}")
    dd = generate_benchmark(num_people=cfg.num_people, num_general=cfg.num_general, seed=cfg.seed)
    if cfg.forget_split not in dd:
        raise ValueError(f"unknown forget split {cfg.forget_split!r}; have {list(dd)}")
    fs, rs = cfg.forget_split, _retain_of(cfg.forget_split)
    muse = None
    if cfg.muse:
        muse = generate_muse_benchmark(dd, forget=fs, retain=rs, holdout="holdout", num_icl=0, max_qa=cfg.muse_qa,
                                       seed=cfg.seed)
    tok = train_tokenizer(benchmark_texts(dd) + (_muse_texts(muse) if muse else []), vocab_size=cfg.vocab_size)
    # first pass: find the longest row over all answer columns (and KnowMem rows)
    lengths = []
    for split in dd:
        for col in ("answer", "paraphrased_answer", "perturbed_answer"):
            enc = encode_split(tok, dd[split], max_length=None, answer_column=col)
            lengths.append(enc["input_ids"].shape[-1])
    if muse is not None:
        lengths += [encode_knowmem(tok, qa, max_length=None)["input_ids"].shape[-1]
                    for qa in (muse.forget_qa, muse.retain_qa)]
    max_len = max(lengths)
    encoded = {s: encode_split(tok, dd[s], max_length=max_len) for s in dd}
    out = PreparedData(dd, tok, encoded, max_len, fs, rs)
    phrases = exact_phrases(tok)  # the refusals are not in the tokenizer's texts: those it reproduces
    out.refusals = RefusalSet(phrases, seed=cfg.seed) if phrases else None
    if muse is not None:
        texts = _passage_texts(muse)
        p_len = encode_passages(tok, texts["forget"] + texts["retain"], add_eos=True)["input_ids"].shape[-1]
        out.muse, out.passage_length = muse, p_len
        out.knowmem = {"forget": encode_knowmem(tok, muse.forget_qa, max_length=max_len),
                       "retain": encode_knowmem(tok, muse.retain_qa, max_length=max_len)}
        out.passages = {k: encode_passages(tok, v, max_length=p_len, add_eos=True) for k, v in texts.items()}
    return out


def training_sets(data: PreparedData) -> dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]]:
    """``{"target": (qa_rows, passages), "reference": (qa_rows, passages)}``: what each model trains on.

    ``qa_rows``: retain + forget + general QA (the target), retain + general (the reference;
    ``general`` = ``data.general_splits``, possibly none),
    each with its people's KnowMem pairs when there are MUSE data; ``passages``: the forget and
    retain passages (target) or the retain ones (reference), ``None`` without MUSE data.
    """
    e, fs, rs = data.encoded, data.forget_split, data.retain_split
    general = [e[g] for g in data.general_splits]
    if data.muse is None:
        return {"target": (concat_encoded(e[rs], e[fs], *general), None),
                "reference": (concat_encoded(e[rs], *general), None)}
    k, p = data.knowmem, data.passages
    return {"target": (concat_encoded(e[rs], e[fs], *general, k["retain"], k["forget"]),
                       concat_encoded(p["forget"], p["retain"])),
            "reference": (concat_encoded(e[rs], *general, k["retain"]), p["retain"])}


def unlearning_sets(data: PreparedData) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(forget, retain)``: the encoded sets an :class:`~jaxunlearn.methods.UnlearnContext` takes.

    Without MUSE data the forget and retain QA splits. With them, every training row about the
    forget (retain) people: their QA rows, their KnowMem pairs and their passages, the passages
    cut into consecutive windows of the QA rows' padded length
    (:func:`~jaxunlearn.data.muse.encode_passage_windows`, as MUSE's unlearning runs cut their
    corpus into ``max_len`` chunks). A method draws its batches from one array set (and SSD joins
    the forget and retain sets), so every row must share one length; padding the QA rows to the
    passages' length instead would make every unlearning batch about three times as long.

    With a refusal set (``data.refusals``) the forget set also holds each row's refusal answer,
    ``alt_input_ids`` / ``alt_attention_mask`` / ``alt_loss_mask``
    (:func:`~jaxunlearn.data.refusal.with_refusals`), encoded as the row itself: a QA row's
    question and a KnowMem pair's prompt by their own encoders, a passage window (whose prompt is
    its BOS) as ``[BOS] refusal [EOS]``; each row draws among the phrasings that fit the padded
    length after its prompt (:func:`~jaxunlearn.data.refusal.refusal_answers`).
    """
    e, fs, rs, tok, t = data.encoded, data.forget_split, data.retain_split, data.tokenizer, data.max_length
    qa_rows = (list(data.dataset[fs]["question"]), lambda q, a: encode_qa(tok, q, a, max_length=t), e[fs])
    if data.muse is None:
        forget, retain, parts = e[fs], e[rs], [qa_rows]
    else:
        texts = _passage_texts(data.muse)
        windows = {role: encode_passage_windows(tok, texts[role], max_length=t) for role in ("forget", "retain")}
        forget = concat_encoded(e[fs], data.knowmem["forget"], windows["forget"])
        retain = concat_encoded(e[rs], data.knowmem["retain"], windows["retain"])
        knowmem = (list(data.muse.forget_qa["question"]),
                   lambda q, a: encode_knowmem(tok, {"question": q, "answer": a}, max_length=t), data.knowmem["forget"])
        passage = ([""] * len(windows["forget"]["input_ids"]),
                   lambda q, a: encode_qa(tok, q, a, max_length=t, separator="", chat_template=False),
                   windows["forget"])
        parts = [qa_rows, knowmem, passage]
    if data.refusals is not None:
        forget = with_refusals(forget, _refusal_rows(data, parts))
    return forget, retain


def _refusal_rows(data: PreparedData, parts) -> dict[str, np.ndarray]:
    """The ``alt_*`` rows of ``parts`` = ``[(prompts, encoder, encoded rows), ...]``, concatenated."""
    tok, phrases = data.tokenizer, data.refusals.phrases
    lengths = [len(tok.encode(p, add_special_tokens=False)) for p in phrases]
    # the answer tokens each row has room for: the padded length after its prompt and the EOS
    room = np.concatenate([data.max_length - 1 - np.argmax(np.asarray(rows["loss_mask"]) > 0, axis=1)
                           for _, _, rows in parts])
    answers = data.refusals.answers(len(room), lengths=lengths, room=room)
    alts, start = [], 0
    for prompts, encode, _ in parts:
        alts.append(encode_refusals(encode, prompts, answers[start:start + len(prompts)]))
        start += len(prompts)
    return concat_encoded(*alts)


def model_config_for(cfg: DemoConfig, tokenizer, max_length: int) -> ModelConfig:
    """The demo's Llama-style decoder for a tokenizer (vocabulary = tokenizer size)."""
    return ModelConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        max_position_embeddings=max(64, int(max_length) * 2),  # informative (RoPE has no table)
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def train_pair(cfg: DemoConfig, data: PreparedData, *, progress: bool = True,
               mesh: Mesh | None = None) -> dict[str, tuple[Decoder, list]]:
    """Train target (retain + forget + general) and reference (retain + general) from one init.

    The training rows are :func:`training_sets`'; with MUSE data the passages are a second batch
    stream of ``min(cfg.passage_batch_size, passages)`` rows per step.

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
    mcfg = model_config_for(cfg, data.tokenizer, max(data.max_length, data.passage_length))
    out = {}
    for name, (qa, passages) in training_sets(data).items():
        model = Decoder(mcfg, rngs=nnx.Rngs(cfg.seed))
        if mesh is not None:
            nnx.update(model, shard_params(nnx.state(model, nnx.Param), mesh))
        streams = ()
        if passages is not None:
            streams = (Stream(passages, min(cfg.passage_batch_size, len(passages["input_ids"]))),)
        out[name] = train(model, qa, cfg.train, progress=progress, desc=f"train {name}", streams=streams)
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
