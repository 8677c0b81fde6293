"""Bad files on disk: remote code, umask, corrupt or truncated files, NaN/Inf weights, corrupt orbax steps.

Every case builds a valid artefact in ``tmp_path`` (a tiny Hugging Face checkpoint from
``save_pretrained``, a small saved benchmark, TOFU files, orbax checkpoints), damages one file,
and checks that loading raises the documented exception type with a message naming the file,
key or tensor, instead of a raw traceback from ``safetensors`` / ``transformers`` / ``datasets``
/ TensorStore.
"""

import glob
import io
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

from jaxunlearn import checkpoint as ckpt
from jaxunlearn.data import (
    benchmark_texts,
    generate_benchmark,
    load_benchmark,
    load_tofu,
    save_benchmark,
    train_tokenizer,
)
from jaxunlearn.models import Decoder, ModelConfig, from_pretrained, load_config, save_pretrained

CFG = ModelConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
ROWS = [{"question": "Who wrote A?", "answer": "B wrote A."}, {"question": "Where is B from?", "answer": "E."}]
ARROW = "data/forget05/data-00000-of-00001.arrow"


def _model(seed=0, poison=None):
    """A Decoder with numpy N(0, 0.2) weights; ``poison=(path, value)`` puts ``value`` in its first element."""
    abstract = nnx.eval_shape(lambda: Decoder(CFG, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.RandomState(seed)
    pure = jax.tree.map(lambda a: rng.normal(0, 0.2, a.shape).astype(np.float32), nnx.to_pure_dict(state))
    if poison is not None:
        path, value = poison
        node = pure
        for k in path[:-1]:
            node = node[k]
        node[path[-1]].flat[0] = value
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["the cat sat on the mat.", "a dog ran in the park."] * 4, vocab_size=60)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok):
    """A valid checkpoint directory: config.json, model.safetensors, tokenizer.json, tokenizer_config.json."""
    return save_pretrained(_model(), tmp_path_factory.mktemp("hf") / "ckpt", tokenizer=tok)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    return save_pretrained(_model(), tmp_path_factory.mktemp("hf") / "sharded", max_shard_size=4000)


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    dd = generate_benchmark(num_people=10, num_general=10)
    path = tmp_path_factory.mktemp("bench") / "b"
    save_benchmark(path, dd, train_tokenizer(benchmark_texts(dd), vocab_size=200))
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _write(rel, data):
    """An edit: replace ``rel`` with ``data`` (bytes or str)."""
    def edit(d):
        f = d / rel
        f.write_bytes(data if isinstance(data, bytes) else data.encode())
    return edit


def _truncate(rel, frac=0.5):
    def edit(d):
        f = d / rel
        f.write_bytes(f.read_bytes()[: int(f.stat().st_size * frac)])
    return edit


def _json_edit(rel, fn):
    def edit(d):
        f = d / rel
        value = json.loads(f.read_text())
        fn(value)
        f.write_text(json.dumps(value))
    return edit


def _remove(rel):
    def edit(d):
        f = d / rel
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    return edit


# ----------------------------------------------------------------------------- no remote code

EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig, PreTrainedTokenizerFast


class EvilConfig(LlamaConfig):
    pass


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _plant(d, marker):
    (d / "evil.py").write_text(EVIL.format(marker=str(marker)))


def test_config_auto_map_is_never_executed(hf_dir, tmp_path, monkeypatch):
    """config.json maps AutoConfig to evil.py: the built-in LlamaConfig is used, evil.py never runs."""
    d = _copy(hf_dir, tmp_path / "c")
    marker = tmp_path / "MARKER"
    _plant(d, marker)
    _json_edit("config.json", lambda c: c.update(auto_map={"AutoConfig": "evil.EvilConfig"}))(d)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\n"))          # no prompt may accept this
    assert load_config(d) == CFG
    model, tokenizer = from_pretrained(d)
    assert isinstance(model, Decoder) and tokenizer is not None
    assert not marker.exists()


def test_tokenizer_auto_map_with_a_builtin_class_is_ignored(hf_dir, tmp_path, monkeypatch, tok):
    d = _copy(hf_dir, tmp_path / "c")
    marker = tmp_path / "MARKER"
    _plant(d, marker)
    _json_edit("tokenizer_config.json", lambda c: c.update(auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]}))(d)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\n"))
    _, tokenizer = from_pretrained(d)
    assert type(tokenizer).__name__ != "EvilTokenizer" and tokenizer.get_vocab() == tok.get_vocab()
    assert not marker.exists()


def test_tokenizer_needing_custom_code_is_refused(hf_dir, tmp_path, monkeypatch):
    """A tokenizer class only evil.py defines: transformers would prompt (and run it on "y"); we refuse."""
    d = _copy(hf_dir, tmp_path / "c")
    marker = tmp_path / "MARKER"
    _plant(d, marker)
    _json_edit("tokenizer_config.json", lambda c: c.update(
        tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]}))(d)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\n"))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json asks for custom tokenizer code.*never run"):
        from_pretrained(d)
    assert not marker.exists()


def test_benchmark_tokenizer_needing_custom_code_is_refused(bench_dir, tmp_path, monkeypatch):
    d = _copy(bench_dir, tmp_path / "b")
    marker = tmp_path / "MARKER"
    _plant(d / "tokenizer", marker)
    _json_edit("tokenizer/tokenizer_config.json", lambda c: c.update(
        tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]}))(d)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\n"))
    with pytest.raises(ValueError, match=r"tokenizer/tokenizer_config\.json asks for custom tokenizer code.*never run"):
        load_benchmark(d)
    assert not marker.exists()


def test_unknown_model_type_with_auto_map_is_refused(hf_dir, tmp_path, monkeypatch):
    d = _copy(hf_dir, tmp_path / "c")
    marker = tmp_path / "MARKER"
    _plant(d, marker)
    _json_edit("config.json", lambda c: c.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"}))(d)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\n"))
    with pytest.raises(ValueError, match=r"unsupported model_type 'evil' in .*config\.json"):
        from_pretrained(d)
    assert not marker.exists()


# ----------------------------------------------------------------------------- umask


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_save_pretrained_honours_umask(tmp_path, tok, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        out = save_pretrained(_model(), tmp_path / "ckpt", tokenizer=tok)
        sharded = save_pretrained(_model(), tmp_path / "sharded", max_shard_size=4000)
    finally:
        os.umask(old)
    for d in (out, sharded):
        assert oct(os.stat(d).st_mode & 0o777) == oct(dir_mode)
        files = sorted(os.listdir(d))
        assert len(files) >= 3
        for f in files:
            assert oct(os.stat(d / f).st_mode & 0o777) == oct(file_mode), f
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "sharded"]


def test_save_benchmark_honours_umask(tmp_path):
    dd = generate_benchmark(num_people=10, num_general=10)
    tokenizer = train_tokenizer(benchmark_texts(dd), vocab_size=200)
    old = os.umask(0o022)
    try:
        path = save_benchmark(tmp_path / "b", dd, tokenizer)
    finally:
        os.umask(old)
    for root, dirs, files in os.walk(path):
        assert os.stat(root).st_mode & 0o777 == 0o755, root
        for f in files:
            assert os.stat(os.path.join(root, f)).st_mode & 0o777 == 0o644, f


# ----------------------------------------------------------------------------- corrupt checkpoint files


def _nan_in(name, value):
    def edit(d):
        from safetensors.numpy import load_file, save_file

        tensors = dict(load_file(d / "model.safetensors"))
        tensors[name] = tensors[name].copy()
        tensors[name][0, -1] = value
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return edit


HF_CASES = {
    "safetensors_garbage": (_write("model.safetensors", b"not a safetensors file" * 8),
                            ValueError, r"model\.safetensors is corrupt \(.*header"),
    "safetensors_truncated": (_truncate("model.safetensors"), ValueError, r"model\.safetensors is corrupt \("),
    "safetensors_header_only": (_truncate("model.safetensors", 0.01), ValueError, r"model\.safetensors is corrupt \("),
    "safetensors_empty": (_write("model.safetensors", b""), ValueError, r"model\.safetensors is corrupt \("),
    "safetensors_missing": (_remove("model.safetensors"), FileNotFoundError, r"no model\.safetensors"),
    "config_invalid_json": (_write("config.json", '{"model_type": "llama", '), ValueError,
                            r"config\.json is corrupt \(invalid JSON"),
    "config_not_an_object": (_write("config.json", "[1, 2]"), ValueError,
                             r"config\.json is corrupt \(expected a JSON object, got list\)"),
    "config_not_utf8": (_write("config.json", b'{"model_type": "llama\xff"}'), ValueError,
                        r"config\.json is not valid UTF-8: byte 0xff at offset 21 \(line 1\)"),
    "config_field_wrong_type": (_json_edit("config.json", lambda c: c.update(hidden_size="sixteen")), ValueError,
                                r"config\.json is invalid \(.*hidden_size"),
    "config_field_null": (_json_edit("config.json", lambda c: c.update(num_attention_heads=None)), ValueError,
                          r"config\.json is invalid \(.*num_attention_heads"),
    "config_heads_not_dividing": (_json_edit("config.json", lambda c: c.update(num_attention_heads=3)), ValueError,
                                  r"config\.json is invalid \(.*attention heads"),
    "config_zero_heads": (_json_edit("config.json", lambda c: c.update(num_attention_heads=0)), ValueError,
                          r"config\.json"),
    "config_bad_activation": (_json_edit("config.json", lambda c: c.update(hidden_act="gelu")), ValueError,
                              r"config\.json: unsupported hidden_act 'gelu'"),
    "config_missing": (_remove("config.json"), FileNotFoundError, r"no config\.json"),
    "tokenizer_json_invalid": (_write("tokenizer.json", '{"version": '), ValueError,
                               r"tokenizer\.json is corrupt \(invalid JSON"),
    "tokenizer_json_truncated": (_truncate("tokenizer.json"), ValueError, r"tokenizer\.json is corrupt \(invalid JSON"),
    "tokenizer_json_not_an_object": (_write("tokenizer.json", "[]"), ValueError,
                                     r"tokenizer\.json is corrupt \(expected a JSON object"),
    "tokenizer_json_bad_model": (_json_edit("tokenizer.json", lambda t: t.update(model={"type": "Nope"})),
                                 ValueError, r"tokenizer\.json is corrupt \("),
    "tokenizer_json_not_utf8": (_write("tokenizer.json", b"\xfe\xff{}"), ValueError,
                                r"tokenizer\.json is not valid UTF-8: byte 0xfe at offset 0"),
    "tokenizer_config_invalid": (_write("tokenizer_config.json", "{oops"), ValueError,
                                 r"tokenizer_config\.json is corrupt \(invalid JSON"),
    "tokenizer_config_not_an_object": (_write("tokenizer_config.json", "[1]"), ValueError,
                                       r"tokenizer_config\.json is corrupt \(expected a JSON object, got list"),
    "tokenizer_config_not_utf8": (_write("tokenizer_config.json", b'{\n"a": "\xc3\x28"}'), ValueError,
                                  r"tokenizer_config\.json is not valid UTF-8: byte 0xc3 at offset 8 \(line 2\)"),
    "weights_nan": (_nan_in("model.layers.0.mlp.up_proj.weight", np.nan), ValueError,
                    r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' in .*model\.safetensors holds NaN"),
    "weights_inf": (_nan_in("lm_head.weight", -np.inf), ValueError,
                    r"tensor 'lm_head\.weight' in .*model\.safetensors holds Inf"),
    "weights_nan_embedding": (_nan_in("model.embed_tokens.weight", np.nan), ValueError,
                              r"tensor 'model\.embed_tokens\.weight' in .*model\.safetensors holds NaN"),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_bad_checkpoint_files_are_named(hf_dir, tmp_path, case):
    edit, exc, match = HF_CASES[case]
    d = _copy(hf_dir, tmp_path / "c")
    edit(d)
    with pytest.raises(exc, match=match):
        from_pretrained(d)


def _first_shard(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[0]


SHARDED_CASES = {
    "index_invalid_json": (_write("model.safetensors.index.json", '{"weight_map": {'),
                           r"model\.safetensors\.index\.json is corrupt \(invalid JSON"),
    "index_not_an_object": (_write("model.safetensors.index.json", '"x"'),
                            r"model\.safetensors\.index\.json is corrupt \(it has no 'weight_map'"),
    "index_weight_map_not_names": (
        _json_edit("model.safetensors.index.json", lambda i: i["weight_map"].update({"lm_head.weight": 7})),
        r"model\.safetensors\.index\.json is corrupt \('weight_map' entry 'lm_head\.weight' -> 7"),
    "index_escapes_directory": (
        _json_edit("model.safetensors.index.json", lambda i: i["weight_map"].update({"lm_head.weight": "../x"})),
        r"model\.safetensors\.index\.json is corrupt \('weight_map' entry 'lm_head\.weight' -> '\.\./x'"),
    "shard_garbage": (lambda d: (d / _first_shard(d)).write_bytes(b"\x08" + b"\x00" * 7 + b"{garbage"),
                      r"model-00001-of-0000\d\.safetensors is corrupt \("),
    "shard_truncated": (lambda d: _truncate(_first_shard(d), 0.7)(d),
                        r"model-00001-of-0000\d\.safetensors is corrupt \("),
}


@pytest.mark.parametrize("case", sorted(SHARDED_CASES))
def test_bad_sharded_checkpoint_files_are_named(sharded_dir, tmp_path, case):
    edit, match = SHARDED_CASES[case]
    d = _copy(sharded_dir, tmp_path / "c")
    edit(d)
    with pytest.raises(ValueError, match=match):
        from_pretrained(d)


# ----------------------------------------------------------------------------- never save NaN/Inf


@pytest.mark.parametrize("where, value, name", [
    (("layers", 0, "attn", "q_proj", "kernel"), np.nan, "model.layers.0.self_attn.q_proj.weight"),
    (("norm", "scale"), np.inf, "model.norm.weight"),
])
def test_save_pretrained_refuses_nonfinite_and_writes_nothing(tmp_path, tok, where, value, name):
    good = save_pretrained(_model(), tmp_path / "ckpt", tokenizer=tok)
    before = {f: (good / f).read_bytes() for f in os.listdir(good)}
    bad = _model(poison=(where, value))
    kind = "NaN" if np.isnan(value) else "Inf"
    for target in (good, tmp_path / "new" / "ckpt"):
        with pytest.raises(ValueError, match=rf"refusing to save: tensor '{name}' \(parameter "
                                             rf"{'/'.join(map(str, where))}\) holds {kind}"):
            save_pretrained(bad, target, tokenizer=tok)
    assert {f: (good / f).read_bytes() for f in os.listdir(good)} == before      # untouched
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]                              # no temporary or new dirs


def test_save_pytree_refuses_nonfinite(tmp_path):
    good = {"w": jnp.ones((2, 3)), "opt": {"mu": jnp.zeros(3)}, "step": jnp.array(1, jnp.int32)}
    ckpt.save_pytree(tmp_path / "c", good)
    bad = {**good, "opt": {"mu": jnp.array([0.0, jnp.inf, 1.0])}}
    with pytest.raises(ValueError, match=r"refusing to save: checkpoint '.*/c' has Inf values at 'opt/mu'"):
        ckpt.save_pytree(tmp_path / "c", bad, overwrite=True)
    np.testing.assert_array_equal(ckpt.restore_pytree(tmp_path / "c", good)["w"], good["w"])
    with pytest.raises(ValueError, match=r"checkpoint '.*/d' has NaN values at 'w'"):
        ckpt.save_pytree(tmp_path / "d", {**good, "w": jnp.full((2, 3), jnp.nan)})
    assert sorted(os.listdir(tmp_path)) == ["c"]
    with pytest.raises(ValueError, match=r"refusing to save: params has NaN values at 'b'"):
        ckpt.check_saveable({"a": jnp.ones(2), "b": jnp.array([jnp.nan])}, "params")
    ckpt.check_saveable({"a": jnp.ones(2), "i": jnp.array([3])}, "params")        # finite: no error


def _state(v):
    return {"params": {"w": jnp.full((64,), v, jnp.float32), "b": jnp.full((3,), -v, jnp.float32)},
            "step": jnp.array(int(v), jnp.int32)}


def test_save_step_refuses_nonfinite(tmp_path):
    mngr = ckpt.run_manager(tmp_path / "run")
    try:
        assert ckpt.save_step(mngr, 1, _state(1.0))
        mngr.wait_until_finished()
        bad = _state(2.0)
        bad["params"]["w"] = bad["params"]["w"].at[5].set(jnp.nan)
        with pytest.raises(ValueError, match=r"run state at step 2 \(checkpoint directory '.*run'\) has NaN "
                                             r"values at 'params/w'"):
            ckpt.save_step(mngr, 2, bad)
        mngr.wait_until_finished()
        assert mngr.all_steps() == [1]
    finally:
        mngr.close()
    assert sorted(os.listdir(tmp_path / "run")) == ["1"]


# ----------------------------------------------------------------------------- corrupt orbax steps


def _run_dir(path, steps=(1, 2)):
    mngr = ckpt.run_manager(path)
    for s in steps:
        ckpt.save_step(mngr, s, _state(float(s)))
    mngr.wait_until_finished()
    mngr.close()
    return path


def _damage_arrays(step_dir, how):
    files = glob.glob(os.path.join(step_dir, "**", "d", "*"), recursive=True)
    assert files, "the orbax layout changed: no array data files under <step>/.../d/"
    for f in map(Path, files):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2] if how == "truncate" else b"\x00garbage" * 4)


DAMAGE = {
    "arrays_truncated": lambda d: _damage_arrays(d, "truncate"),
    "arrays_overwritten": lambda d: _damage_arrays(d, "garbage"),
    "metadata_garbage": lambda d: Path(d, "default", "_METADATA").write_text("{garbage"),
    "manifest_missing": lambda d: os.remove(os.path.join(d, "default", "manifest.ocdbt")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_restore_latest_falls_back_past_a_corrupt_step(tmp_path, damage):
    run = _run_dir(tmp_path / "run")
    DAMAGE[damage](str(run / "2"))
    abstract = ckpt.abstract_like(_state(0.0))
    mngr = ckpt.run_manager(run)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step, state = ckpt.restore_latest(mngr, abstract)
        ours = [w for w in caught if "corrupt checkpoint step" in str(w.message)]
        assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
        msg = str(ours[0].message)
        assert f"'{run / '2'}'" in msg and "resuming from step 1" in msg and len(msg.splitlines()) == 1
        assert step == 1
        np.testing.assert_array_equal(state["params"]["w"], np.full(64, 1.0, np.float32))
        # the corrupt step is moved aside, so the resumed run saves step 2 afresh
        assert mngr.all_steps() == [1] and sorted(os.listdir(run)) == ["1", "2.corrupt"]
        assert ckpt.save_step(mngr, 2, _state(5.0))
        mngr.wait_until_finished()
        step, state = ckpt.restore_latest(mngr, abstract)
        assert step == 2 and float(state["params"]["w"][0]) == 5.0
    finally:
        mngr.close()


def test_restore_latest_raises_when_no_step_restores(tmp_path):
    run = _run_dir(tmp_path / "run")
    for s in ("1", "2"):
        _damage_arrays(str(run / s), "truncate")
    mngr = ckpt.run_manager(run)
    try:
        with pytest.raises(ValueError, match=rf"no checkpoint in '{run}' restores: step 2 \('{run / '2'}'\): "
                                             rf".*OUT_OF_RANGE.*; step 1 \('{run / '1'}'\)"):
            ckpt.restore_latest(mngr, ckpt.abstract_like(_state(0.0)))
        assert sorted(os.listdir(run)) == ["1", "2"]                           # nothing moved
    finally:
        mngr.close()


def test_restore_latest_without_steps(tmp_path):
    mngr = ckpt.run_manager(tmp_path / "run")
    try:
        assert ckpt.restore_latest(mngr, ckpt.abstract_like(_state(0.0))) is None
    finally:
        mngr.close()


@pytest.mark.parametrize("damage", ["arrays_truncated", "arrays_overwritten", "metadata_garbage"])
@pytest.mark.parametrize("with_target", [True, False])
def test_restore_pytree_corrupt_checkpoint(tmp_path, damage, with_target):
    tree = _state(3.0)
    path = ckpt.save_pytree(tmp_path / "c", tree)
    {"arrays_truncated": lambda: _damage_arrays(path, "truncate"),
     "arrays_overwritten": lambda: _damage_arrays(path, "garbage"),
     "metadata_garbage": lambda: Path(path, "_METADATA").write_text("{garbage")}[damage]()
    with pytest.raises(ValueError, match=rf"checkpoint '{path}' is corrupt") as info:
        ckpt.restore_pytree(path, tree if with_target else None)
    assert len(str(info.value).splitlines()) == 1 and len(str(info.value)) < 600


# ----------------------------------------------------------------------------- saved benchmarks


BENCH_CASES = {
    "meta_invalid_json": (_write("benchmark.json", '{"format": "jaxunlearn-benchmark", '),
                          r"benchmark\.json is corrupt \(invalid JSON"),
    "meta_not_an_object": (_write("benchmark.json", "[]"), r"benchmark\.json is corrupt \(expected a JSON object"),
    "meta_not_utf8": (_write("benchmark.json", b'{"format": "\xff"}'), r"benchmark\.json is not valid UTF-8"),
    "meta_bad_splits": (_json_edit("benchmark.json", lambda m: m.update(splits=["forget01"])),
                        r"benchmark\.json is corrupt \('splits' must map split names to row counts"),
    "data_dir_missing": (_remove("data"), r"benchmark data directory .*/b/data is missing"),
    "arrow_missing": (_remove(ARROW), r"data/forget05/data-00000-of-00001\.arrow is missing \(listed in "
                                      r".*forget05/state\.json\)"),
    "arrow_truncated": (_truncate(ARROW), r"data/forget05/data-00000-of-00001\.arrow is corrupt \("),
    "arrow_overwritten": (_write(ARROW, b"garbage" * 40), r"data/forget05/data-00000-of-00001\.arrow is corrupt \("),
    "arrow_empty": (_write(ARROW, b""), r"data/forget05/data-00000-of-00001\.arrow is corrupt \("),
    "dataset_dict_missing": (_remove("data/dataset_dict.json"), r"data/dataset_dict\.json is missing"),
    "dataset_dict_corrupt": (_write("data/dataset_dict.json", "{oops"), r"data/dataset_dict\.json is corrupt"),
    "state_missing": (_remove("data/forget05/state.json"), r"data/forget05/state\.json is missing"),
    "state_corrupt": (_write("data/forget05/state.json", "{oops"), r"data/forget05/state\.json is corrupt"),
    "state_bad_files": (_json_edit("data/forget05/state.json", lambda s: s.update(_data_files="x")),
                        r"data/forget05/state\.json is corrupt \('_data_files'"),
    "info_corrupt": (_write("data/forget05/dataset_info.json", b"\x00\x01"),
                     r"data/forget05/dataset_info\.json is corrupt"),
    "split_dir_missing": (_remove("data/forget05"), r"data/forget05/state\.json is missing"),
    "tokenizer_dir_missing": (_remove("tokenizer"), r"tokenizer directory .*/b/tokenizer is missing"),
    "tokenizer_json_corrupt": (_truncate("tokenizer/tokenizer.json"), r"tokenizer/tokenizer\.json is corrupt"),
    "tokenizer_config_corrupt": (_write("tokenizer/tokenizer_config.json", "{"),
                                 r"tokenizer/tokenizer_config\.json is corrupt"),
}


@pytest.mark.parametrize("case", sorted(BENCH_CASES))
def test_bad_benchmark_files_are_named(bench_dir, tmp_path, case):
    edit, match = BENCH_CASES[case]
    d = _copy(bench_dir, tmp_path / "b")
    edit(d)
    with pytest.raises(ValueError, match=match) as info:          # never FileNotFoundError: benchmark.json exists
        load_benchmark(d)
    assert not isinstance(info.value, FileNotFoundError)
    if not case.startswith("meta_"):
        assert "benchmark.json" not in str(info.value)            # the data files are blamed, not the metadata


def test_only_a_missing_benchmark_json_is_file_not_found(bench_dir, tmp_path):
    d = _copy(bench_dir, tmp_path / "b")
    (d / "benchmark.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"is not a saved benchmark \(no benchmark\.json\)"):
        load_benchmark(d)


# ----------------------------------------------------------------------------- TOFU files


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _parquet_bytes(rows):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


TOFU_CASES = {
    "json_lines_latin1": ("forget01.json",
                          _jsonl(ROWS[:1]) + '{"question": "Qui?", "answer": "Ren\xe9e"}\n'.encode("latin-1"),
                          r"forget01\.json is not valid UTF-8: byte 0xe9 at offset 88 \(line 2\)"),
    "jsonl_bad_byte": ("retain90.jsonl", b"\x80" + _jsonl(ROWS),
                       r"retain90\.jsonl is not valid UTF-8: byte 0x80 at offset 0 \(line 1\)"),
    "json_array_bad_byte": ("retain99.json", b'[{"question": "a", "answer": "b\xff"}]',
                            r"retain99\.json is not valid UTF-8: byte 0xff at offset 31 \(line 1\)"),
    "parquet_garbage": ("forget05.parquet", b"PAR1 this is not parquet", r"forget05\.parquet is corrupt \("),
    "parquet_truncated": ("forget10.parquet", _parquet_bytes(ROWS)[:-20], r"forget10\.parquet is corrupt \("),
    "parquet_empty_file": ("holdout.parquet", b"", r"holdout\.parquet is corrupt \("),
    "hub_layout_shard_corrupt": ("real_authors/train-00000-of-00001.parquet", _parquet_bytes(ROWS)[:40],
                                 r"real_authors/train-00000-of-00001\.parquet is corrupt \("),
}


@pytest.mark.parametrize("case", sorted(TOFU_CASES))
def test_bad_tofu_files_are_named(tmp_path, case):
    rel, data, match = TOFU_CASES[case]
    f = tmp_path / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)
    split = rel.split("/")[0].split(".")[0]
    with pytest.raises(ValueError, match=match):
        load_tofu(tmp_path, split)
    with pytest.raises(ValueError, match=match):                   # every split of the directory
        load_tofu(tmp_path)
    if "/" not in rel:
        with pytest.raises(ValueError, match=match):               # the file itself
            load_tofu(f)


def test_tofu_utf8_bom_is_accepted(tmp_path):
    (tmp_path / "forget01.json").write_bytes(b"\xef\xbb\xbf" + _jsonl(ROWS))
    assert load_tofu(tmp_path, "forget01").to_list() == ROWS
