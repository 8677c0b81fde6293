"""``fake_quantize`` against bitsandbytes itself (CPU backend), on a tiny decoder's Hugging Face weights.

Each linear weight of the decoder blocks is taken in its Hugging Face ``(out, in)`` layout (through
``hf_tensor_map``), quantised and dequantised by bitsandbytes exactly as a ``transformers``
deployment does (``Params4bit``: ``quantize_4bit`` with blocksize 64, its stored codes and absmax
decoded as ``dequantize_4bit`` does; ``Int8Params``: float16, ``int8_vectorwise_quant``, then
``int8_vectorwise_dequant``), and compared
with our dequantised kernels, transposed. Embeddings, ``lm_head`` and norms must come back
untouched.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bitsandbytes as bnb  # noqa: E402  (the test extra: make test installs it)
import bitsandbytes.functional as F  # noqa: E402
import torch  # noqa: E402

from flax import nnx  # noqa: E402

from jaxunlearn import fake_quantize  # noqa: E402
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig  # noqa: E402
from jaxunlearn.models.hf import hf_tensor_map  # noqa: E402
from jaxunlearn.quant import FP4_LEVELS, NF4_LEVELS, quant_targets  # noqa: E402

# hidden 96 and intermediate 160 are not multiples of 64 (blocks run on across rows);
# hidden 128 is (each block is 64 input features of one output unit).
_CFGS = {
    "odd": dict(vocab_size=70, hidden_size=96, intermediate_size=160, num_layers=2, num_heads=3, num_kv_heads=1,
                architecture="qwen2"),
    "even": dict(vocab_size=50, hidden_size=128, intermediate_size=192, num_layers=1, num_heads=4, num_kv_heads=2),
}


def _model(name: str, dtype: str = "float32", seed: int = 0):
    cfg = ModelConfig(**_CFGS[name], dtype=dtype, param_dtype=dtype)
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # weights of varied magnitude per row and column, so blocks have different absmax
    rng = np.random.default_rng(seed)

    def vary(x):
        x = np.asarray(x, np.float32)
        scale = np.exp(rng.normal(size=x.shape[-1:]) * 0.7) * (np.exp(rng.normal(size=x.shape[:1]) * 0.7)[:, None]
                                                                if x.ndim == 2 else 1.0)
        return jnp.asarray(rng.normal(size=x.shape) * 0.05 * scale, dtype)

    return cfg, jax.tree.map(vary, pure)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _is_block_linear(hf_name: str) -> bool:
    """The ``nn.Linear`` weights ``transformers`` replaces by bitsandbytes layers (all but ``lm_head``)."""
    return hf_name.startswith("model.layers.") and hf_name.endswith("_proj.weight")


def _bnb_4bit(w_hf: np.ndarray, dtype: str, quant_type: str) -> np.ndarray:
    """``quantize_4bit(W, blocksize=64)``; what it stores (packed codes, absmax) decoded by the format:
    high nibble first, ``get_4bit_type(quant_type)[code] * absmax[flat_index // 64]``.

    bitsandbytes' own CPU ``dequantize_4bit`` is not used for that: in 0.50.2 on AVX-512 machines its
    C kernel reads the wrong absmax for rows whose width is a multiple of 32 but not of 64 (blocks
    that straddle rows), disagreeing with its own quantiser and with the flat-indexed pure-torch
    dequantiser of its default backend. It is checked where it is consistent (widths multiple of 64).
    """
    t = torch.from_numpy(np.ascontiguousarray(w_hf)).to(getattr(torch, dtype))
    packed, state = F.quantize_4bit(t, blocksize=64, quant_type=quant_type)
    assert state.blocksize == 64 and state.absmax.dtype == torch.float32 and state.state2 is None
    p = packed.reshape(-1).numpy()
    idx = np.stack([p >> 4, p & 15], axis=1).reshape(-1)[: w_hf.size]
    code = F.get_4bit_type(quant_type, device="cpu").numpy()
    absmax = state.absmax.numpy()
    out = (code[idx] * absmax[np.arange(w_hf.size) // 64]).astype(np.float32).reshape(w_hf.shape)
    if w_hf.shape[-1] % 64 == 0:  # bitsandbytes' dequantize_4bit agrees (in the input dtype)
        theirs = F.dequantize_4bit(packed, state)
        assert theirs.dtype == t.dtype
        np.testing.assert_array_equal(theirs.float().numpy(), torch.from_numpy(out).to(t.dtype).float().numpy())
    return out


def _bnb_int8(w_hf: np.ndarray, dtype: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(w_hf)).to(getattr(torch, dtype))
    p = bnb.nn.Int8Params(t, requires_grad=False, has_fp16_weights=False).to("cpu")  # quantises, as on load
    assert p.CB.dtype == torch.int8
    return F.int8_vectorwise_dequant(p.CB, p.SCB).numpy()


def _bnb(w_hf, dtype, scheme):
    return _bnb_int8(w_hf, dtype) if scheme == "int8" else _bnb_4bit(w_hf, dtype, scheme)


def test_level_tables_are_bitsandbytes():
    from bitsandbytes.functional import get_4bit_type

    for table, name in ((NF4_LEVELS, "nf4"), (FP4_LEVELS, "fp4")):
        ref = np.unique(get_4bit_type(name, device="cpu").numpy())  # sorted; +0 and -0 merge
        np.testing.assert_array_equal(table, ref)
        assert table.dtype == np.float32


@pytest.mark.parametrize("cfg_name", ["odd", "even"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scheme", ["fp4", "nf4", "int8"])
def test_dequantised_weights_equal_bitsandbytes(cfg_name, dtype, scheme):
    cfg, params = _model(cfg_name, dtype)
    q = jax.jit(functools.partial(fake_quantize, scheme=scheme))(params)
    n_linear = 0
    for name, (path, transpose) in hf_tensor_map(cfg).items():
        ours, orig = _get(q, path), _get(params, path)
        assert ours.dtype == orig.dtype
        if not _is_block_linear(name):  # embeddings, norms, biases, lm_head: untouched
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(orig), err_msg=name)
            continue
        n_linear += 1
        assert transpose
        w_hf = np.asarray(orig.astype(jnp.float32)).T
        ref = _bnb(w_hf, dtype, scheme)
        got = np.asarray(ours.astype(jnp.float32)).T
        if dtype == "float32":
            np.testing.assert_array_equal(got, ref, err_msg=name)  # bit for bit
        else:  # ours is cast back to the leaf's bfloat16; bitsandbytes returns float32
            ref16 = np.asarray(jnp.asarray(ref).astype(jnp.bfloat16).astype(jnp.float32))
            np.testing.assert_array_equal(got, ref16, err_msg=name)
        assert not np.array_equal(got, w_hf)
    assert n_linear == 7 * cfg.num_layers


def test_ties_and_boundaries_round_like_bitsandbytes():
    """Values exactly on (and one ulp around) every level midpoint, and exact levels."""
    for scheme, levels in (("nf4", NF4_LEVELS), ("fp4", FP4_LEVELS)):
        mid = ((levels[1:] + levels[:-1]) / np.float32(2)).astype(np.float32)
        vals = np.concatenate([mid, np.nextafter(mid, np.float32(2)), np.nextafter(mid, np.float32(-2)), levels])
        vals = np.concatenate([vals, np.zeros((-vals.size) % 63, np.float32)]).reshape(-1, 63)
        w_hf = np.concatenate([np.ones((vals.shape[0], 1), np.float32), vals], axis=1)  # absmax 1 per block
        ref = _bnb_4bit(w_hf, "float32", scheme)
        got = np.asarray(fake_quantize({"layers": [{"kernel": jnp.asarray(w_hf.T)}]}, scheme)["layers"][0]["kernel"]).T
        np.testing.assert_array_equal(got, ref)
    # int8: x * (127 / a) at exact half-integers rounds half to even, as torch.round
    w_hf = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5]], np.float32)
    got = np.asarray(fake_quantize({"layers": [{"kernel": jnp.asarray(w_hf.T)}]}, "int8")["layers"][0]["kernel"]).T
    np.testing.assert_array_equal(got, _bnb_int8(w_hf, "float32"))


def test_nnx_state_and_tied_embeddings():
    """On ``DecoderFn.of(model)``'s ``nnx.State``, with tied embeddings: same selection and values."""
    cfg = ModelConfig(**_CFGS["even"], tie_word_embeddings=True)
    model = Decoder(cfg, rngs=nnx.Rngs(3))
    _, state = DecoderFn.of(model)
    sel = quant_targets(state)
    flat = {"/".join(str(getattr(k, "key", k)) for k in p[:-1]): v
            for p, v in jax.tree_util.tree_flatten_with_path(sel)[0]}
    assert sum(flat.values()) == 7 and not flat["embed/embedding"]
    q = fake_quantize(state, "nf4")
    w = np.asarray(state["layers"][0]["mlp"]["down_proj"]["kernel"][...])
    np.testing.assert_array_equal(np.asarray(q["layers"][0]["mlp"]["down_proj"]["kernel"][...]).T,
                                  _bnb_4bit(np.ascontiguousarray(w.T), "float32", "nf4"))
    np.testing.assert_array_equal(q["embed"]["embedding"][...], state["embed"]["embedding"][...])
