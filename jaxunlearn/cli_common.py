"""What the ``jaxunlearn`` sub-commands share: common options, loading a checkpoint and its data, meshes.

Public so that a sub-command can live in its own module (:mod:`jaxunlearn.bench_cli`,
:mod:`jaxunlearn.durability_cli`, ...) and register in :mod:`jaxunlearn.subcommands`.
"""

from __future__ import annotations

import argparse
import os

from jaxunlearn.model_options_cli import add_model_options, apply_model_options, load_kwargs
from jaxunlearn.outputs import check_disjoint, check_output_dir

__all__ = ["add_seeds", "add_resume", "add_mesh", "mesh_of", "shard_model", "is_main", "add_model_data",
           "load_model_and_data", "split_of", "encode_splits", "check_checkpoint_out", "format_failures", "seeds_of"]


def add_seeds(p: argparse.ArgumentParser, default: int, why: str = "") -> None:
    """Add ``--seeds N`` (default ``default``; ``why`` is appended to its help) to ``p``."""
    p.add_argument("--seeds", type=int, default=default, metavar="N",
                   help=f"run each method with N seeds (--seed, --seed + 1, ...) and report means with 95%% "
                        f"t-intervals over them; the seeds change the batch order and importance subsets "
                        f"(default {default}{why}; 1: one run, no intervals)")


def add_resume(p: argparse.ArgumentParser, resume_help: str) -> None:
    """Add ``--resume-dir`` (help ``resume_help``) and ``--checkpoint-every`` to ``p``."""
    p.add_argument("--resume-dir", default=None, help=resume_help)
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="with --resume-dir: save the run state every N steps (default 0: only at the end)")


def add_mesh(p: argparse.ArgumentParser) -> None:
    """Add ``--mesh SPEC`` (:func:`jaxunlearn.sharding.make_mesh`) to ``p``."""
    p.add_argument("--mesh", default=None, metavar="SPEC",
                   help="device mesh, e.g. 'fsdp=4,tp=2' or 'fsdp=-1' (axes data, fsdp, tp; -1: the rest); "
                   "parameters sharded by the partition rules, batches over data/fsdp (default: one device)")


def mesh_of(args):
    """The mesh of ``--mesh`` (after joining a multi-process run), or None."""
    if not getattr(args, "mesh", None):
        return None
    from jaxunlearn.multihost import initialize
    from jaxunlearn.sharding import make_mesh

    initialize()
    return make_mesh(args.mesh)


def shard_model(model, mesh) -> None:
    """Place ``model``'s parameters on ``mesh`` by the partition rules (in place, ``nnx.update``)."""
    from flax import nnx

    from jaxunlearn import sharding as sh

    nnx.update(model, sh.shard_params(nnx.state(model, nnx.Param), mesh))


def is_main() -> bool:
    """Whether this process writes results (process 0 of a multi-process run, or the only one)."""
    from jaxunlearn.multihost import is_main_process

    return is_main_process()


def add_model_data(p: argparse.ArgumentParser) -> None:
    """Add ``--model``, ``--data``, ``--separator``, ``--no-progress``, ``--param-dtype`` and ``--remat`` to ``p``."""
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory (config.json, safetensors, "
                   "tokenizer)")
    p.add_argument("--data", required=True, help="saved benchmark directory or TOFU-format file/directory")
    p.add_argument("--separator", default=None,
                   help="text between question and answer (default: the tokenizer's sep token)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_model_options(p)  # --param-dtype, --remat


def load_model_and_data(args):
    """``(model, tokenizer, splits)`` of ``--model`` (with ``--param-dtype`` / ``--remat``) and ``--data`` (a saved
    benchmark or TOFU-format files); a tokenizer without a pad token gets its EOS as pad."""
    from jaxunlearn.data import load_benchmark, load_tofu
    from jaxunlearn.models import check_tokenizer, from_pretrained

    model, tok = from_pretrained(args.model, **load_kwargs(args))
    apply_model_options(model, args)
    if tok is None:
        raise FileNotFoundError(f"no tokenizer files in {args.model}")
    check_tokenizer(tok, model.config)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # Llama tokenizers ship without one; padding is masked out anyway
    try:
        dd, _ = load_benchmark(args.data)
    except FileNotFoundError:
        dd = load_tofu(args.data)
        if not hasattr(dd, "keys"):
            raise ValueError(f"--data {args.data} is a single split; pass the directory holding the splits") from None
    return model, tok, dd


def split_of(dd, name: str):
    """Split ``name`` of ``dd`` (KeyError naming the splits there are)."""
    if name not in dd:
        raise KeyError(f"no split {name!r} in the data (have {', '.join(sorted(dd))})")
    return dd[name]


def encode_splits(model, tok, dd, names, separator) -> dict:
    """``{name: encoded split}``, all padded to one length, refused if longer than the model's context."""
    from jaxunlearn.data import encode_split

    def enc(n, max_length):
        return encode_split(tok, split_of(dd, n), max_length=max_length, separator=separator, fact_column=None)

    longest = max(enc(n, None)["input_ids"].shape[-1] for n in names)
    if longest > model.config.max_position_embeddings:
        raise ValueError(f"the splits have rows of {longest} tokens, longer than the model's context "
                         f"({model.config.max_position_embeddings})")
    return {n: enc(n, longest) for n in names}


def check_checkpoint_out(args) -> None:
    """``--out`` (a model checkpoint) and ``--resume-dir``, checked before any work."""
    check_output_dir(args.out, overwrite=args.overwrite, what="--out", marker="config.json")
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    if args.checkpoint_every and not args.resume_dir:
        raise ValueError("--checkpoint-every needs --resume-dir (where to keep the checkpoints)")
    if args.resume_dir:
        if os.path.exists(args.resume_dir) and not os.path.isdir(args.resume_dir):
            raise NotADirectoryError(f"--resume-dir '{args.resume_dir}' is a file")
        check_disjoint(**{"--out": args.out, "--resume-dir": args.resume_dir, "--model": args.model})


def format_failures(failed: dict) -> str:
    """``"ga (seed 1), npo (seeds 0, 1)"`` from ``results["failed"]``."""
    return ", ".join(f"{m} (seed{'s' if len(by_seed) > 1 else ''} {', '.join(by_seed)})"
                     for m, by_seed in failed.items())


def seeds_of(args) -> list[int]:
    """``--seeds`` seeds from ``--seed`` (checked before any work)."""
    from jaxunlearn.benchmark import seed_list

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    return seed_list(args.seed or 0, args.seeds)
