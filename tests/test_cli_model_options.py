"""``--param-dtype`` and ``--remat`` on the commands that load a checkpoint: the CLI's unlearning in
bfloat16 storage with rematerialisation equals the library run with the same options, is saved in
bfloat16, and stays close to the float32, no-remat run."""

import json

import jax
import numpy as np
import pytest

from jaxunlearn.cli import main
from jaxunlearn.data import encode_split, load_benchmark
from jaxunlearn.methods import UnlearnContext, run_method
from jaxunlearn.models import DecoderFn, from_pretrained
from jaxunlearn.model_options_cli import apply_model_options


@pytest.fixture(scope="module")
def demo_dir(tiny_pair):
    return tiny_pair.dir


def _library_run(target, data_dir, cfg, param_dtype, remat):
    import argparse

    model, tok = from_pretrained(target, dtype="float32", param_dtype=param_dtype)
    apply_model_options(model, argparse.Namespace(remat=remat))
    dd, _ = load_benchmark(data_dir)
    enc = {s: encode_split(tok, dd[s], max_length=None, fact_column=None) for s in ("forget10", "retain90")}
    n = max(e["input_ids"].shape[-1] for e in enc.values())
    enc = {s: encode_split(tok, dd[s], max_length=n, fact_column=None) for s in enc}
    fn, params = DecoderFn.of(model)
    return run_method(UnlearnContext(fn, params, enc["forget10"], enc["retain90"], seed=0), cfg)


def test_unlearn_in_bfloat16_with_remat_equals_the_library_run(demo_dir, tmp_path, capsys):
    cfg = {"kind": "gradient", "batch_size": 8, "unlearn": {"method": "npo", "steps": 3, "learning_rate": 1e-3}}
    path = tmp_path / "npo.json"
    path.write_text(json.dumps(cfg))
    target, data = demo_dir / "models" / "target", demo_dir / "data"
    out = tmp_path / "bf16"
    assert main(["unlearn", "--model", str(target), "--data", str(data), "--forget", "forget10", "--retain",
                 "retain90", "--method", "npo", "--config", str(path), "--out", str(out),
                 "--param-dtype", "bfloat16", "--remat", "full"]) == 0
    hf = json.loads((out / "config.json").read_text())
    assert hf.get("dtype", hf.get("torch_dtype")) == "bfloat16"  # saved in the parameters' dtype
    f32 = json.loads((target / "config.json").read_text())
    assert (out / "model.safetensors").stat().st_size < 0.6 * (target / "model.safetensors").stat().st_size
    assert f32.get("dtype", f32.get("torch_dtype")) == "float32"
    saved = DecoderFn.of(from_pretrained(out, load_tokenizer=False, param_dtype="bfloat16")[0])[1]
    want = _library_run(target, data, cfg, "bfloat16", "full")
    for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    plain = _library_run(target, data, cfg, "float32", "none")
    err = max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y))))
              for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(plain)))
    scale = max(float(np.max(np.abs(np.asarray(y)))) for y in jax.tree.leaves(plain))
    assert err <= 2 ** -7 * scale  # bfloat16 rounding of the stored values, nothing more
    # --scan-layers: the blocks under one lax.scan; written per layer as before, the same values
    scan_out = tmp_path / "scan"
    assert main(["unlearn", "--model", str(target), "--data", str(data), "--forget", "forget10", "--retain",
                 "retain90", "--method", "npo", "--config", str(path), "--out", str(scan_out), "--scan-layers"]) == 0
    scanned = DecoderFn.of(from_pretrained(scan_out, load_tokenizer=False)[0])[1]
    for x, y in zip(jax.tree.leaves(scanned), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-6)
    with pytest.raises(SystemExit):  # argparse names the bad choice
        main(["unlearn", "--model", str(target), "--data", str(data), "--forget", "forget10", "--retain",
              "retain90", "--method", "npo", "--out", str(tmp_path / "x"), "--remat", "half"])
    assert "invalid choice: 'half'" in capsys.readouterr().err

