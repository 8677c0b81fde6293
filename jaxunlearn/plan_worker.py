"""The compile half of :func:`jaxunlearn.plan.plan`, run as ``python -m jaxunlearn.plan_worker SPEC OUT``.

It runs in its own process because its JAX must start differently from the caller's: for a
TPU target with libtpu on ``PYTHONPATH`` (``jax.experimental.topologies.get_topology_desc``
then gives the devices of an unattached slice, compiled by the real XLA:TPU compiler), for
``cpu:N`` with ``N`` forced host devices. ``SPEC`` is the JSON :func:`jaxunlearn.plan.plan`
writes; ``OUT`` receives ``{"num_params", "passes": {name: PassPlan fields}}``.

Everything is abstract: the model comes from ``nnx.eval_shape``, every argument is a
``jax.ShapeDtypeStruct`` carrying its ``NamedSharding``; :func:`compile_passes` also runs
in-process on the current devices (the tests compare its numbers against real allocations).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxunlearn import fisher as fi
from jaxunlearn import reduction as rd
from jaxunlearn import sharding as sh
from jaxunlearn.eval.metrics import answer_stats
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig
from jaxunlearn.plan import parse_collectives
from jaxunlearn.unlearn import UnlearnConfig
from jaxunlearn.unlearn_step import forget_batch_keys

__all__ = ["abstract_model", "abstract_batch", "build_passes", "compile_passes", "main"]


def abstract_model(cfg: ModelConfig) -> tuple[DecoderFn, Any]:
    """``(fn, params)`` of a Decoder with ``ShapeDtypeStruct`` parameters (nothing allocated)."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return DecoderFn(graphdef), params


def abstract_batch(batch: int, seq: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch convention of :mod:`jaxunlearn.losses` as abstract arrays ``(batch, seq)``."""
    return {"input_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
            "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}


def _placed(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def build_passes(cfg: ModelConfig, mesh: jax.sharding.Mesh, *, batch: int, seq: int, method: str, project: bool,
                 retain_k: int, passes: Sequence[str]) -> dict[str, tuple[Any, tuple]]:
    """``{name: (jitted fn with in/out shardings, placed abstract args)}`` of the requested passes."""
    fn, params = abstract_model(cfg)
    p_sh = sh.param_shardings(params, mesh)
    b_sh = sh.batch_sharding(mesh)
    rep = NamedSharding(mesh, P())
    ids = abstract_batch(batch, seq)
    ids_sh = jax.tree.map(lambda _: b_sh, ids)
    out: dict[str, tuple[Any, tuple]] = {}
    if "unlearn" in passes:
        u = UnlearnConfig(method=method, project=project, retain_k=retain_k if project else 1).build(
            fn, jit=False, mesh=mesh, param_specs=jax.tree.map(lambda s: s.spec, p_sh))  # as run_method does
        state = jax.eval_shape(u.init, params)
        s_sh = sh.shardings_like_params(state, params, mesh)
        # the forget batch carries what the method's loss reads (IdkNLL / IdkDPO: the refusal answers too)
        forget = {k: ids[k.removeprefix("alt_")] for k in forget_batch_keys(method)}
        f_sh = jax.tree.map(lambda _: b_sh, forget)
        step = jax.jit(lambda s, f, r, ref: u.step(s, f, r, ref), donate_argnums=0,
                       in_shardings=(s_sh, f_sh, ids_sh, p_sh), out_shardings=(s_sh, rep))
        out["unlearn"] = (step, (_placed(state, s_sh), _placed(forget, f_sh), _placed(ids, ids_sh),
                                 _placed(params, p_sh)))
    if "fisher" in passes:
        specs = tuple(s.spec for s in jax.tree.leaves(p_sh))
        local = fi.fisher_local_sums(fn.example_nll)
        acc = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
        total = jax.ShapeDtypeStruct((), jnp.float32)
        weight = jax.ShapeDtypeStruct((batch,), jnp.float32)
        accumulate = functools.partial(rd.accumulate, local_sums=local, mesh=mesh, specs=specs)
        step = jax.jit(lambda a, t, p, ex, w: accumulate(a, t, p, ex, w, None), donate_argnums=(0, 1),
                       in_shardings=(p_sh, rep, p_sh, ids_sh, b_sh), out_shardings=(p_sh, rep))
        out["fisher"] = (step, (_placed(acc, p_sh), _placed(total, rep), _placed(params, p_sh),
                                _placed(ids, ids_sh), _placed(weight, b_sh)))
    if "eval" in passes:
        step = jax.jit(lambda p, b: answer_stats(fn(p, b["input_ids"], b["attention_mask"]), b),
                       in_shardings=(p_sh, ids_sh), out_shardings=b_sh)
        out["eval"] = (step, (_placed(params, p_sh), _placed(ids, ids_sh)))
    return out


def _cost(compiled, lowered) -> dict[str, float]:
    """FLOPs and bytes accessed of the compiled program; where the backend gives none (a GPU
    compiled with no device attached), XLA's estimate for the lowered, unoptimised program."""
    cost = compiled.cost_analysis()
    if cost is None:
        cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def compile_passes(cfg: ModelConfig, mesh: jax.sharding.Mesh, *, batch: int, seq: int, method: str = "npo",
                   project: bool = True, retain_k: int = 4,
                   passes: Sequence[str] = ("unlearn", "fisher", "eval")) -> dict[str, dict[str, Any]]:
    """Lower and compile each pass on ``mesh``; ``{name: PassPlan fields but the roofline}``, or
    ``{"error", "compile_seconds"}`` for a pass the compiler refuses."""
    result = {}
    for name, (step, args) in build_passes(cfg, mesh, batch=batch, seq=seq, method=method, project=project,
                                           retain_k=retain_k, passes=passes).items():
        start = time.perf_counter()
        try:
            lowered = step.lower(*args)
            compiled = lowered.compile()
        except Exception as e:  # the compiler's refusal is a result of the plan, reported per pass
            result[name] = {"error": f"{type(e).__name__}: {e}"[:1500],
                            "compile_seconds": round(time.perf_counter() - start, 2)}
            continue
        seconds = time.perf_counter() - start
        mem = compiled.memory_analysis()
        arg, out_b = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
        alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
        result[name] = {"argument_bytes": arg, "output_bytes": out_b, "alias_bytes": alias, "temp_bytes": temp,
                        "peak_bytes": arg + out_b - alias + temp, **_cost(compiled, lowered),
                        "collectives": parse_collectives(compiled.as_text(), mesh.size),
                        "compile_seconds": round(seconds, 2)}
    return result


def _devices(spec: Mapping[str, Any]) -> list:
    if spec["platform"] == "tpu":
        from jax.experimental import topologies

        name = f"{spec['chip']}:{spec['topology']}"
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    if spec["platform"] == "cuda":
        from jax.experimental import topologies

        from jaxunlearn.plan_targets import gpu_target_config

        return list(topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(spec["chip"]),
                                                 topology=spec["topology"]).devices)
    devices = jax.devices()
    if len(devices) != spec["num_devices"]:
        raise RuntimeError(f"expected {spec['num_devices']} CPU devices, JAX has {len(devices)} (XLA_FLAGS="
                           "--xla_force_host_platform_device_count must be set before JAX starts)")
    return devices


def main(spec_file: str, out_file: str) -> None:
    """Read the spec, compile its passes on the target's devices, write the JSON result."""
    with open(spec_file, encoding="utf-8") as f:
        spec = json.load(f)
    cfg = ModelConfig(**spec["config"])
    mesh = sh.make_mesh(spec["mesh"], devices=_devices(spec))
    _, params = abstract_model(cfg)
    passes = compile_passes(cfg, mesh, batch=spec["batch"], seq=spec["seq"], method=spec["method"],
                            project=spec["project"], retain_k=spec["retain_k"], passes=spec["passes"])
    num_params = sum(int(x.size) for x in jax.tree.leaves(params))
    with open(out_file, "w", encoding="utf-8") as f:
        json.dump({"num_params": num_params, "passes": passes}, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
