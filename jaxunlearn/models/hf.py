"""Read and write Hugging Face checkpoints (``config.json`` + safetensors + tokenizer) without torch.

Tensor names map one to one onto :class:`~jaxunlearn.models.Decoder` parameters; torch
``nn.Linear`` weights are ``(out, in)`` and our kernels ``(in, out)``, so linear weights are
transposed both ways::

    model.embed_tokens.weight                          embed/embedding
    model.layers.{i}.input_layernorm.weight            layers/{i}/attn_norm/scale
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   layers/{i}/attn/{q,k,v,o}_proj/kernel   (T)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.bias     layers/{i}/attn/{q,k,v,o}_proj/bias
    model.layers.{i}.post_attention_layernorm.weight   layers/{i}/mlp_norm/scale
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    layers/{i}/mlp/{gate,up,down}_proj/kernel (T)
    model.norm.weight                                  norm/scale
    lm_head.weight                                     lm_head/kernel                          (T)

With ``scan_layers=True`` (stacked blocks) the same per-layer tensors are read into and written
from row ``i`` of the stacked leaves (``layers/{sub}`` of shape ``(L, ...)``): a checkpoint does not
depend on the layout it was saved from or is loaded into.

With tied embeddings a checkpoint may omit ``lm_head.weight`` or store a copy of the embedding.
Rotary ``inv_freq`` buffers of old checkpoints are ignored (RoPE is recomputed from the config).

Checkpoint directories are untrusted input: ``transformers`` is always called with
``trust_remote_code=False`` (an ``auto_map`` pointing at Python files in the directory is never
executed, and no prompt is shown), corrupt or truncated files raise ``ValueError`` naming the
file, and tensors holding NaN or Inf are refused both on load and on save.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn.errors import reason
from jaxunlearn.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from jaxunlearn.models.decoder import Decoder
from jaxunlearn.outputs import umask_mode
from jaxunlearn.validate import check_bool

__all__ = [
    "from_pretrained",
    "save_pretrained",
    "load_config",
    "hf_tensor_map",
    "check_tokenizer",
    "parse_size",
]

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def hf_tensor_map(config: ModelConfig) -> dict[str, tuple[tuple[str | int, ...], bool]]:
    """``{hf_tensor_name: (path into the pure param dict, transpose?)}`` for every parameter.

    Args:
      config: the model's :class:`ModelConfig` (decides biases and the lm_head).

    Returns:
      Ordered mapping; paths index ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``. With
      ``config.scan_layers`` a block tensor's path ends with the layer index, which indexes the
      leading axis of the stacked leaf (``("layers", "attn", "q_proj", "kernel", i)``); unrolled
      it is ``("layers", i, "attn", "q_proj", "kernel")``. ``node = node[k]`` along the path
      reaches the tensor in both.
    """
    out: dict[str, tuple[tuple[str | int, ...], bool]] = {
        "model.embed_tokens.weight": (("embed", "embedding"), False)
    }
    for i in range(config.num_layers):
        hf = f"model.layers.{i}"

        def ours(*p, i=i):
            return ("layers",) + p + (i,) if config.scan_layers else ("layers", i) + p

        out[f"{hf}.input_layernorm.weight"] = (ours("attn_norm", "scale"), False)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{hf}.self_attn.{name}.weight"] = (ours("attn", name, "kernel"), True)
            has_bias = config.o_bias if name == "o_proj" else config.qkv_bias
            if has_bias:
                out[f"{hf}.self_attn.{name}.bias"] = (ours("attn", name, "bias"), False)
        out[f"{hf}.post_attention_layernorm.weight"] = (ours("mlp_norm", "scale"), False)
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"{hf}.mlp.{name}.weight"] = (ours("mlp", name, "kernel"), True)
            if config.mlp_bias:
                out[f"{hf}.mlp.{name}.bias"] = (ours("mlp", name, "bias"), False)
    out["model.norm.weight"] = (("norm", "scale"), False)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (("lm_head", "kernel"), True)
    return out


def check_tokenizer(tokenizer: Any, config: ModelConfig) -> None:
    """Raise ``ValueError`` if the tokenizer can produce ids ``>= config.vocab_size``.

    ``len(tokenizer)`` (base vocabulary plus added tokens) must not exceed the embedding rows;
    a smaller tokenizer is fine (padded embedding tables are common).
    """
    n = len(tokenizer)
    if n > config.vocab_size:
        raise ValueError(
            f"tokenizer has {n} tokens but the model's vocab_size is {config.vocab_size}: "
            "ids >= vocab_size have no embedding"
        )


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"500MB"``, ``"2GB"``, ``"1GiB"``, ``"10KB"`` (HF convention:
    KB/MB/GB are powers of 10, KiB/MiB/GiB powers of 2)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be > 0, got {size}")
        return int(size)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r} (use e.g. 500MB, 2GB, 1GiB or an int of bytes)")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    value = int(float(m.group(1)) * mult)
    if value <= 0:
        raise ValueError(f"max_shard_size must be > 0, got {size!r}")
    return value


# --------------------------------------------------------------------------- loading


def _check_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"checkpoint path is not a directory: {path}")
    return path


def _is_remote_code_refusal(exc: BaseException) -> bool:
    """Whether ``transformers`` refused to run a directory's custom code (``trust_remote_code=False``)."""
    return isinstance(exc, ValueError) and "trust_remote_code" in str(exc)


def load_config(path: str | os.PathLike, *, dtype: str | None = None,
                param_dtype: str | None = None, scan_layers: bool = False) -> ModelConfig:
    """Read ``path/config.json`` into a :class:`ModelConfig` (via ``transformers.AutoConfig``).

    ``AutoConfig`` runs with ``trust_remote_code=False``: an ``auto_map`` in ``config.json`` is
    never executed (the built-in class of the supported ``model_type`` is used).

    Args:
      path: the checkpoint directory.
      dtype: compute dtype (default ``"float32"``).
      param_dtype: parameter dtype (default: ``dtype``).
      scan_layers: :attr:`ModelConfig.scan_layers` of the result (not part of ``config.json``).

    Returns:
      The :class:`ModelConfig`.

    Raises:
      FileNotFoundError: the directory or its ``config.json`` is missing.
      ValueError: the ``model_type`` or architecture is not supported (named in the message);
        ``config.json`` is not UTF-8 JSON, not an object, or has missing or invalid fields
        (the message names the file and the reason).
    """
    scan_layers = check_bool("load_config", "scan_layers", scan_layers)
    path = _check_dir(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint directory {path}")
    from jaxunlearn.data.io import read_json

    raw = read_json(cfg_file)
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_file} is corrupt (expected a JSON object, got {type(raw).__name__})")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported model_type {model_type!r} in {cfg_file}; supported: {SUPPORTED_ARCHITECTURES}")
    import transformers

    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True,
                                                            trust_remote_code=False)
    except Exception as e:
        if _is_remote_code_refusal(e):
            raise ValueError(
                f"{cfg_file} asks for custom code (auto_map {raw.get('auto_map')!r}): code from a "
                "checkpoint directory is never run (trust_remote_code=False)"
            ) from None
        raise ValueError(f"{cfg_file} is invalid ({reason(e)})") from None
    try:
        config = ModelConfig.from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
    except (ValueError, TypeError, KeyError, ArithmeticError) as e:
        msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {reason(e)}"
        raise ValueError(f"{cfg_file}: {msg}") from None
    return config.replace(scan_layers=True) if scan_layers else config


def _tensor_files(path: Path) -> tuple[dict[str, Path], list[Path]]:
    """``({tensor name: file}, files)``, from the index if there is one."""
    index = path / SAFE_INDEX
    single = path / SAFE_SINGLE
    if index.is_file():
        from jaxunlearn.data.io import read_json

        raw = read_json(index)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} is corrupt (it has no 'weight_map' object)")
        bad = [k for k, v in weight_map.items()
               if not isinstance(v, str) or not v or Path(v).is_absolute() or ".." in Path(v).parts]
        if bad:
            raise ValueError(f"{index} is corrupt ('weight_map' entry {bad[0]!r} -> {weight_map[bad[0]]!r} "
                             "is not a file name)")
        files = sorted({path / v for v in weight_map.values()})
        for fp in files:
            if not fp.is_file():
                raise FileNotFoundError(f"shard {fp.name} listed in {index.name} is missing from {path}")
        return {k: path / v for k, v in weight_map.items()}, files
    if single.is_file():
        return {}, [single]
    others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".h5", ".msgpack"))
    hint = f" (found {others}: only safetensors are supported)" if others else ""
    raise FileNotFoundError(f"no {SAFE_SINGLE} or {SAFE_INDEX} in {path}{hint}")


def _iter_tensors(path: Path) -> Iterator[tuple[str, Any, Path]]:
    """Yield ``(name, open safetensors handle, file)`` for every tensor; checks the index agrees."""
    from safetensors import safe_open

    weight_map, files = _tensor_files(path)
    for fp in files:
        try:
            handle = safe_open(str(fp), framework="np")
        except Exception as e:  # SafetensorError: bad header, truncated file
            raise ValueError(f"{fp} is corrupt ({reason(e)})") from None
        with handle as f:
            keys = list(f.keys())
            for k in keys:
                if weight_map and weight_map.get(k) != fp:
                    where = weight_map.get(k)
                    raise ValueError(
                        f"tensor '{k}' is in {fp.name} but {SAFE_INDEX} maps it to "
                        f"{where.name if where else 'nothing'}"
                    )
                yield k, f, fp
        if weight_map:
            listed = {k for k, v in weight_map.items() if v == fp}
            absent = sorted(listed - set(keys))
            if absent:
                raise ValueError(f"tensors {absent} are listed in {SAFE_INDEX} but missing from {fp.name}")


def _first_nonfinite(arr: np.ndarray) -> str | None:
    """``"NaN"`` / ``"Inf"`` if a float array holds one, else None (min/max: two passes, no copy)."""
    if arr.size == 0 or not jnp.issubdtype(arr.dtype, jnp.inexact):
        return None
    with np.errstate(invalid="ignore"):
        lo, hi = arr.min(), arr.max()
    if np.isfinite(lo) and np.isfinite(hi):
        return None
    return "NaN" if np.isnan(lo) or np.isnan(hi) else "Inf"


def _read_tensor(handle: Any, name: str, fp: Path) -> np.ndarray:
    """Tensor ``name`` of an open safetensors file, as numpy; corrupt data and NaN/Inf are refused."""
    try:
        arr = np.asarray(handle.get_tensor(name))
    except Exception as e:
        raise ValueError(f"{fp} is corrupt: cannot read tensor '{name}' ({reason(e)})") from None
    bad = _first_nonfinite(arr)
    if bad is not None:
        raise ValueError(f"tensor '{name}' in {fp} holds {bad} values: refusing to load a corrupt or "
                         "diverged checkpoint")
    return arr


def from_pretrained(path: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None,
                    load_tokenizer: bool = True, scan_layers: bool = False) -> tuple[Decoder, Any]:
    """Load a Llama / Qwen2 / Mistral checkpoint directory written by ``transformers``.

    Args:
      path: directory with ``config.json``, ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json``) and optionally tokenizer files.
      dtype: compute dtype (default ``"float32"``).
      param_dtype: parameter dtype (default: ``dtype``); tensors are cast on load.
      load_tokenizer: load the tokenizer with ``transformers.AutoTokenizer`` when its files exist.
      scan_layers: load into the stacked layout (:attr:`ModelConfig.scan_layers`): each
        ``model.layers.{i}.*`` tensor fills row ``i`` of its stacked leaf (host buffers of the
        stacked size, no second copy of the layers).

    Returns:
      ``(model, tokenizer or None)``.

    Raises:
      FileNotFoundError: missing directory, ``config.json`` or weight files (named).
      ValueError: unsupported architecture; a missing, unexpected or wrongly shaped tensor (named);
        a tensor holding NaN or Inf (named with its file); a corrupt or truncated file
        (``config.json``, a safetensors file, the shard index, the tokenizer files: named); a
        tokenizer that asks for custom code (never run); a tokenizer larger than the vocabulary.
    """
    path = _check_dir(path)
    config = load_config(path, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
    tensor_map = hf_tensor_map(config)
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    if config.scan_layers:  # stacked leaves: host buffers whose rows the per-layer tensors fill
        pure["layers"] = jax.tree.map(lambda a: np.empty(a.shape, a.dtype), pure["layers"])

    def target(p):
        node = pure
        for k in p:
            node = node[k]
        return node

    def assign(p, value):
        node = pure
        for k in p[:-1]:
            node = node[k]
        node[p[-1]] = value

    seen: set[str] = set()
    tied_copy = None
    wdt = config.weight_dtype
    for name, handle, fp in _iter_tensors(path):
        if name in seen:
            raise ValueError(f"tensor '{name}' appears twice (second time in {fp.name})")
        seen.add(name)
        if _IGNORED.match(name):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            tied_copy = (_read_tensor(handle, name, fp), fp)
            continue
        if name not in tensor_map:
            raise ValueError(
                f"unexpected tensor '{name}' in {fp.name}: not a parameter of a {config.architecture} "
                f"model with this config"
            )
        p, transpose = tensor_map[name]
        want = tuple(target(p).shape)
        try:
            shape = tuple(handle.get_slice(name).get_shape())
        except Exception as e:
            raise ValueError(f"{fp} is corrupt: cannot read tensor '{name}' ({reason(e)})") from None
        hf_want = want[::-1] if transpose else want
        if shape != hf_want:
            raise ValueError(f"tensor '{name}' in {fp.name} has shape {shape}, expected {hf_want} from config.json")
        arr = _read_tensor(handle, name, fp)
        if transpose:
            arr = arr.T
        value = arr.astype(wdt)
        assign(p, value if isinstance(p[-1], int) else jnp.asarray(value))  # an int last: a stacked row
    missing = [n for n in tensor_map if n not in seen]
    if missing:
        raise ValueError(f"checkpoint {path} is missing tensors {missing}")
    if config.scan_layers:
        pure["layers"] = jax.tree.map(jnp.asarray, pure["layers"])
    if tied_copy is not None:
        emb = np.asarray(pure["embed"]["embedding"])               # already cast to param_dtype
        copy = tied_copy[0].astype(wdt)
        if copy.shape != emb.shape or not np.array_equal(copy.astype(np.float32), emb.astype(np.float32)):
            raise ValueError(
                f"tensor 'lm_head.weight' in {tied_copy[1].name} differs from model.embed_tokens.weight "
                "but config.json sets tie_word_embeddings=True"
            )
    nnx.replace_by_pure_dict(state, pure)
    model = nnx.merge(graphdef, state)
    tokenizer = None
    if load_tokenizer and any((path / f).is_file() for f in _TOKENIZER_FILES):
        from jaxunlearn.data.io import load_tokenizer as _load_tokenizer

        tokenizer = _load_tokenizer(path)
        check_tokenizer(tokenizer, config)
    return model, tokenizer


# --------------------------------------------------------------------------- saving


def _hf_tensors(model: Decoder) -> dict[str, np.ndarray]:
    """HF-named numpy copies of the model's parameters (host memory); NaN/Inf raise ``ValueError``."""
    config = model.config
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if config.scan_layers:  # one host copy of each stacked leaf; rows are views
        pure["layers"] = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), pure["layers"])
    used: set[tuple] = set()
    out: dict[str, np.ndarray] = {}
    for name, (p, transpose) in hf_tensor_map(config).items():
        node = pure
        for k in p:
            node = node[k]
        if config.scan_layers and isinstance(p[-1], int):
            p = p[:-1]  # a row of a stacked leaf: the leaf counts as used (all rows are in the map)
        arr = np.asarray(jax.device_get(node))
        bad = _first_nonfinite(arr)
        if bad is not None:
            raise ValueError(f"refusing to save: tensor '{name}' (parameter {'/'.join(map(str, p))}) "
                             f"holds {bad} values")
        out[name] = np.ascontiguousarray(arr.T if transpose else arr)
        used.add(tuple(p))
    flat = jax.tree_util.tree_flatten_with_path(pure)[0]
    left = ["/".join(str(getattr(k, "key", k)) for k in kp) for kp, _ in flat
            if tuple(getattr(k, "key", k) for k in kp) not in used]
    if left:
        raise ValueError(f"parameters {left} have no Hugging Face name; cannot save this model")
    return out


def _shards(tensors: dict[str, np.ndarray], max_bytes: int | None) -> list[dict[str, np.ndarray]]:
    """Greedy split in name order; a tensor larger than ``max_bytes`` gets a shard of its own."""
    if max_bytes is None:
        return [tensors]
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    return shards

def save_pretrained(model: Decoder, path: str | os.PathLike, *, tokenizer: Any = None,
                    max_shard_size: int | str | None = None, overwrite: bool = True) -> Path:
    """Write ``model`` (and ``tokenizer``) as a Hugging Face checkpoint directory.

    Writes ``config.json`` (``model.config.to_hf()``), the weights as ``model.safetensors`` or, when
    they exceed ``max_shard_size``, as ``model-0000k-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``, and the tokenizer files. Everything is written into a
    temporary directory next to ``path`` and renamed into place at the end, so an interrupted save
    leaves no half-written checkpoint. The directory gets the mode a plain ``mkdir`` would give
    under the current umask (not ``mkdtemp``'s 0700). Nothing is written if a parameter holds
    NaN or Inf. The result loads with ``transformers``'
    ``AutoModelForCausalLM.from_pretrained`` and with :func:`from_pretrained`.

    Args:
      model: the :class:`~jaxunlearn.models.Decoder` (parameters must be addressable from this host).
      path: target directory.
      tokenizer: optional tokenizer with ``save_pretrained`` (checked against the vocabulary).
      max_shard_size: bytes (int) or a string like ``"2GB"``; ``None`` writes a single file.
      overwrite: replace an existing checkpoint at ``path`` (the old directory is swapped out whole,
        then deleted). A non-empty directory without ``config.json`` is never replaced.

    Returns:
      The target path.

    Raises:
      FileExistsError: ``path`` is a file, or a non-empty directory and ``overwrite`` is False or it
        holds no ``config.json``.
      ValueError: tokenizer larger than the vocabulary; bad ``max_shard_size``; a parameter holds
        NaN or Inf (the first one is named; nothing is written and an existing checkpoint at
        ``path`` is left as it was).
    """
    from safetensors.numpy import save_file

    if not isinstance(model, Decoder):
        raise TypeError(f"model must be a Decoder, got {type(model).__name__}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"cannot save a checkpoint to {path}: it is a file")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} exists and is not empty (overwrite=False)")
        if not (path / "config.json").is_file():
            raise FileExistsError(
                f"{path} is not empty and is not a checkpoint (no config.json): refusing to replace it"
            )
    max_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    if tokenizer is not None:
        check_tokenizer(tokenizer, model.config)
    hf_config = model.config.to_hf()
    tensors = _hf_tensors(model)
    shards = _shards(tensors, max_bytes)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    backup = None

    def plain_mode(p: Path, is_dir: bool = False) -> None:
        """Give ``p`` the mode ``mkdir`` / ``open`` would under the umask (mkdtemp and safetensors use 0o600/0o700)."""
        with contextlib.suppress(OSError):  # some filesystems refuse chmod: keep the restrictive mode there
            os.chmod(p, umask_mode(is_dir))

    try:
        plain_mode(tmp, is_dir=True)
        hf_config.save_pretrained(str(tmp))
        meta = {"format": "pt"}  # what transformers' torch loader expects
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SAFE_SINGLE), metadata=meta)
            plain_mode(tmp / SAFE_SINGLE)
        else:
            weight_map = {}
            n = len(shards)
            for k, shard in enumerate(shards, start=1):
                fname = f"model-{k:05d}-of-{n:05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                plain_mode(tmp / fname)
                weight_map.update({name: fname for name in shard})
            index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
                     "weight_map": weight_map}
            with open(tmp / SAFE_INDEX, "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if path.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            backup.rmdir()
            os.replace(path, backup)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup is not None and backup.exists() and not path.exists():
            os.replace(backup, path)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return path
