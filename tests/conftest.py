"""Suite-wide set-up: 8 forced CPU devices, strict dtype promotion, fixed seeds, offline.

Forcing several devices for every test makes sharding bugs surface everywhere.
Dtype promotion stays "standard": optax's Adam bias correction (``b1 ** count`` with
an int32 count) fails under "strict", so dtype discipline is checked by tests that
assert output dtypes (bfloat16 in -> bfloat16 out, float32 accumulation) instead.
"""

import os
import random

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "standard")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. Each XLA:CPU executable holds about five
    memory mappings (its JIT-compiled code); the whole suite in one process compiles enough programs to
    pass the kernel's ``vm.max_map_count`` (65530 here), after which LLVM's JIT segfaults inside
    ``backend_compile`` (seen at ~92% of ``make test``). Modules rarely share a compiled program."""
    yield
    jax.clear_caches()


# The slow tier (models trained or loaded from disk, whole commands, several processes, compiler
# lowering for every platform, sharded-vs-unsharded runs on every mesh shape): `make test` runs it,
# `make test-fast` (pytest -m "not slow", under 3 minutes on 2 cores) leaves it out.
SLOW_MODULES = {
    "test_cli.py", "test_cli_mesh.py", "test_demo.py", "test_benchmark.py", "test_multihost.py",
    "bad_inputs/test_cli.py", "models/test_hf_parity.py", "kernels/test_lowering.py",
    "test_sharding.py", "test_fisher_sharded.py", "test_fisher_fused.py", "test_resume_unlearn.py",
    "test_projection_kernel_integration.py", "eval/test_eval_runner.py", "kernels/test_fisher_kernel.py",
    "kernels/test_tpu_compile.py", "kernels/test_gpu_compile.py", "test_plan_compile.py", "test_plan_cli.py", "test_quant_bnb.py",
    "models/test_remat.py", "eval/test_muse.py", "test_optim.py", "test_sparsity.py", "test_train.py",
    "test_cli_model_options.py", "models/test_scan.py",
    "models/test_functional.py", "eval/test_relearn.py", "bad_inputs/test_numeric.py", "eval/test_durability.py",
    # method families whose tests run short unlearning runs on a decoder (RMU, IdkNLL/IdkDPO, continual)
    "test_rmu.py", "test_idk.py", "test_continual.py",
}
SLOW_TESTS = {"test_methods.py::test_perta_fisher_on_a_decoder_runs_the_fused_fisher",
              # adapter-space runs end to end (the step, merge and NF4 base stay in the fast tier)
              "test_adapters.py::test_adapter_run_resumes_to_identical_params",
              "test_adapters.py::test_gradient_run_in_adapter_space_changes_only_adapted_kernels_by_rank_r",
              "test_adapters.py::test_perta_in_adapter_space_runs_and_touches_adapted_kernels_only",
              "test_adapters.py::test_salun_mask_over_the_adapter",
              "test_adapters.py::test_adapter_step_is_the_chain_rule_of_the_full_space_estimator",
              "test_adapters.py::test_adapter_npo_reference_is_the_frozen_base_and_retain_term_is_pulled_back",
              "test_adapters.py::test_sharded_adapter_run_equals_the_unsharded_one",
              "test_adapters.py::test_task_vector_in_adapter_space_negates_the_adapter_update",
              # own QA data end to end: init + train, demo --data --quick (the split choice stays fast)
              "test_own_data.py::test_init_writes_a_base_model_that_train_loads",
              "test_own_data.py::test_demo_on_own_data_end_to_end",
              # composed unlearners against the presets, every variant (one compile each)
              "test_unlearn.py::test_composed_unlearner_equals_the_preset",
              "test_unlearn.py::test_custom_forget_loss_retain_loss_estimator_and_transform"}


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        module = os.path.relpath(str(item.path), here)
        if module in SLOW_MODULES or f"{module}::{item.originalname}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def key():
    return jax.random.key(0)


# One trained tiny target/reference pair for the whole session (the end-to-end tests of the CLI
# and the benchmark share it instead of each training their own).
def tiny_demo_config():
    """The shared pair's configuration: 10 people, a 2-layer d-32 decoder, 60 training steps."""
    from jaxunlearn.pipeline import DemoConfig
    from jaxunlearn.train import TrainConfig

    return DemoConfig(num_people=10, num_general=10, vocab_size=200, hidden_size=32, intermediate_size=64,
                      num_heads=2, num_kv_heads=1,
                      train=TrainConfig(steps=60, batch_size=16, learning_rate=1e-2, warmup_steps=5))


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """``SimpleNamespace(cfg, data, trained, dir)``: the prepared benchmark, the trained
    ``{"target": (model, history), "reference": ...}`` and, under ``dir``, the layout
    ``jaxunlearn demo`` writes (``data/``, ``muse/`` and ``models/{target,reference}``)."""
    import types

    from jaxunlearn.data import save_benchmark
    from jaxunlearn.data.muse import save_muse
    from jaxunlearn.models import save_pretrained
    from jaxunlearn.pipeline import prepare_data, train_pair

    cfg = tiny_demo_config()
    data = prepare_data(cfg)
    trained = train_pair(cfg, data, progress=False)
    out = tmp_path_factory.mktemp("tiny_pair") / "demo"
    save_benchmark(out / "data", data.dataset, data.tokenizer)
    save_muse(data.muse, out / "muse")
    for name, (model, _) in trained.items():
        save_pretrained(model, out / "models" / name, tokenizer=data.tokenizer)
    return types.SimpleNamespace(cfg=cfg, data=data, trained=trained, dir=out)


def pytest_collection_finish(session):
    """Start the worker subprocesses of the collected (selected) modules that declare ``BACKGROUND``
    jobs, so they run beside the in-process tests (tests/suite_background.py)."""
    import suite_background

    started = set()
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__ not in started:
            started.add(module.__name__)
            for name, launcher in getattr(module, "BACKGROUND", {}).items():
                suite_background.start(name, launcher)


def pytest_sessionfinish(session, exitstatus):
    import suite_background

    suite_background.stop_all()
