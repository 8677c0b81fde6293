"""One process of the two-process test (tests/test_multihost.py); also imported for the reference.

Run as ``python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu``: it joins the
coordinator on ``127.0.0.1:PORT`` (CPU collectives: gloo, JAX's default), builds a global
``fsdp=4,tp=2`` mesh over the 8 devices of both processes, loads only its own rows of the
forget and retain batches (``process_local_batch``), computes the diagonal Fisher and one
NPO + projection unlearning step, gathers the results and lets process 0 write them.
"""

from __future__ import annotations

import sys

import numpy as np

B, T = 8, 8


def build():
    """The model's ``(apply_fn, params)``, the forget/retain batches, the per-example loss, the config."""
    import jax  # noqa: F401 - after jax.distributed.initialize in the worker
    from flax import nnx

    from jaxunlearn.models import Decoder, DecoderFn, ModelConfig
    from jaxunlearn.unlearn import UnlearnConfig
    from toy_lm import lm_batch  # tests/ is on sys.path: the script's directory, or pytest's pythonpath

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                      num_kv_heads=2)
    apply, params = DecoderFn.of(Decoder(cfg, rngs=nnx.Rngs(0)))

    def batch(seed):
        return lm_batch(B, seed, vocab=cfg.vocab_size, seq=T, prompt=4)

    ucfg = UnlearnConfig(method="npo", project=True, retain_k=2, optimizer="adamw", learning_rate=1e-2,
                         grad_clip=0.0, steps=1)
    return apply, params, batch(1), batch(2), apply.example_nll, ucfg


def run(forget, retain, mesh=None):
    """Fisher of the forget batch and one unlearning step; flat ``{name: numpy}`` results.

    With ``mesh``, params are sharded by the default rules and ``forget`` / ``retain`` are
    this process's rows, assembled into global batches by ``process_local_batch``.
    """
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    from jaxunlearn import multihost as mh
    from jaxunlearn import sharding as sh
    from jaxunlearn import tree as jt
    from jaxunlearn.fisher import fisher_diagonal
    from jaxunlearn.unlearn import UnlearnState

    apply, params, _, _, example_loss, ucfg = build()
    u = ucfg.build(apply)
    tx = u.tx
    if mesh is None:
        fb, rb = forget, retain
        state = UnlearnState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params), tx.init(params))
        ref = params
    else:
        ref = sh.shard_params(params, mesh)
        fb, rb = mh.process_local_batch(forget, mesh), mh.process_local_batch(retain, mesh)
        # a copy: the step donates its state, and shard_params of the same arrays may alias ref
        state = UnlearnState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, sh.shard_params(params, mesh)),
                             sh.init_opt_state(tx, ref, mesh))
    fisher = fisher_diagonal(example_loss, ref, [fb], method="vmap")
    new, metrics = u.step(state, fb, rb, ref)
    out = {"fisher": fisher, "params": new.params, "metrics": metrics}
    if mesh is not None:
        out = multihost_utils.process_allgather(out, tiled=True)  # full arrays on every process
    return {p: np.asarray(x) for p, x in jt.leaves_with_paths(out)}


def main(argv):
    process_id, num_processes, port, out_path = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    from jaxunlearn import multihost as mh
    from jaxunlearn import sharding as sh

    assert mh.initialize(f"127.0.0.1:{port}", num_processes, process_id, initialization_timeout=60,
                         heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)
    import jax

    assert jax.process_count() == num_processes and jax.device_count() == 4 * num_processes
    mesh = sh.make_mesh("fsdp=4,tp=2")
    _, _, forget, retain, _, _ = build()
    rows = slice(process_id * B // num_processes, (process_id + 1) * B // num_processes)
    local = lambda b: {k: v[rows] for k, v in b.items()}  # noqa: E731 - this process's own rows
    result = run(local(forget), local(retain), mesh)
    if mh.is_main_process():
        np.savez(out_path, **result)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv)
