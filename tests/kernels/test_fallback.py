"""``impl="auto"`` falls back to XLA where the accelerator's compiler refuses a kernel, and
``JAXUNLEARN_KERNEL_IMPL`` forces a path.

The fallback asks the compiler of the attached accelerator, so on this CPU host the tests
pretend the default backend is a TPU (``dispatch.platform``) and lower for TPU with
``jax.export``: the TPU branch is then the one ``with_fallback`` guards. The compiler's
refusal is either injected (``compile_probe`` raising) or real (the CPU backend cannot
compile a Mosaic kernel).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxunlearn.kernels import dispatch as C
from jaxunlearn.kernels import fisher as kf
from jaxunlearn.kernels import projection as kp

TPU_CALL = "tpu_custom_call"


def _tpu_module(fn, *args) -> str:
    return export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


def _arrays(B, T, d_in, d_out):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((B, T, d_in)), jnp.float32),
            jnp.asarray(rng.standard_normal((B, T, d_out)), jnp.float32))


@pytest.fixture
def on_tpu(monkeypatch):
    monkeypatch.setattr(C, "platform", lambda: "tpu")
    monkeypatch.delenv(C.IMPL_ENV, raising=False)


def test_injected_compile_failure_falls_back_to_xla_with_one_warning(on_tpu, monkeypatch):
    def refuse(fn, args):
        raise RuntimeError("Mosaic failed to compile: VMEM exhausted\nmore detail")

    monkeypatch.setattr(C, "compile_probe", refuse)
    a, g = _arrays(2, 8, 40, 24)
    fn = lambda a, g: kf.dense_fisher(a, g)  # noqa: E731
    with pytest.warns(RuntimeWarning) as rec:
        text = _tpu_module(fn, a, g)
    assert TPU_CALL not in text  # the XLA path was lowered for TPU
    (w,) = [r for r in rec if "jaxunlearn.kernels" in str(r.message)]
    msg = str(w.message)
    assert "fisher.dense_fisher" in msg and "float32[2, 8, 40]" in msg and "float32[2, 8, 24]" in msg
    assert "RuntimeError: Mosaic failed to compile: VMEM exhausted" in msg and "more detail" not in msg
    with warnings.catch_warnings():  # the same configuration again: decided once, no second warning
        warnings.simplefilter("error")
        assert TPU_CALL not in _tpu_module(fn, a, g)
    # the fallback computes the same Fisher (run here on CPU: the XLA path)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(a, g)), np.asarray(kf.dense_fisher_reference(a, g)),
                               rtol=1e-5)


def test_a_real_compiler_refusal_falls_back(on_tpu):
    # no monkeypatched probe: the default (CPU) backend really cannot compile the Mosaic kernel
    R = jnp.asarray(np.random.default_rng(1).standard_normal((4, 20000)), jnp.float32)
    g = jnp.ones((20000,), jnp.float32)
    with pytest.warns(RuntimeWarning, match=r"projection\.gram_and_dots did not compile on tpu"):
        text = _tpu_module(lambda R, g: kp.gram_and_dots(R, g), R, g)
    assert TPU_CALL not in text


def test_kernel_kept_when_it_compiles(on_tpu, monkeypatch):
    calls = []
    monkeypatch.setattr(C, "compile_probe", lambda fn, args: calls.append(len(args)))
    a, g = _arrays(2, 8, 48, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = _tpu_module(lambda a, g: kf.dense_fisher(a, g), a, g)
    assert TPU_CALL in text and calls == [3]  # probed once, with (a, g, mask)


def test_forced_impl_is_never_replaced(on_tpu, monkeypatch):
    monkeypatch.setattr(C, "compile_probe", lambda fn, args: (_ for _ in ()).throw(RuntimeError("no")))
    a, g = _arrays(2, 8, 56, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # impl="pallas" is not probed: the user asked for the kernel
        assert TPU_CALL in _tpu_module(lambda a, g: kf.dense_fisher(a, g, impl="pallas"), a, g)


def test_environment_variable_forces_a_path(monkeypatch):
    a, g = _arrays(2, 4, 16, 8)
    ref = np.asarray(kf.dense_fisher_reference(a, g))
    monkeypatch.setenv(C.IMPL_ENV, "xla")
    assert TPU_CALL not in _tpu_module(lambda a, g: kf.dense_fisher(a, g, block_in=16), a, g)
    monkeypatch.setenv(C.IMPL_ENV, "pallas")  # on CPU: the kernel in interpret mode
    np.testing.assert_allclose(np.asarray(kf.dense_fisher(a, g, block_in=8, block_out=8)), ref, rtol=1e-5)
    R, v = jnp.ones((2, 300)), jnp.ones((300,))
    G, d = kp.gram_and_dots(R, v, block_p=128)
    np.testing.assert_allclose(np.asarray(G), 300.0 * np.ones((2, 2)))
    monkeypatch.setenv(C.IMPL_ENV, "triton")
    with pytest.raises(ValueError, match=r"JAXUNLEARN_KERNEL_IMPL='triton': expected 'auto', 'pallas' or 'xla'"):
        kf.dense_fisher(a, g)
    monkeypatch.setenv(C.IMPL_ENV, "")  # empty: auto
    assert C.resolve_impl("auto") == "auto" and C.resolve_impl("xla") == "xla"
