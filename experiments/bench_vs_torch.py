"""jaxunlearn against PyTorch (transformers) on the same Hugging Face checkpoint, batch and threads.

One random ``LlamaForCausalLM`` (vocab 2048, hidden 256, 4 layers, 8 query / 4 key-value heads,
intermediate 688, untied: 3.9M parameters) is written with ``save_pretrained`` and read back by
:func:`jaxunlearn.models.from_pretrained`, so both frameworks hold the same float32 weights. On one
batch of ``B x T`` tokens (answer = the second half of each row, the loss mask of
:mod:`jaxunlearn.losses`; ``labels = -100`` elsewhere for transformers) it times, best of
``--repeats`` runs with the two frameworks interleaved run by run (a shared machine slows both
alike):

* ``grad``: the gradient of the batch loss (token-mean answer NLL, ``model(**batch).loss``):
  ``jax.jit(jax.grad)`` vs PyTorch eager ``loss.backward()``; and the gradient's fraction of the
  machine's matmul rate (XLA's FLOP count of the compiled gradient / time / the rate of a
  1024^3 float32 matmul measured in the same run);
* ``fisher``: the diagonal empirical Fisher ``F = (1/B) sum_n (d l_n / d theta)^2`` of the summed
  answer NLL ``l_n``: jaxunlearn's fused path (one forward/backward, ``method="auto"``) and its
  ``vmap`` path (``chunk_size`` 8) vs ``torch.func.vmap(torch.func.grad(...))`` over chunks of 8
  (``functional_call``; eager attention, as torch.func cannot batch transformers' default CPU
  SDPA kernel), the way PyTorch users compute per-example gradients. The two Fishers
  must agree (max relative difference over the leaves, reported; the script fails above 1e-3);
* ``npo_graddiff_step``: one NPO + GradDiff AdamW step as open-unlearning's ``NPO`` trainer
  computes it (forget loss ``-(2/beta) mean logsigmoid(-beta (log p - log p_ref))`` of summed
  answer log-likelihoods with the reference's under ``no_grad``, plus ``alpha`` x the retain
  batch's ``model(**retain).loss``; ``beta = 0.1``, ``alpha = gamma = 1``, gradient clipping at
  1.0, AdamW lr 1e-5): :class:`jaxunlearn.UnlearnConfig` ``(method="npo")``'s jitted step vs the
  PyTorch eager step (two forwards with grad, one reference forward, backward, clip, AdamW). The
  first step's forget and retain losses must agree (reported).

* ``dense_dots``: where the gradient's time goes. Each matmul of the gradient's dense layers
  (per layer q, k, v, o, gate, up, down and the LM head; forward ``x W``, input gradient
  ``dy W^T``, weight gradient ``x^T dy``, all at ``M = B T`` rows) timed alone in both frameworks
  (``jax.jit`` of the same ``jnp.dot`` vs ``torch`` ``@`` on the same threads): per shape GFLOP/s,
  and the sum over the gradient's matmuls, ``jax_s`` / ``torch_s``: the time the dense matmuls
  alone take at each library's own GEMM rate. Their ratio against the whole gradient's ratio says
  how much of the gap is the GEMM kernels themselves (XLA:CPU's dot emitter vs PyTorch's oneDNN /
  MKL), not the model around them. The attention's batched matmuls (about 4% of the FLOPs here)
  are left out.

PyTorch runs with ``torch.set_num_threads(os.cpu_count())``; XLA:CPU uses every core by default.
Compile time is excluded (reported separately for jaxunlearn); PyTorch is eager (no
``torch.compile``), as open-unlearning runs it.

Usage: ``python experiments/bench_vs_torch.py [--batch 32] [--seq 128] [--repeats 5]``
-> ``results/bench/vs_torch.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import jaxunlearn as ju
from jaxunlearn.models import DecoderFn, from_pretrained, hf_tensor_map
from jaxunlearn.pipeline import write_json_atomic

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import machine_info  # noqa: E402

CONFIG = dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
BETA, ALPHA, GAMMA, LR, CLIP, CHUNK = 0.1, 1.0, 1.0, 1e-5, 1.0, 8


def _batch(rng: np.random.Generator, B: int, T: int) -> dict[str, np.ndarray]:
    ids = rng.integers(3, CONFIG["vocab_size"], (B, T)).astype(np.int32)
    mask = np.zeros((B, T), np.float32)
    mask[:, T // 2:] = 1.0
    return {"input_ids": ids, "attention_mask": np.ones((B, T), np.int32), "loss_mask": mask}


def _torch_batch(b: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    ids = torch.tensor(b["input_ids"], dtype=torch.long)
    labels = ids.clone()
    labels[torch.tensor(b["loss_mask"]) == 0] = -100
    return {"input_ids": ids, "attention_mask": torch.tensor(b["attention_mask"], dtype=torch.long), "labels": labels}


def _best(fn, repeats: int) -> float:
    out = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def _interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Best time of each zero-argument function, the functions taking turns run by run."""
    for fn in fns.values():  # warm-up (and compile)
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


# ---------------------------------------------------------------- PyTorch side


def _torch_summed_nll(model, tb) -> torch.Tensor:
    """Per-example summed answer NLL, (B,), as open-unlearning's ``compute_batch_nll``."""
    logits = model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"]).logits
    shifted = tb["labels"][:, 1:]
    lp = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(-1, -2), shifted, ignore_index=-100,
                                           reduction="none")
    return lp.sum(-1)


def torch_fisher(model, tb) -> dict[str, torch.Tensor]:
    """``(1/B) sum_n (grad l_n)^2`` by ``torch.func.vmap(grad(functional_call))`` over chunks."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, ids, labels):  # no padding in the benchmark batch: no attention mask to vmap over
        out = torch.func.functional_call(model, p, (ids[None],))
        lp = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[1:], ignore_index=-100, reduction="sum")
        return lp

    per_ex = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))
    B = tb["input_ids"].shape[0]
    acc = {k: torch.zeros_like(v) for k, v in params.items()}
    for s in range(0, B, CHUNK):
        g = per_ex(params, tb["input_ids"][s:s + CHUNK], tb["labels"][s:s + CHUNK])
        for k in acc:
            acc[k] += (g[k] ** 2).sum(0)
    return {k: v / B for k, v in acc.items()}


def torch_npo_step(model, ref, opt, forget, retain) -> tuple[float, float]:
    """One open-unlearning NPO (+ GradDiff retain NLL) AdamW step; returns (forget, retain) losses."""
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        ref_nll = _torch_summed_nll(ref, forget)
    nll = _torch_summed_nll(model, forget)
    lose_log_ratio = -(nll - ref_nll)  # log p - log p_ref
    forget_loss = -2.0 / BETA * torch.nn.functional.logsigmoid(-BETA * lose_log_ratio).mean()
    retain_loss = model(**retain).loss
    loss = GAMMA * forget_loss + ALPHA * retain_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    return float(forget_loss.detach()), float(retain_loss.detach())


# ---------------------------------------------------------------- the run


def _matmul_rate() -> float:
    n = 1024
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(a))
    return 2 * n ** 3 / _best(lambda: jax.block_until_ready(mm(a)), 10)


def dense_dots(c: dict, M: int, repeats: int) -> dict:
    """The gradient's dense matmuls, each timed alone in JAX and PyTorch (see the module docstring)."""
    h, hd, kv, inter, V, L = (c["hidden_size"], c["hidden_size"], c["num_key_value_heads"] * c["hidden_size"]
                              // c["num_attention_heads"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"])
    dense = {"q": (h, hd, L), "k": (h, kv, L), "v": (h, kv, L), "o": (hd, h, L), "gate": (h, inter, L),
             "up": (h, inter, L), "down": (inter, h, L), "lm_head": (h, V, 1)}
    rng = np.random.default_rng(0)
    mm = jax.jit(jnp.dot)
    # operands per kind: forward x (M,K) W (K,N); input gradient dy (M,N) W^T; weight gradient x^T (K,M) dy
    forms = {"fwd": lambda K, N: ((M, K), (K, N), False), "dx": lambda K, N: ((M, N), (K, N), True),
             "dw": lambda K, N: ((M, K), (M, N), "left")}
    rows, total = [], {"jax": 0.0, "torch": 0.0}
    seen: dict = {}
    for name, (K, N, count) in dense.items():
        for kind, form in forms.items():
            sa, sb, tr = form(K, N)
            key = (kind, sa, sb)
            if key not in seen:
                a = rng.standard_normal(sa).astype(np.float32)
                b = rng.standard_normal(sb).astype(np.float32)
                ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
                if tr is True:
                    fns = {"jax": lambda ja=ja, jb=jb: jax.block_until_ready(mm(ja, jb.T)),
                           "torch": lambda ta=ta, tb=tb: ta @ tb.T}
                elif tr == "left":
                    fns = {"jax": lambda ja=ja, jb=jb: jax.block_until_ready(mm(ja.T, jb)),
                           "torch": lambda ta=ta, tb=tb: ta.T @ tb}
                else:
                    fns = {"jax": lambda ja=ja, jb=jb: jax.block_until_ready(mm(ja, jb)),
                           "torch": lambda ta=ta, tb=tb: ta @ tb}
                seen[key] = _interleaved(fns, repeats)
            t = seen[key]
            flops = 2.0 * M * K * N
            rows.append({"layer": name, "kind": kind, "m_k_n": [M, K, N], "count": count,
                         "jax_gflops": flops / t["jax"] / 1e9, "torch_gflops": flops / t["torch"] / 1e9})
            total["jax"] += count * t["jax"]
            total["torch"] += count * t["torch"]
    return {"jax_s": total["jax"], "torch_s": total["torch"], "torch_over_jax": total["torch"] / total["jax"],
            "shapes": rows}


def _rel_diff(ours, theirs) -> float:
    """max over leaves of ``max |a - b| / max |b|``."""
    worst = 0.0
    for a, b in zip(ours, theirs):
        worst = max(worst, float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30)))
    return worst


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="results/bench/vs_torch.json")
    args = p.parse_args(argv)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    B, T = args.batch, args.seq
    rng = np.random.default_rng(0)

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).float()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, _ = from_pretrained(d)
    fn, params = DecoderFn.of(model)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    forget, retain = _batch(rng, B, T), _batch(rng, B, T)
    tf, tr = _torch_batch(forget), _torch_batch(retain)
    jf = {k: jnp.asarray(v) for k, v in forget.items()}
    jr = {k: jnp.asarray(v) for k, v in retain.items()}
    results: dict = {"machine": machine_info(torch=torch.__version__, transformers=transformers.__version__,
                                             torch_threads=torch.get_num_threads()),
                     "model": {**CONFIG, "num_params": n_params}, "batch": B, "seq": T}

    # -- gradient of the batch loss
    def loss(p, b):
        return ju.batch_token_nll(ju.sequence_nll(fn(p, b["input_ids"], b["attention_mask"]), b["input_ids"],
                                                  b["loss_mask"]), b["loss_mask"][:, 1:].sum(-1))

    grad = jax.jit(jax.grad(loss))
    t0 = time.perf_counter()
    compiled = grad.lower(params, jf).compile()
    grad_compile = time.perf_counter() - t0
    flops = float(compiled.cost_analysis()["flops"])
    hf.train()

    def torch_grad():
        hf.zero_grad(set_to_none=True)
        hf(**tf).loss.backward()

    rate = _matmul_rate()
    t = _interleaved({"jax": lambda: jax.block_until_ready(grad(params, jf)), "torch": torch_grad}, args.repeats)
    results["grad"] = {"jax_s": t["jax"], "torch_s": t["torch"], "torch_over_jax": t["torch"] / t["jax"],
                       "flops": flops, "matmul_flops_per_s": rate, "fraction_of_matmul_rate": flops / t["jax"] / rate,
                       "jax_compile_s": grad_compile}

    # -- the gradient's dense matmuls alone, at each library's GEMM rate
    results["dense_dots"] = dense_dots(CONFIG, B * T, 2 * args.repeats)
    results["dense_dots"]["share_of_jax_grad"] = results["dense_dots"]["jax_s"] / results["grad"]["jax_s"]

    # -- diagonal Fisher
    # fisher_diagonal jits its per-batch step itself (cached across calls)
    def fused(p, b):
        return ju.fisher_diagonal(fn.example_nll, p, [b], method="auto", check_finite=False)

    def vmapped(p, b):
        return ju.fisher_diagonal(fn.example_nll, p, [b], method="vmap", chunk_size=CHUNK, check_finite=False)
    hf.eval()
    # torch.func has no batching rule for the CPU flash-attention kernel of transformers' default
    # "sdpa" attention (it falls back to a slow loop and warns): eager attention under vmap
    hf_eager = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG, attn_implementation="eager"))
    hf_eager.load_state_dict(hf.state_dict())
    hf_eager.float().eval()
    t = _interleaved({"fused": lambda: jax.block_until_ready(fused(params, jf)),
                      "vmap": lambda: jax.block_until_ready(vmapped(params, jf)),
                      "torch": lambda: torch_fisher(hf_eager, tf)}, max(2, args.repeats // 2))
    ours = fused(params, jf)
    theirs = torch_fisher(hf_eager, tf)
    pairs = []
    for name, (path, transpose) in hf_tensor_map(model.config).items():
        node = ours
        for key in path:
            node = node[key]
        b = theirs[name].numpy()
        pairs.append((np.asarray(node), b.T if transpose else b))
    vm = vmapped(params, jf)
    results["fisher"] = {"jax_fused_s": t["fused"], "jax_vmap_s": t["vmap"], "torch_func_s": t["torch"],
                         "torch_over_fused": t["torch"] / t["fused"], "torch_over_vmap": t["torch"] / t["vmap"],
                         "max_rel_diff_vs_torch": _rel_diff([a for a, _ in pairs], [b for _, b in pairs]),
                         "max_rel_diff_fused_vs_vmap": _rel_diff(jax.tree.leaves(ours), jax.tree.leaves(vm))}
    if results["fisher"]["max_rel_diff_vs_torch"] > 1e-3:
        raise SystemExit(f"the Fishers disagree: {results['fisher']}")

    # -- NPO + GradDiff AdamW step
    cfg = ju.UnlearnConfig(method="npo", alpha=ALPHA, gamma=GAMMA, beta=BETA, learning_rate=LR, grad_clip=CLIP,
                           weight_decay=0.01, optimizer="adamw")
    u = cfg.build(fn)
    ref_params = jax.tree.map(jnp.copy, params)
    state = u.init(params)
    ref_hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).float().eval()
    ref_hf.load_state_dict(hf.state_dict())
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=0.01)
    state, m0 = u.step(state, jf, jr, ref_params)  # the state is donated: keep the new one
    tf0, tr0 = torch_npo_step(hf, ref_hf, opt, tf, tr)
    holder = {"state": state}

    def jax_step():
        holder["state"], m = u.step(holder["state"], jf, jr, ref_params)
        jax.block_until_ready(m)

    t = _interleaved({"jax": jax_step, "torch": lambda: torch_npo_step(hf, ref_hf, opt, tf, tr)}, args.repeats)
    results["npo_graddiff_step"] = {
        "jax_s": t["jax"], "torch_s": t["torch"], "torch_over_jax": t["torch"] / t["jax"],
        "first_forget_loss": {"jax": float(m0["forget_loss"]), "torch": tf0},
        "first_retain_loss": {"jax": float(m0["retain_loss"]), "torch": tr0}}
    write_json_atomic(args.out, results)
    g, f, s = results["grad"], results["fisher"], results["npo_graddiff_step"]
    print(f"model {n_params / 1e6:.1f}M params, batch {B} x {T}, {threads} threads; matmul {rate / 1e9:.0f} GFLOP/s")
    print(f"gradient: jax {g['jax_s'] * 1e3:.0f} ms ({g['fraction_of_matmul_rate']:.2f} of the matmul rate), "
          f"torch {g['torch_s'] * 1e3:.0f} ms: torch/jax {g['torch_over_jax']:.2f}")
    dd = results["dense_dots"]
    print(f"dense matmuls of the gradient alone: jax {dd['jax_s'] * 1e3:.0f} ms ({dd['share_of_jax_grad']:.2f} of its "
          f"gradient), torch {dd['torch_s'] * 1e3:.0f} ms: torch/jax {dd['torch_over_jax']:.2f}")
    for r in dd["shapes"]:
        print(f"  {r['layer']:7} {r['kind']:3} M,K,N={r['m_k_n']} x{r['count']}: jax {r['jax_gflops']:.0f} GFLOP/s, "
              f"torch {r['torch_gflops']:.0f} GFLOP/s")
    print(f"Fisher: fused {f['jax_fused_s'] * 1e3:.0f} ms, vmap {f['jax_vmap_s'] * 1e3:.0f} ms, torch.func "
          f"{f['torch_func_s'] * 1e3:.0f} ms: torch/fused {f['torch_over_fused']:.2f}, torch/vmap "
          f"{f['torch_over_vmap']:.2f}; max rel diff vs torch {f['max_rel_diff_vs_torch']:.1e}")
    print(f"NPO+GradDiff AdamW step: jax {s['jax_s'] * 1e3:.0f} ms, torch {s['torch_s'] * 1e3:.0f} ms: torch/jax "
          f"{s['torch_over_jax']:.2f}; first losses forget {s['first_forget_loss']}, retain {s['first_retain_loss']}")
    return results


if __name__ == "__main__":
    main()
