"""Data-parallel (``jax.shard_map``) Fisher and gradient importances against a per-example loop.

Reference: one jitted ``jax.grad`` of the single-example decoder loss per example, squared
(or not) and averaged in float64 numpy with the example weights; it shares no code with the
sharded paths (shard_map, param gathers, psum / psum_scatter, chunked vmap, fused taps).
Tolerance: float32, ``rtol 1e-4`` plus ``atol 1e-6 * max|F|`` per leaf for entries near 0
(the sharded sums are added in another order).

Model: a 1-layer Qwen2-shaped decoder (hidden 32, 4 heads, 2 kv heads, vocab 64, q/k/v biases, so
1-D tp-sharded leaves occur), random values in every leaf. The generic paths (mean gradient,
importances, sampled labels) use a linear softmax classifier with closed-form gradients.
Meshes on the 8 forced CPU devices: ``fsdp=8``, ``fsdp=4,tp=2``, ``data=2,fsdp=4``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxunlearn import fisher as fi
from jaxunlearn import fisher_fused as ff
from jaxunlearn import reduction as rd
from jaxunlearn import sharding as sh
from jaxunlearn.models import Decoder, DecoderFn, ModelConfig

B, T = 8, 8
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                  num_kv_heads=2, architecture="qwen2")
REMAT = "Involuntary full rematerialization"


class _Setup:
    def __init__(self):
        graphdef, shapes = nnx.split(nnx.eval_shape(lambda: Decoder(CFG, rngs=nnx.Rngs(0))), nnx.Param)
        rng = np.random.default_rng(1)
        self.graphdef = graphdef
        self.params = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), shapes)
        self.loss = DecoderFn(graphdef).example_nll
        self.grad = jax.jit(jax.grad(self.loss))
        self.batch = self.make_batch(0, B)
        self.odd = self.make_batch(1, 6)  # 6 rows: not divisible by 8 or 4 data shards

    @staticmethod
    def make_batch(seed, size):
        r = np.random.default_rng(seed)
        lm = np.zeros((size, T), np.float32)
        lm[:, 4:] = 1.0
        am = np.ones((size, T), np.int32)
        am[1, :2] = 0  # left padding
        w = np.ones(size, np.float32)
        w[2], w[3] = 0.0, 0.5  # a masked row and a fractional weight
        ids = r.integers(0, CFG.vocab_size, (size, T)).astype(np.int32)
        ids[2] = CFG.vocab_size + 5  # the weight-0 row is garbage (out-of-range ids: NaN logits)
        return {"input_ids": ids, "attention_mask": am, "loss_mask": lm, fi.WEIGHT_KEY: w}

    def loop(self, batch, power):
        """``sum_n w_n g_n**power / sum_n w_n`` (power 1: mean gradient; 2: Fisher), float64."""
        w = batch[fi.WEIGHT_KEY]
        acc = None
        for n in np.flatnonzero(w > 0):
            ex = {k: batch[k][n] for k in ("input_ids", "attention_mask", "loss_mask")}
            g = [np.asarray(x, np.float64) ** power * w[n] for x in jax.tree.leaves(self.grad(self.params, ex))]
            acc = g if acc is None else [a + x for a, x in zip(acc, g)]
        return [a / w.sum() for a in acc]


@pytest.fixture(scope="module")
def setup():
    return _Setup()


def _assert_close(out, ref, rtol=1e-4, atol_rel=1e-6):
    leaves = jax.tree_util.tree_flatten_with_path(out)[0]
    assert len(leaves) == len(ref)
    for (path, a), b in zip(leaves, ref):
        name = jax.tree_util.keystr(path)
        assert a.dtype == jnp.float32 and a.shape == b.shape, name
        assert np.abs(b).max() > 0, name
        np.testing.assert_allclose(np.asarray(a), b, rtol=rtol, atol=atol_rel * np.abs(b).max(), err_msg=name)


def _assert_sharded_like(out, params):
    for a, p in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
        assert isinstance(a.sharding, NamedSharding) and a.sharding.is_equivalent_to(p.sharding, a.ndim), (
            a.sharding, p.sharding)


def _collectives(hlo: str, op: str) -> list[tuple[int, ...]]:
    """Result shapes of every ``op`` (e.g. ``all-gather``; tuple results give several) in HLO text."""
    shapes = []
    for line in hlo.splitlines():
        head, sep, _ = line.partition(f" {op}(")
        if not sep:
            head, sep, _ = line.partition(f" {op}-start(")
        if sep and "=" in head:
            for dims in re.findall(r"[a-z][a-z0-9]*\[([0-9,]*)\]", head.split("=", 1)[1]):
                shapes.append(tuple(int(d) for d in dims.split(",") if d))
    return shapes


# ---------------------------------------------------------------- vmap path


def test_vmap_fisher_sharded_batch_fsdp8(setup):
    mesh = sh.make_mesh("fsdp=8")
    params = sh.shard_params(setup.params, mesh)
    batch = sh.shard_batch(setup.batch, mesh)
    f = fi.fisher_diagonal(setup.loss, params, [batch], method="vmap", chunk_size=1)  # mesh from the params
    _assert_close(f, setup.loop(setup.batch, 2))
    _assert_sharded_like(f, params)


def test_vmap_fisher_fsdp_tp_pads_odd_host_batch(setup):
    """fsdp=4,tp=2, 6 host rows: padded to 8 with weight-0 rows, split over the 4 fsdp shards."""
    mesh = sh.make_mesh("fsdp=4,tp=2")
    params = sh.shard_params(setup.params, mesh)
    f = fi.fisher_diagonal(setup.loss, params, [setup.odd], method="vmap", chunk_size=2, mesh=mesh)
    _assert_close(f, setup.loop(setup.odd, 2))
    _assert_sharded_like(f, params)


def _remat_control(mesh, capfd):
    """The global path (no shard_map) on a tiny embedding loss does warn: the capture works."""
    emb = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P(None, "fsdp")))
    ids = sh.shard_batch(np.arange(64, dtype=np.int32).reshape(8, 8), mesh)
    rd.accumulate.lower(
        {"emb": jnp.zeros((64, 32))}, jnp.zeros(()), {"emb": emb}, {"ids": ids}, jnp.ones(8), None,
        local_sums=fi.PerExampleSums(_emb_loss, chunk_size=2)).compile()
    return capfd.readouterr().err


def _emb_loss(p, ex):
    return jnp.sum(jnp.tanh(p["emb"][ex["ids"]]))


def test_vmap_data_fsdp_hlo_has_no_remat_and_no_per_example_gather(setup, capfd):
    """data=2,fsdp=4: the global path makes XLA warn here; the shard_map path must not."""
    mesh = sh.make_mesh("data=2,fsdp=4")
    capfd.readouterr()
    assert REMAT in _remat_control(mesh, capfd)
    params = sh.shard_params(setup.params, mesh)
    batch = sh.shard_batch(setup.batch, mesh)
    examples, weight = rd.split_weight(batch)
    m, specs = rd.placement(None, params, examples, "test")
    assert m == mesh
    acc, total = rd.zeros(params, mesh, specs)
    args = (acc, total, params, examples, weight, None)
    local = fi.fisher_local_sums(setup.loss, method="vmap", chunk_size=1)  # what fisher_diagonal runs
    compiled = rd.accumulate.lower(*args, local_sums=local, mesh=mesh, specs=specs).compile()
    assert REMAT not in capfd.readouterr().err

    hlo = compiled.as_text()
    param_shapes = {tuple(x.shape) for x in jax.tree.leaves(setup.params)}
    biggest = max(x.size for x in jax.tree.leaves(setup.params))
    gathers = _collectives(hlo, "all-gather")
    assert gathers, "FSDP params should be all-gathered inside the shard_map"
    for s in gathers:  # parameters (or parts) only: nothing with a per-example axis
        assert int(np.prod(s)) <= biggest, s
        assert not (s[0] <= B and s[1:] in param_shapes and s not in param_shapes), s  # (chunk, *leaf)
    scatters = _collectives(hlo, "reduce-scatter")
    sharded = [p for p in jax.tree.leaves(params) if not p.sharding.is_fully_replicated]
    assert len(scatters) == len(sharded)  # each fsdp-sharded leaf's sum is reduce-scattered...
    block = max(p.addressable_shards[0].data.size for p in jax.tree.leaves(params))
    for s in _collectives(hlo, "all-reduce"):  # ...then summed over "data": one device's block at most
        assert int(np.prod(s)) <= block, s

    acc, total = compiled(*args)
    f = rd.finish(acc, total, "test", True)
    _assert_close(f, setup.loop(setup.batch, 2))
    _assert_sharded_like(f, params)


# ---------------------------------------------------------------- fused path


def test_fused_fisher_fsdp8_pads_odd_batch(setup):
    """fsdp=8 with 6 host rows: padded to 8 with weight-0 rows (2 of the 8 shards hold padding only)."""
    mesh = sh.make_mesh("fsdp=8")
    params = sh.shard_params(setup.params, mesh)
    f = ff.fisher_diagonal_fused(setup.graphdef, params, [setup.odd], mesh=mesh)
    _assert_close(f, setup.loop(setup.odd, 2))
    _assert_sharded_like(f, params)
    auto = fi.fisher_diagonal(setup.loss, params, [setup.odd], mesh=mesh)  # the adapter's loss: the fused path
    for x, y in zip(jax.tree.leaves(auto), jax.tree.leaves(f)):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- generic losses: importances, sampling
#
# A linear softmax classifier, logits = x W + b, with closed-form per-example gradients
# dW = x (p - e_y)^T, db = p - e_y: the sharded machinery is loss-agnostic, and this compiles fast.
D, V = 8, 16


def _lin_loss(params, ex):
    logits = ex["x"] @ params["w"] + params["b"]
    return -jax.nn.log_softmax(logits)[ex["y"]]


def _lin_sample(params, ex, key):
    return {**ex, "y": jax.random.categorical(key, ex["x"] @ params["w"] + params["b"]).astype(ex["y"].dtype)}


def _lin_grads(params, x, y):
    """Per-example ``(dW (N, D, V), db (N, V))`` in float64 numpy."""
    w, b = (np.asarray(params[k], np.float64) for k in ("w", "b"))
    logits = np.asarray(x, np.float64) @ w + b
    p = np.exp(logits - logits.max(-1, keepdims=True))
    delta = p / p.sum(-1, keepdims=True) - np.eye(V)[np.asarray(y)]
    return np.asarray(x, np.float64)[:, :, None] * delta[:, None, :], delta


def _lin_setup(mesh):
    """Host params, the same placed on ``mesh`` (w: (fsdp, tp), b: (tp,); tp if present), a 6-row batch."""
    rng = np.random.default_rng(4)
    params = {"w": rng.normal(size=(D, V)).astype(np.float32), "b": rng.normal(size=V).astype(np.float32)}
    tp = "tp" if "tp" in mesh.shape else None
    placed = {"w": jax.device_put(params["w"], NamedSharding(mesh, P("fsdp", tp))),
              "b": jax.device_put(params["b"], NamedSharding(mesh, P(tp)))}
    x = rng.normal(size=(6, D)).astype(np.float32)
    x[1] = np.nan  # a weight-0 row of garbage
    batch = {"x": x, "y": rng.integers(0, V, 6).astype(np.int32),
             fi.WEIGHT_KEY: np.array([1.0, 0.0, 2.0, 0.5, 1.0, 1.0], np.float32)}
    return params, placed, batch


def test_mean_grad_and_importances_sharded():
    """fsdp=4,tp=2, 6 rows (padded to 8): batch-gradient and per-example importances, closed form."""
    mesh = sh.make_mesh("fsdp=4,tp=2")
    params, placed, batch = _lin_setup(mesh)
    w = batch[fi.WEIGHT_KEY].astype(np.float64)
    keep = w > 0
    dw, db = _lin_grads(params, batch["x"][keep], batch["y"][keep])

    def mean(g):
        return np.einsum("n,n...->...", w[keep], g) / w[keep].sum()

    g = fi.mean_grad(_lin_loss, placed, [batch])  # mesh from the params
    np.testing.assert_allclose(g["w"], mean(dw), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g["b"], mean(db), rtol=1e-5, atol=1e-6)
    _assert_sharded_like(g, placed)
    ma = fi.grad_importance(_lin_loss, placed, [batch], kind="mean_abs", chunk_size=1, mesh=mesh)
    np.testing.assert_allclose(ma["w"], mean(np.abs(dw)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ma["b"], mean(np.abs(db)), rtol=1e-5, atol=1e-6)
    _assert_sharded_like(ma, placed)


def test_sampled_labels_sharded_use_global_example_keys():
    """Example n of batch b draws with fold_in(fold_in(rng, b), n), whatever shard holds it."""
    mesh = sh.make_mesh("data=2,fsdp=4")
    params, placed, _ = _lin_setup(mesh)
    rng = np.random.default_rng(5)
    batches = [{"x": rng.normal(size=(n, D)).astype(np.float32), "y": np.zeros(n, np.int32)} for n in (8, 5)]
    key = jax.random.key(3)
    f = fi.fisher_diagonal(_lin_loss, placed, [sh.shard_batch(batches[0], mesh), batches[1]], chunk_size=1,
                           labels="sampled", rng=key, sample_fn=_lin_sample)
    draw = jax.jit(lambda ex, b, n: _lin_sample(params, ex, jax.random.fold_in(jax.random.fold_in(key, b), n)))
    xs, ys = [], []
    for b, batch in enumerate(batches):
        for n in range(len(batch["y"])):
            xs.append(batch["x"][n])
            ys.append(int(draw({"x": batch["x"][n], "y": batch["y"][n]}, b, n)["y"]))
    assert len(set(ys)) > 3  # the labels were drawn, not the data's zeros
    dw, db = _lin_grads(params, np.stack(xs), np.array(ys))
    np.testing.assert_allclose(f["w"], np.mean(dw**2, 0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f["b"], np.mean(db**2, 0), rtol=1e-5, atol=1e-7)
    _assert_sharded_like(f, placed)


# ---------------------------------------------------------------- errors


def test_bad_mesh_arguments(setup):
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        fi.fisher_diagonal(setup.loss, setup.params, [setup.batch], method="vmap", mesh="fsdp=8")
    params = sh.shard_params(setup.params, sh.make_mesh("fsdp=8"))
    with pytest.raises(ValueError, match="not on the mesh of this call"):
        fi.fisher_diagonal(setup.loss, params, [setup.batch], method="vmap", mesh=sh.make_mesh("fsdp=4,tp=2"))
    with pytest.raises(ValueError, match="not on the mesh of this call"):
        ff.fisher_diagonal_fused(setup.graphdef, params, [setup.batch], mesh=sh.make_mesh("data=2,fsdp=4"))
