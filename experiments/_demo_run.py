"""Shared set-up of the experiments that start from a finished ``make demo``: the trained target
and reference, the unlearning context, the encoded evaluation splits and the reference's evaluation."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace


def load_demo_run(demo_dir: str, *, rouge_examples: int) -> SimpleNamespace:
    """Everything an experiment needs from ``demo_dir`` (a ``jaxunlearn demo`` results directory).

    Returns a namespace with ``target``, ``reference`` (models), ``tok``, ``params`` (the
    target's), ``ctx`` (:class:`jaxunlearn.methods.UnlearnContext` on the forget / retain
    splits), ``enc`` (encoded evaluation splits), ``ev`` (the ``evaluate_model`` keywords),
    ``ref_res`` (the reference's evaluation) and the split names ``fs`` / ``rs``.
    """
    from jaxunlearn.data import encode_split, load_benchmark
    from jaxunlearn.eval.runner import encode_eval_splits, evaluate_model
    from jaxunlearn.methods import UnlearnContext
    from jaxunlearn.models import DecoderFn, from_pretrained

    results = os.path.join(demo_dir, "results.json")
    if not os.path.isfile(results):
        raise SystemExit(f"{results} not found: run `make demo` (or `jaxunlearn demo --out {demo_dir}`) first")
    with open(results) as f:
        res = json.load(f)
    fs = res["config"]["forget_split"]
    rs = f"retain{100 - int(fs.removeprefix('forget')):02d}"
    dd, tok = load_benchmark(os.path.join(demo_dir, "data"))
    target, _ = from_pretrained(os.path.join(demo_dir, "models", "target"))
    reference, _ = from_pretrained(os.path.join(demo_dir, "models", "reference"))
    fn, params = DecoderFn.of(target)
    max_len = res["max_length"]
    ctx = UnlearnContext(fn, params,
                         encode_split(tok, dd[fs], max_length=max_len), encode_split(tok, dd[rs], max_length=max_len))
    roles = {fs: "forget", rs: "retain", "general": "general", "holdout": "holdout"}
    enc = encode_eval_splits(tok, {s: dd[s] for s in roles}, roles=roles)
    ev = dict(forget=fs, retain=rs, general="general", holdout="holdout", rouge_examples=rouge_examples)
    ref_res = evaluate_model(reference, tok, enc, **ev)
    return SimpleNamespace(target=target, reference=reference, tok=tok, params=params, ctx=ctx, enc=enc, ev=ev,
                           ref_res=ref_res, fs=fs, rs=rs)
