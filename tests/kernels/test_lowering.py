"""The kernels lower to compiled Mosaic (TPU) and Triton (GPU) code from this CPU host.

``jax.export(..., platforms=[p])`` lowers a function for platform ``p`` without the
device: the Pallas TPU lowering emits a ``tpu_custom_call`` (Mosaic MLIR), the GPU
lowering a ``__gpu$xla.gpu.triton`` custom call (Triton IR). These tests check, with no
GPU/TPU, that every kernel and the library paths built on them (the fused Fisher, the
projection) go through those lowerings, with the number of kernel calls expected; that
``impl="auto"`` is decided at lowering (so one trace serves every platform and a CPU jit
cache entry never leaks into a TPU export); and that a configuration one platform's
kernel cannot take fails only when lowered for that platform. Compiling and running
the kernels needs the hardware (``test_compiled_pallas_on_hardware`` in the kernel
tests); the Mosaic / Triton compilers run after this lowering and may still refuse a
kernel.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from jaxunlearn import fisher as fi
from jaxunlearn import fisher_fused as ff
from jaxunlearn import reduction as rd
from jaxunlearn.kernels import fisher as kf
from jaxunlearn.kernels import projection as kp
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig, dense_shapes
from jaxunlearn.projection import project_tree

TPU_CALL = "tpu_custom_call"
TRITON_CALL = "__gpu$xla.gpu.triton"
# Triton IR has no compatibility guarantee across jaxlib versions, so export refuses
# to serialise it unless told; lowering is what is checked here.
CHECKS = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]


def _lower(fn, *args, platforms):
    return export.export(jax.jit(fn), platforms=platforms, disabled_checks=CHECKS)(*args).mlir_module()


_NAME = r'"[^"]+"|[\w.$-]+'  # an MLIR symbol: bare, or quoted (e.g. @"<lambda>")


def _kernel_calls(text: str, target: str) -> int:
    """How many times one run of ``@main`` reaches ``custom_call @target``: functions are
    outlined once per distinct signature and called from several sites, so occurrences are
    counted through the call graph (``call @f``)."""
    bodies = {}
    for block in re.split(r"\n(?=\s*func\.func )", text):
        m = re.search(rf"func\.func (?:public |private )?@({_NAME})\(", block)
        if m:
            bodies[m.group(1)] = block

    @functools.cache
    def count(name: str) -> int:
        body = bodies[name]
        direct = body.count(f"@{target}(")
        return direct + sum(count(callee) for callee in re.findall(rf"\bcall @({_NAME})\(", body))

    return count("main")


def _calls(fn, *args, platform):
    """``(tpu_custom_call count, triton call count)`` per run of ``fn`` lowered for ``platform``."""
    text = _lower(fn, *args, platforms=[platform])
    return _kernel_calls(text, TPU_CALL), _kernel_calls(text, TRITON_CALL)


def _rand(*shape, dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32).astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "B,T,d_in,d_out,masked",
    [(1, 40, 96, 200, False), (3, 600, 640, 130, True)],  # full-dim blocks; padded 256-blocks + T chunks
)
def test_dense_fisher_lowers_to_mosaic_and_triton(B, T, d_in, d_out, masked, dtype):
    a, g = _rand(B, T, d_in, dtype=dtype), _rand(B, T, d_out, dtype=dtype, seed=1)
    mask = jnp.ones((B, T)) if masked else None
    for impl in ("auto", "pallas"):
        fn = functools.partial(kf.dense_fisher, impl=impl)
        args = (a, g) if mask is None else (a, g, mask)
        assert _calls(lambda *x: fn(*x), *args, platform="tpu") == (1, 0)
        assert _calls(lambda *x: fn(*x), *args, platform="cuda") == (0, 1)
    # on CPU "auto" is the XLA scan: no kernel call at all
    assert _calls(kf.dense_fisher, a, g, platform="cpu") == (0, 0)


@pytest.mark.parametrize("k,triton", [(16, True), (4, False)])
def test_projection_passes_lower_per_platform(k, triton):
    """Both passes lower to kernels on TPU; on GPU "auto" uses Triton only for power-of-two k >= 16."""
    P = 70_000  # 8 full TPU blocks of 8192 and a tail done by XLA
    R, g, c = _rand(k, P), _rand(P, seed=1), _rand(k, seed=2)
    assert _calls(kp.gram_and_dots, R, g, platform="tpu") == (1, 0)
    assert _calls(kp.subtract, g, R, c, platform="tpu") == (1, 0)
    assert _calls(kp.gram_and_dots, R, g, platform="cuda") == (0, int(triton))
    assert _calls(kp.subtract, g, R, c, platform="cuda") == (0, int(triton))
    tree = lambda g, R: project_tree({"a": g[:50_000], "b": g[50_000:]}, {"a": R[:, :50_000], "b": R[:, 50_000:]})
    # two leaves, each long enough for one block on each platform: 2 reductions + 2 subtracts
    assert _calls(tree, g, R, platform="tpu") == (4, 0)
    assert _calls(tree, g, R, platform="cuda") == (0, 4 * int(triton))
    assert _calls(tree, g, R, platform="cpu") == (0, 0)


def test_auto_is_decided_at_lowering_not_from_the_jit_cache():
    """A function traced and run on CPU first, then exported for TPU: the export has the kernel."""
    R, g = _rand(16, 20_000), _rand(20_000, seed=1)
    step = jax.jit(lambda R, g: project_tree({"w": g}, {"w": R}))
    out = step(R, g)["w"]  # traced, lowered and run on CPU (XLA path)
    ref = g - R.T @ jnp.linalg.lstsq(R.T, g)[0]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
    assert _calls(step, R, g, platform="tpu") == (2, 0)
    assert _calls(step, R, g, platform="cuda") == (0, 2)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="runs the CPU default (interpret mode) of a config invalid elsewhere")
def test_invalid_configuration_fails_only_for_its_platform():
    R, g = _rand(4, 256), _rand(256, seed=1)
    fn = functools.partial(kp.gram_and_dots, impl="pallas", block_p=64)
    G, d = jax.jit(fn)(R, g)  # interpret mode on CPU: valid
    np.testing.assert_allclose(np.asarray(G), np.asarray(R @ R.T), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(d), np.asarray(R @ g), rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of 128 on TPU"):
        _lower(fn, R, g, platforms=["tpu"])
    with pytest.raises(ValueError, match="power of two >= 16"):
        _lower(fn, R, g, platforms=["cuda"])
    a = _rand(2, 8, 200)
    with pytest.raises(ValueError, match="multiple of 128 .* Mosaic"):
        _lower(functools.partial(kf.dense_fisher, impl="pallas", block_in=100), a, a, platforms=["tpu"])
    with pytest.raises(ValueError, match="power of two >= 16 for the Triton"):
        _lower(functools.partial(kf.dense_fisher, impl="pallas", block_in=24), a, a, platforms=["cuda"])
    # vmap over layers of a block size valid here (interpret) but not on TPU: the marker batches
    a3 = _rand(3, 2, 8, 24)
    f_vm = jax.jit(jax.vmap(functools.partial(kf.dense_fisher, impl="pallas", block_in=24)))(a3, a3)
    np.testing.assert_allclose(np.asarray(f_vm[1]), np.asarray(kf.dense_fisher_reference(a3[1], a3[1])), rtol=1e-5)
    with pytest.raises(ValueError, match="needs interpret=True"):  # compiled Pallas on CPU: nowhere to run
        jax.jit(functools.partial(kp.gram_and_dots, impl="pallas", interpret=False))(R, g)


@pytest.mark.parametrize("tied", [False, True])
def test_fused_fisher_step_lowers_one_kernel_per_dense_layer(tied):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2,
                      num_layers=2, tie_word_embeddings=tied)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params)
    B, T = 2, 8
    batch = {"input_ids": jnp.zeros((B, T), jnp.int32), "attention_mask": jnp.ones((B, T), jnp.int32),
             "loss_mask": jnp.ones((B, T), jnp.float32)}
    acc, total = rd.zeros(params)
    local = fi.fisher_local_sums(DecoderFn(graphdef).example_nll)  # the step fisher_diagonal runs (auto)
    assert isinstance(local, ff.FusedFisherSums)
    step = functools.partial(rd.accumulate, local_sums=local)
    args = (acc, total, params, batch, jnp.ones((B,)), None)
    n_dense = len(dense_shapes(cfg)) + int(tied)  # the tied head's H**2 term is one more dense_fisher
    assert _calls(step, *args, platform="tpu") == (n_dense, 0)
    assert _calls(step, *args, platform="cuda") == (0, n_dense)
    assert _calls(step, *args, platform="cpu") == (0, 0)
