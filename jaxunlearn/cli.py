"""The ``jaxunlearn`` command line.

    jaxunlearn demo    [--out results/demo] [--overwrite] [--steps N] [--forget-split forget10] [--methods ...]
                       [--seeds N] [--train-seeds] [--no-muse] [--quick]
    jaxunlearn demo    --data DIR [--size tiny|small|base] [--forget S --retain S --holdout S --general S ...]
    jaxunlearn init    --data DIR [--size tiny|small|base] --out BASE     (a fresh base model for your data)
    jaxunlearn train   --model DIR --data PATH --splits SPLIT [SPLIT ...] --out DIR [--steps N]
                       [--learning-rate LR] [--batch-size B] [--resume-dir DIR [--checkpoint-every N]]
    jaxunlearn unlearn --model DIR --data PATH --forget SPLIT --retain SPLIT --method NAME --out DIR
                       [--resume-dir DIR [--checkpoint-every N]]
    jaxunlearn bench   --model DIR --data PATH --forget SPLIT --retain SPLIT [--reference DIR] [--general ...]
                       [--holdout SPLIT] [--methods NAME ...] [--seed S] [--seeds N] [--muse DIR [--verbmem-tokens N]]
                       --out DIR
    jaxunlearn eval    --model DIR --data PATH --forget SPLIT [--retain ...] [--general ...] [--holdout SPLIT]
                       [--reference DIR] --out FILE.json
    jaxunlearn durability --out DIR [--methods ...] [--seeds 3] [--epsilon 0.047] [--quick]   (adapter regime)
    jaxunlearn stream  --out DIR [--requests 5] [--methods npo grad_diff saf npo+lwf] [--quick] [--relearn-steps N]

Outputs are safe: every output path is checked before any work (writable, not a file where a directory is
wanted, ``--resume-dir`` separate from ``--out``); a non-empty directory that jaxunlearn did not write is never
replaced, even with ``--overwrite``; results are written into a temporary sibling, then swapped into place.
``bench`` records a failing method in its row and goes on (exit status 1 when any failed).

``bench`` and ``demo`` run every method with ``--seeds N`` seeds (``--seed``, ``--seed`` + 1, ...) and print each
number as a mean with its 95% Student-t interval over seeds; ``results.json`` keeps every seed's row.
``demo --train-seeds`` also retrains the target and reference per seed.

Every command takes ``--mesh SPEC`` (e.g. ``fsdp=4,tp=2``; one size may be ``-1``, "the
rest"): the parameters are sharded on that device mesh by
:func:`jaxunlearn.sharding.partition_rules`, batches are split over its data-parallel axes,
and in a multi-process run (:func:`jaxunlearn.multihost.initialize`) only process 0 writes
results. Commands that load a checkpoint take ``--param-dtype bfloat16`` and ``--remat full|dots_saveable``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile

from jaxunlearn.cli_common import (add_mesh, add_model_data, add_resume, add_seeds, check_checkpoint_out,
                                   format_failures, is_main, load_model_and_data, mesh_of, seeds_of, shard_model,
                                   split_of, encode_splits)
from jaxunlearn.outputs import check_output_file
from jaxunlearn.own_data import add_init_parser, add_own_data_arguments, init_command
from jaxunlearn.method_configs_cli import adapter_from_args, add_adapter_argument
from jaxunlearn.plan_cli import add_plan_parser, run_plan
from jaxunlearn.quant import SCHEMES as QUANT_SCHEMES
from jaxunlearn.subcommands import EXTRA_COMMANDS
from jaxunlearn.tree import check_finite

__all__ = ["main", "build_parser"]


def _set_offline_env() -> None:
    # Nothing here ever needs the network: make the HF libraries fail fast instead of trying.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    from jaxunlearn.train import TrainConfig

    """The argument parser (one sub-command per job)."""
    p = argparse.ArgumentParser(prog="jaxunlearn", description="Machine unlearning for language models in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo",
        help="generate the synthetic benchmark, train target and reference models, print a results table",
        description="Runs the embedded default offline: synthetic fictitious-facts benchmark, a small Llama-style "
        "decoder trained from scratch as the target (all people) and as the reference (without the forget "
        "people), with MUSE passages and KnowMem QA about the same people; prints answer probability / token "
        "accuracy / fact accuracy per split and one results table (TOFU and MUSE columns), and writes "
        "<out>/results.json, <out>/data, <out>/muse and <out>/models/{target,reference}.",
    )
    d.add_argument("--out", default="results/demo", help="results directory (default: results/demo)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing results directory")
    d.add_argument("--steps", type=int, default=None, help="training steps per model")
    d.add_argument("--people", type=int, default=None, help="number of trained people")
    d.add_argument("--forget-split", default=None, choices=["forget01", "forget05", "forget10"])
    d.add_argument("--seed", type=int, default=None,
                   help="seeds the benchmark data, the models' initialisation and the first unlearning seed")
    add_seeds(d, 1, ", to keep the demo short: pass 3 to compare methods")  # jaxunlearn.demo.DEMO_SEEDS
    d.add_argument("--train-seeds", action="store_true",
                   help="also train the target and reference once per seed (initialisation and batch order; "
                        "each seed costs about one more training of the pair)")
    d.add_argument("--methods", nargs="*", default=None,
                   help="unlearning methods to benchmark (config names in --configs; default: all; none: skip)")
    d.add_argument("--configs", default=None, help="method configs directory (default: experiments/configs)")
    d.add_argument("--no-muse", action="store_true", help="QA rows only: no MUSE passages, KnowMem QA or columns")
    add_own_data_arguments(d)  # --data, --size, split names, --quick
    add_adapter_argument(d)
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_mesh(d)

    u = sub.add_parser(
        "unlearn",
        help="unlearn a forget split from a Hugging Face checkpoint and write the result as a checkpoint",
        description="Loads a Llama-family Hugging Face checkpoint directory and a dataset (a benchmark saved by "
        "`jaxunlearn demo` under <out>/data, or TOFU-format files: <split>.json / .jsonl / .parquet), runs one "
        "method (its hyperparameters from <configs>/<method>.json or --config) and writes the unlearned model "
        "with its tokenizer to --out in the same format.",
    )
    add_model_data(u)
    u.add_argument("--forget", required=True, help="forget split name (e.g. forget10)")
    u.add_argument("--retain", required=True, help="retain split name (e.g. retain90)")
    u.add_argument("--method", required=True, help="method config name (e.g. npo, npo_proj, perta_fisher)")
    u.add_argument("--config", default=None, help="a method config JSON file (overrides --method's)")
    u.add_argument("--configs", default=None, help="method configs directory (default: experiments/configs)")
    u.add_argument("--out", required=True, help="output checkpoint directory")
    u.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    u.add_argument("--seed", type=int, default=0)
    add_adapter_argument(u)
    add_resume(u, "gradient methods: keep the run state here (orbax) and resume from it when it holds a "
                   "checkpoint of the same run")
    add_mesh(u)

    t = sub.add_parser(
        "train",
        help="fine-tune a Hugging Face checkpoint on QA splits (e.g. the target on full, the reference on "
             "retain90) and write the result as a checkpoint",
        description="Fine-tune a model on the answer tokens of one or more QA splits (AdamW, warmup + cosine; "
                    "resumable with --resume-dir) and save it as a Hugging Face checkpoint.",
    )
    add_model_data(t)
    t.add_argument("--splits", nargs="+", required=True, help="split names to train on (rows concatenated)")
    t.add_argument("--out", required=True, help="output checkpoint directory")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    t.add_argument("--steps", type=int, default=TrainConfig.steps)
    t.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    t.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate,
                   help="peak AdamW learning rate (default %(default)s, for training a small model from scratch; "
                        "about 1e-5 fine-tunes a pretrained LLM)")
    t.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    t.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    t.add_argument("--grad-clip", type=float, default=TrainConfig.grad_clip)
    t.add_argument("--seed", type=int, default=0)
    add_resume(t, "keep the run state here (orbax) and resume from its latest step")
    add_mesh(t)

    e = sub.add_parser(
        "eval",
        help="TOFU-style evaluation of a checkpoint on forget/retain/general/holdout splits, written as JSON",
        description="Per-example and aggregate metrics: answer probability, truth ratio, ROUGE-L, extraction "
        "strength, MIA (LOSS, zlib, Min-k, Min-k++); with --reference (a model never trained on the forget set) "
        "also forget quality and privleak; with --quant the forget metrics after fake quantisation.",
    )
    add_model_data(e)
    e.add_argument("--forget", required=True, help="forget split (question/answer; its truth ratio and forget "
                   "quality need paraphrased_answer/perturbed_answer, else n/a)")
    e.add_argument("--retain", nargs="*", default=[], help="retain split(s) for model utility")
    e.add_argument("--general", nargs="*", default=[], help="further retain-side sets (option-normalised)")
    e.add_argument("--holdout", default=None, help="never-trained split for membership inference")
    e.add_argument("--reference", default=None, help="reference checkpoint directory (for forget quality)")
    e.add_argument("--quant", nargs="*", default=[], choices=list(QUANT_SCHEMES),
                   help="also report forget metrics after fake quantisation with these schemes")
    e.add_argument("--precisions", nargs="*", default=[], choices=["fp32", "bf16", "int8", "int4", "nf4", "fp4"],
                   help="also evaluate the model as deployed at these precisions (bf16 cast, then bitsandbytes' "
                        "quantiser): FA / RA (answers reproduced verbatim) per precision, Q-INT4; needs --retain")
    e.add_argument("--rouge-examples", type=int, default=None, help="generate only for the first N rows per split")
    e.add_argument("--out", required=True, help="output JSON file")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_mesh(e)

    add_init_parser(sub, add_mesh)
    add_plan_parser(sub)
    for add_parser, _ in EXTRA_COMMANDS.values():
        add_parser(sub)
    return p


def _train(args, mesh) -> int:
    from flax import nnx

    from jaxunlearn.models import save_pretrained
    from jaxunlearn.multihost import gather_to_host
    from jaxunlearn.pipeline import concat_encoded
    from jaxunlearn.train import TrainConfig, train

    check_checkpoint_out(args)
    flags = {"steps": "--steps", "batch_size": "--batch-size", "learning_rate": "--learning-rate",
             "warmup_steps": "--warmup-steps", "weight_decay": "--weight-decay", "grad_clip": "--grad-clip"}
    try:
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                          warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                          seed=args.seed, checkpoint_every=args.checkpoint_every)
    except (TypeError, ValueError) as e:
        field = str(e).split(" ", 1)[0].removeprefix("TrainConfig.")
        raise ValueError(f"{flags.get(field, field)}: {e}") from None
    model, tok, dd = load_model_and_data(args)
    enc = encode_splits(model, tok, dd, args.splits, args.separator)
    data = concat_encoded(*enc.values())
    if mesh is not None:
        shard_model(model, mesh)
    model, hist = train(model, data, cfg, checkpoint_dir=args.resume_dir, progress=not args.no_progress,
                        mesh=mesh)
    check_finite(nnx.state(model, nnx.Param), "the trained parameters (training diverged; nothing written)")
    nnx.update(model, gather_to_host(nnx.state(model, nnx.Param)))
    if is_main():
        save_pretrained(model, args.out, tokenizer=tok, overwrite=True)
        loss = f", final loss {hist[-1]['loss']:.4f}" if hist else ""
        print(f"trained on {'+'.join(args.splits)} ({len(data['input_ids'])} rows) for {cfg.steps} steps"
              + loss + f"; wrote {args.out}")
    return 0


def _unlearn(args, mesh) -> int:
    from flax import nnx

    from jaxunlearn.benchmark import load_method_configs
    from jaxunlearn.multihost import gather_to_host
    from jaxunlearn.method_configs import load_method_config, with_adapter
    from jaxunlearn.methods import UnlearnContext, run_method
    from jaxunlearn.models import DecoderFn, save_pretrained

    check_checkpoint_out(args)
    adapter = adapter_from_args(args)
    if args.config:
        cfg = with_adapter(load_method_config(args.config), adapter, f"--config {args.config}")
    else:
        cfg = load_method_configs([args.method], args.configs, adapter)[args.method]
    if args.resume_dir and cfg.kind not in ("gradient", "rmu"):
        raise ValueError(f"--resume-dir needs a step-wise method (kind 'gradient' or 'rmu'); {args.method!r} is kind "
                         f"{cfg.kind!r}")
    model, tok, dd = load_model_and_data(args)
    enc = encode_splits(model, tok, dd, (args.forget, args.retain), args.separator)
    if mesh is not None:
        shard_model(model, mesh)
    fn, params = DecoderFn.of(model)  # its Fisher importances take the fused path
    ctx = UnlearnContext(fn, params, enc[args.forget], enc[args.retain], seed=args.seed, mesh=mesh)
    new_params = run_method(ctx, cfg, checkpoint_dir=args.resume_dir, checkpoint_every=args.checkpoint_every)
    check_finite(new_params, f"the parameters method {args.method!r} returned (nothing written)")
    nnx.update(model, gather_to_host(new_params))
    if is_main():
        save_pretrained(model, args.out, tokenizer=tok, overwrite=True)
        print(f"unlearned {args.forget} ({len(enc[args.forget]['input_ids'])} rows) with {args.method}"
              + (f" on mesh {dict(mesh.shape)}" if mesh is not None else "") + f"; wrote {args.out}")
    return 0


def _eval(args, mesh) -> int:
    from jaxunlearn.eval.quant_recovery import quantization_recovery
    from jaxunlearn.eval.runner import encode_eval_splits, evaluate_model
    from jaxunlearn.models import from_pretrained
    from jaxunlearn.pipeline import write_json_atomic

    check_output_file(args.out, overwrite=args.overwrite, what="--out")
    if args.rouge_examples is not None and args.rouge_examples < 0:
        raise ValueError(f"--rouge-examples must be >= 0, got {args.rouge_examples}")
    if args.precisions and not args.retain:
        raise ValueError("--precisions needs --retain (RA, the retain answers reproduced, at each precision)")
    model, tok, dd = load_model_and_data(args)
    if mesh is not None:
        shard_model(model, mesh)
    roles = {args.forget: "forget", **{r: "retain" for r in args.retain}, **{g: "general" for g in args.general}}
    if args.holdout:
        roles[args.holdout] = "holdout"
    enc = encode_eval_splits(tok, {n: split_of(dd, n) for n in roles}, roles=roles, separator=args.separator)
    kw = dict(forget=args.forget, retain=args.retain or None, general=args.general or None, holdout=args.holdout,
              rouge_examples=args.rouge_examples)
    ref = None
    if args.reference:
        ref_model, _ = from_pretrained(args.reference, load_tokenizer=False)
        if mesh is not None:
            shard_model(ref_model, mesh)
        ref = evaluate_model(ref_model, tok, enc, **kw)
    res = evaluate_model(model, tok, enc, reference=ref, **kw)
    out = {"model": os.path.abspath(args.model), "data": os.path.abspath(args.data), "roles": roles,
           **res.to_dict()}
    if args.quant:
        out["quantization"] = quantization_recovery(model, tok, enc, forget=args.forget, holdout=args.holdout,
                                                    schemes=args.quant, reference=ref, baseline=res,
                                                    rouge_examples=0)
    if args.precisions:
        from jaxunlearn.eval.durability import evaluate_precisions
        out["deployment"] = evaluate_precisions(model, tok, enc, forget=args.forget, retain=args.retain,
                                                precisions=args.precisions, reference=ref)
    if not is_main():
        return 0
    write_json_atomic(args.out, out)
    for p, row in out.get("deployment", {}).get("precisions", {}).items():
        print(f"deployed at {p}: FA {row['fa']:.3f}, RA {row['ra']:.3f}")
    agg = res.aggregates
    print(f"forget probability {agg['forget']['probability']:.4f}; "
          + (f"forget quality {agg['forget_quality']:.3g}; " if "forget_quality" in agg else "")
          + (f"model utility {agg['model_utility']:.4f}; " if "model_utility" in agg else "")
          + f"wrote {args.out}")
    for metric, why in res.not_available.items():
        print(f"  n/a: {metric} {why}")
    return 0


def _demo(args, mesh) -> int:
    from jaxunlearn.demo import run_demo
    from jaxunlearn.own_data import demo_flags, run_own_demo_args
    from jaxunlearn.pipeline import DemoConfig

    seeds_of(args)
    cfg = DemoConfig()
    changes = demo_flags(args, cfg)  # checks --data against the synthetic flags; --quick
    if args.people is not None:
        changes["num_people"] = args.people
    if args.forget_split is not None:
        changes["forget_split"] = args.forget_split
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.steps is not None:
        changes["train"] = dataclasses.replace(cfg.train, steps=args.steps)
    if args.no_muse:
        changes["muse"] = False
    cfg = dataclasses.replace(cfg, **changes)
    # process 0 writes the results; the others run the same SPMD program and write into a scratch directory
    out, scratch = args.out, None
    if not is_main():
        out = scratch = tempfile.mkdtemp(prefix="jaxunlearn-demo-")
    try:
        run = run_demo if args.data is None else run_own_demo_args(args)
        results = run(out, cfg=cfg, overwrite=args.overwrite or scratch is not None,
                      progress=not args.no_progress, methods=args.methods, configs_dir=args.configs,
                      seeds=args.seeds, train_seeds=args.train_seeds, adapter=adapter_from_args(args))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    failed = results.get("benchmark", {}).get("failed", {})
    if failed:
        print(f"jaxunlearn demo: {len(failed)} method(s) failed: {format_failures(failed)}", file=sys.stderr)
        return 1
    return 0


def _mesh_context(mesh):
    """``jax.set_mesh(mesh)`` (a context manager), or a no-op context when ``mesh`` is None."""
    if mesh is None:
        return contextlib.nullcontext()
    import jax

    return jax.set_mesh(mesh)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxunlearn`` console script."""
    _set_offline_env()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "plan":  # its --mesh is the target's (virtual) mesh, not this host's devices
            return run_plan(args)
        mesh = mesh_of(args)
        # under jax.set_mesh, arrays the commands create land on the mesh, the demo's models are sharded
        # on it (pipeline.train_pair) and the unlearning methods split their batches over it
        with _mesh_context(mesh):
            commands = {"demo": _demo, "train": _train, "unlearn": _unlearn, "eval": _eval,
                        "init": lambda a, _: init_command(a, is_main()),
                        **{k: run for k, (_, run) in EXTRA_COMMANDS.items()}}
            return commands[args.command](args, mesh)
    except (OSError, ValueError, KeyError, TypeError, FloatingPointError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        notes = "".join(f"\n{n}" for n in getattr(e, "__notes__", ()))
        print(f"jaxunlearn {args.command}: error: {msg}{notes}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
