"""The capacity planner's presets, HLO parser and refusals (nothing is compiled here).

- Presets reproduce the public parameter counts of the models they name; a config.json file
  gives the same config as its preset.
- :func:`jaxunlearn.plan.parse_collectives` reads a hand-written HLO snippet (explicit, iota and
  mesh replica groups; operand shapes printed or not; ``-start``/``-done`` pairs; TPU tiled layouts).
- Bad inputs are named before any subprocess starts.

The compiled plans, against real allocations and on XLA:TPU, are in ``test_plan_compile.py``.
"""

from __future__ import annotations

import json
import math

import pytest

from jaxunlearn import plan as pl
from jaxunlearn.models import dense_shapes


# ---------------------------------------------------------------- presets

# total parameters of the Hugging Face checkpoints (model cards / safetensors metadata)
PUBLIC_COUNTS = {"llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496,
                 "qwen2-7b": 7_615_616_512}


@pytest.mark.parametrize("name", sorted(pl.PRESETS))
def test_presets_have_the_public_parameter_counts(name):
    cfg = pl.model_config(name)
    # the decoder's dense kernels (lm_head included), the embedding, two norms per layer and the
    # final one, and Qwen2's q/k/v biases
    dense = sum(i * o for i, o in dense_shapes(cfg).values())
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    biases = cfg.num_layers * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim if cfg.qkv_bias else 0
    assert dense + cfg.vocab_size * cfg.hidden_size + norms + biases == PUBLIC_COUNTS[name]
    assert cfg.param_dtype == cfg.dtype == "bfloat16"


def test_a_config_json_file_gives_the_preset(tmp_path):
    hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
          "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
          "vocab_size": 32000, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
          "tie_word_embeddings": False, "hidden_act": "silu"}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    from_file = pl.model_config(tmp_path / "config.json", "float32")
    preset = pl.model_config("llama-2-7b", "float32")
    assert from_file == preset


# ---------------------------------------------------------------- HLO collectives

HLO = """
ENTRY %main {
  %p = bf16[16,128]{1,0:T(8,128)(2,1)} parameter(0)
  %ag = bf16[64,128]{1,0:T(8,128)(2,1)} all-gather(bf16[16,128]{1,0:T(8,128)(2,1)} %p), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %ar = f32[1024]{0} all-reduce(%x), channel_id=2, replica_groups=[2,4]<=[8], to_apply=%add
  %rs = f32[256]{0} reduce-scatter(%y), channel_id=3, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={0}
  %ags = (bf16[16,128]{1,0}, bf16[64,128]{1,0}) all-gather-start(%p), replica_groups={{0,1,2,3}}, dimensions={0}
  %agd = bf16[64,128]{1,0} all-gather-done(%ags)
  %cp = f32[100]{0} collective-permute(%z), source_target_pairs={{0,1},{1,0}}
  %a2a = f32[8,16]{1,0} all-to-all(%w), replica_groups={}, dimensions={0}
  %fusion = f32[8]{0} fusion(%all-gather), kind=kLoop
}
"""


def test_parse_collectives_reads_operands_groups_and_async_pairs():
    c = pl.parse_collectives(HLO, 8)
    assert c["all-gather"] == {"count": 2, "operand_bytes": 2 * 4096, "wire_bytes": 2 * 4096 * 3}
    assert c["all-reduce"] == {"count": 1, "operand_bytes": 4096, "wire_bytes": 2 * 4096 * 3 // 4}
    assert c["reduce-scatter"] == {"count": 1, "operand_bytes": 4096, "wire_bytes": 4096 * 3 // 4}  # n = 4
    assert c["collective-permute"] == {"count": 1, "operand_bytes": 400, "wire_bytes": 400}
    assert c["all-to-all"] == {"count": 1, "operand_bytes": 512, "wire_bytes": 512 * 7 // 8}  # all 8 devices


# ---------------------------------------------------------------- bad inputs, before any work


@pytest.fixture
def no_subprocess(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a subprocess was started for a bad input")

    monkeypatch.setattr(pl.subprocess, "run", refuse)


@pytest.mark.parametrize("kwargs, match", [
    (dict(model="llama-9b"), "unknown model preset 'llama-9b'"),
    (dict(target="v5e:8x8", mesh="fsdp=8,tp=4"), "32 devices in all .* but there are 64"),
    (dict(target="b200:8"), "unknown target 'b200:8'"),
    (dict(target="cpu:zero"), "positive integer"),
    (dict(target="v5p:8x8"), "3 dimensions"),
    (dict(target="cpu:64", mesh="fsdp=64", batch=32), "batch 32 is not divisible"),
    (dict(method="dpo"), "unknown method 'dpo'"),
    (dict(passes=("train",)), "unknown passes"),
    (dict(kernels="triton"), "kernels must be"),
    (dict(timeout=0), "timeout must be a number of seconds > 0"),
])
def test_bad_inputs_are_named_before_any_compile(no_subprocess, kwargs, match):
    kwargs = {"model": "llama-2-7b", "target": "cpu:64", **kwargs}
    with pytest.raises(ValueError, match=match):
        pl.plan(kwargs.pop("model"), **kwargs)


def test_a_missing_config_file_and_libtpu_are_named(no_subprocess, tmp_path):
    with pytest.raises(FileNotFoundError, match="model config not found"):
        pl.plan(str(tmp_path / "nope" / "config.json"), target="cpu:64")
    with pytest.raises(FileNotFoundError, match=r"pip install --target .*libtpu"):
        pl.plan("llama-2-7b", target="v5e:8x8", libtpu=tmp_path)


def test_idk_methods_plan_with_the_refusal_arrays_in_the_forget_batch():
    """IdkNLL / IdkDPO read the refusal answers: the planned unlearning step's forget batch carries them
    (the same shapes and shardings as the question/answer arrays), and the step traces with them."""
    import jax

    from jaxunlearn.models import ModelConfig
    from jaxunlearn.plan_worker import build_passes
    from jaxunlearn.sharding import make_mesh

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    mesh = make_mesh(f"fsdp={len(jax.devices())}")
    b = len(jax.devices())
    for method, alt in (("idk_dpo", True), ("npo", False)):
        step, (state, forget, retain, ref) = build_passes(cfg, mesh, batch=b, seq=8, method=method, project=False,
                                                          retain_k=1, passes=("unlearn",))["unlearn"]
        assert ("alt_input_ids" in forget) is alt and set(retain) == {"input_ids", "attention_mask", "loss_mask"}
        if alt:
            assert forget["alt_loss_mask"].shape == forget["loss_mask"].shape == (b, 8)
        step.lower(state, forget, retain, ref)  # traces: every key the loss reads is there


# ---------------------------------------------------------------- smallest_slice


def _fake_plan(needed_chips, compiled):
    """A stand-in for :func:`plan` that fits when the target has at least ``needed_chips`` chips."""

    def fake(model, *, target, mesh, batch, passes, **kwargs):
        n = pl.parse_target(target).num_devices
        compiled.append((target, dict(mesh)))
        peak = 0 if n >= needed_chips else 10 * pl.GiB**2
        passes = {p: pl.PassPlan(name=p, peak_bytes=peak) for p in passes}
        return pl.PlanResult(model=model, num_params=0, target=target, platform="tpu", mesh=mesh, batch=batch,
                             seq=512, method="npo", retain_k=0, param_dtype="bfloat16", kernels="auto",
                             passes=passes, note="")

    return fake


# a 10-layer slice of Llama-3-70B: 10.7B parameters, enough that its arguments overflow a 4-chip v5e slice
BIG = pl.model_config("llama-3-70b").replace(num_layers=10)


def test_smallest_slice_bisects_to_the_first_fitting_slice(monkeypatch):
    """Against a linear scan of the same list: the returned slice is the smallest that fits (None when none
    does), slices the arguments alone overflow are never compiled, and bisection compiles at most
    ceil(log2(n + 1)) of the n candidates."""
    weights = 2 * (sum(i * o for i, o in dense_shapes(BIG).values()) + BIG.vocab_size * BIG.hidden_size)
    least = math.ceil(4 * weights / pl.CHIPS["v5e"].hbm_bytes)  # params, reference, two Adam moments
    sizes = [pl.parse_target(f"v5e:{s}").num_devices for s in pl.TPU_TOPOLOGIES["v5e"]]
    candidates = [n for n in sizes if n >= least]
    assert least == 5 and candidates == [8, 16, 32, 64, 128, 256]
    for needed in (1, 16, 32, 128, 256, 1024):
        compiled, tried = [], []
        monkeypatch.setattr(pl, "plan", _fake_plan(needed, compiled))
        got = pl.smallest_slice(BIG, "v5e", passes=("unlearn",), on_plan=tried.append)
        expect = next((n for n in candidates if n >= needed), None)
        assert (got and pl.parse_target(got.target).num_devices) == expect, needed
        assert len(tried) == len(compiled) <= math.ceil(math.log2(len(candidates) + 1))
        assert all(pl.parse_target(t).num_devices >= least for t, _ in compiled)
        for t, mesh in compiled:  # fsdp takes the batch (32), tp the rest
            n = pl.parse_target(t).num_devices
            assert mesh == {"fsdp": min(n, 32), **({"tp": n // 32} if n > 32 else {})}


def test_smallest_slice_lays_meshes_onto_whole_v5p_torus_dimensions(monkeypatch):
    """A 3-D v5p slice gets fsdp = a product of its physical dimensions (4x4x4: 16 x tp 4; jax.make_mesh
    cannot lay fsdp=32,tp=2 onto it); 2-D v5e slices keep fsdp = min(chips, batch)."""
    expect = {"2x2x1": {"fsdp": 4}, "2x2x2": {"fsdp": 8}, "2x2x4": {"fsdp": 16}, "2x4x4": {"fsdp": 32},
              "4x4x4": {"fsdp": 16, "tp": 4}, "4x4x8": {"fsdp": 32, "tp": 4}, "4x8x8": {"fsdp": 32, "tp": 8},
              "8x8x8": {"fsdp": 8, "tp": 64}}
    assert set(expect) == set(pl.TPU_TOPOLOGIES["v5p"])
    for needed in (1, 64, 10**9):  # bisection visits different slices
        compiled = []
        monkeypatch.setattr(pl, "plan", _fake_plan(needed, compiled))
        pl.smallest_slice(BIG, "v5p", passes=("unlearn",))
        for t, mesh in compiled:
            assert mesh == expect[t.split(":")[1]], t
    assert pl._fsdp_size("8x16", 128, 1, 32) == 32 and pl._fsdp_size("4x4x4", 64, 8, 32) == 4


def test_smallest_slice_refuses_an_unknown_chip():
    with pytest.raises(ValueError, match="chip must be one of"):
        pl.smallest_slice("llama-2-7b", "h100")


def test_plan_result_from_dict_names_bad_keys():
    with pytest.raises(ValueError, match=r"unknown keys \['x'\], missing \[.*'passes'"):
        pl.PlanResult.from_dict({"x": 1})


@pytest.mark.parametrize("code, match", [(-9, r"killed by signal 9 \(SIGKILL: most often the host ran out of memory"),
                                         (1, "exited with status 1")])
def test_a_failed_compile_process_says_how_it_ended(monkeypatch, code, match):
    import subprocess

    def ended(argv, **kwargs):
        return subprocess.CompletedProcess(argv, code, stdout="", stderr="libtpu warnings")

    monkeypatch.setattr(pl.subprocess, "run", ended)
    with pytest.raises(RuntimeError, match=rf"compiling for cpu:8 failed: .*{match}.*\n.*libtpu warnings"):
        pl.plan("llama-2-7b", target="cpu:8", mesh="fsdp=8", passes=("eval",))
