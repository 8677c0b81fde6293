"""Bad numerical inputs: config validation, projection under/overflow, NaN checks, traced scalars.

Every refusal asserts the exception type and that the message names the offending field,
argument or leaf path; every numerical fix is compared with an independent float64 numpy
reference.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as PS

import jaxunlearn as ju
from jaxunlearn import validate as V
from jaxunlearn.kernels import projection as kp
from jaxunlearn.projection import orthogonal_projection, project_orthogonal, project_tree
from jaxunlearn.quant import fake_quantize, fake_quantize_leaf, quantize_leaf
from jaxunlearn.unlearn import UnlearnConfig

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- jaxunlearn.validate


@pytest.mark.parametrize(
    "fn,args,kwargs,exc,msg",
    [
        (V.check_int, ("Cfg", "steps", 2.5), {}, TypeError, "Cfg.steps must be an int, got 2.5"),
        (V.check_int, ("Cfg", "steps", 2.0), {}, TypeError, "Cfg.steps must be an int, got 2.0"),
        (V.check_int, ("Cfg", "steps", True), {}, TypeError, "Cfg.steps must be an int, got True"),
        (V.check_int, ("Cfg", "steps", "3"), {}, TypeError, "Cfg.steps must be an int, got '3'"),
        (V.check_int, ("Cfg", "steps", -1), {"min": 0}, ValueError, "Cfg.steps must be an int >= 0, got -1"),
        (V.check_float, ("Cfg", "lr", NAN), {"min": 0.0, "min_exclusive": True}, ValueError,
         "Cfg.lr must be a finite number > 0, got nan"),
        (V.check_float, ("Cfg", "lr", 0), {"min": 0.0, "min_exclusive": True}, ValueError,
         "Cfg.lr must be a finite number > 0, got 0"),
        (V.check_float, ("Cfg", "wd", -0.5), {"min": 0.0}, ValueError, "Cfg.wd must be a finite number >= 0, got -0.5"),
        (V.check_float, ("Cfg", "delta", INF), {}, ValueError, "Cfg.delta must be a finite number, got inf"),
        (V.check_float, ("Cfg", "delta", -INF), {}, ValueError, "Cfg.delta must be a finite number, got -inf"),
        (V.check_float, ("Cfg", "lr", False), {}, TypeError, "Cfg.lr must be a number (int or float), got False"),
        (V.check_float, ("Cfg", "lr", "1e-4"), {}, TypeError, "Cfg.lr must be a number (int or float), got '1e-4'"),
        (V.check_float, ("Cfg", "lr", None), {}, TypeError, "Cfg.lr must be a number (int or float), got None"),
        (V.check_float, ("Cfg", "lr", 1j), {}, TypeError, "Cfg.lr must be a number (int or float), got 1j"),
        (V.check_float, ("Cfg", "beta", 0.0), {"min": 0.0, "min_exclusive": True, "allow_none": True}, ValueError,
         "Cfg.beta must be a finite number > 0 or None, got 0.0"),
        (V.check_bool, ("Cfg", "project", 1), {}, TypeError, "Cfg.project must be a bool, got 1"),
        (V.check_bool, ("Cfg", "project", "yes"), {}, TypeError, "Cfg.project must be a bool, got 'yes'"),
        (V.check_choice, ("Cfg", "method", "rmu", ("ga", "npo")), {}, ValueError,
         "Cfg.method must be one of ('ga', 'npo'), got 'rmu'"),
        (V.check_choice, ("Cfg", "method", 1, ("ga", "npo")), {}, TypeError,
         "Cfg.method must be a str, one of ('ga', 'npo'), got 1"),
        (V.check_choice, ("Cfg", "k", True, (1, 2)), {}, ValueError, "Cfg.k must be one of (1, 2), got True"),
    ],
)
def test_validate_helpers_refuse(fn, args, kwargs, exc, msg):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert type(info.value) is exc
    assert str(info.value) == msg


def test_validate_helpers_accept_and_normalise():
    assert V.check_int("C", "n", np.int64(3), min=3) == 3 and type(V.check_int("C", "n", np.int64(3))) is int
    assert V.check_float("C", "x", 1, min=0.0, min_exclusive=True) == 1.0
    assert type(V.check_float("C", "x", np.float32(0.5))) is float
    assert V.check_float("C", "x", None, allow_none=True) is None
    assert V.check_float("C", "x", 0.0, min=0.0) == 0.0  # inclusive bound
    assert V.check_bool("C", "b", np.bool_(True)) is True
    assert V.check_choice("C", "m", "ga", ("ga", "npo")) == "ga"
    assert V.check_scalar("f", "s", jnp.float32(2.0), min=0.0) is not None
    with pytest.raises(TypeError, match=r"f\.s must be a real scalar"):
        V.check_scalar("f", "s", jnp.ones(2))
    assert issubclass(ju.tree.NonFiniteError, ValueError) and issubclass(ju.tree.NonFiniteError, FloatingPointError)


# ---------------------------------------------------------------- UnlearnConfig


BAD_CONFIGS = [
    ("learning_rate", -1, ValueError),
    ("learning_rate", 0.0, ValueError),
    ("learning_rate", NAN, ValueError),
    ("learning_rate", INF, ValueError),
    ("learning_rate", "1e-4", TypeError),
    ("learning_rate", True, TypeError),
    ("steps", 2.5, TypeError),
    ("steps", -1, ValueError),
    ("steps", True, TypeError),
    ("warmup_steps", -5, ValueError),
    ("warmup_steps", 1.0, TypeError),
    ("weight_decay", -0.01, ValueError),
    ("weight_decay", NAN, ValueError),
    ("grad_clip", -1.0, ValueError),
    ("grad_clip", INF, ValueError),
    ("gamma", NAN, ValueError),
    ("gamma", -1.0, ValueError),
    ("alpha", -0.5, ValueError),
    ("alpha", INF, ValueError),
    ("beta", -0.1, ValueError),
    ("beta", 0.0, ValueError),
    ("beta", NAN, ValueError),
    ("beta", "0.1", TypeError),
    ("delta", NAN, ValueError),
    ("delta", INF, ValueError),
    ("retain_k", 0, ValueError),
    ("retain_k", 2.0, TypeError),
    ("sam_rho", -0.05, ValueError),
    ("sam_rho", NAN, ValueError),
    ("saf_rho", 0.0, ValueError),
    ("saf_rho", -1.0, ValueError),
    ("saf_block_size", 0, ValueError),
    ("saf_block_size", 64.0, TypeError),
    ("saf_scheme", "int2", ValueError),
    ("projection_metric", "cosine", ValueError),
    ("method", "rmu", ValueError),
    ("optimizer", "adam", ValueError),
    ("retain_loss", "l2", ValueError),
    ("project", 1, TypeError),
    ("projection_per_tensor", "yes", TypeError),
    ("projection_only_conflicting", None, TypeError),
    ("saf", 0, TypeError),
]


@pytest.mark.parametrize("field,value,exc", BAD_CONFIGS, ids=[f"{f}={v!r}" for f, v, _ in BAD_CONFIGS])
def test_unlearn_config_refuses(field, value, exc):
    with pytest.raises(exc) as info:
        UnlearnConfig(**{field: value})
    assert type(info.value) is exc
    msg = str(info.value)
    assert msg.startswith(f"UnlearnConfig.{field} must be "), msg
    assert msg.endswith(f"got {value!r}"), msg


def test_unlearn_config_accepts_and_normalises():
    cfg = UnlearnConfig(learning_rate=1, steps=np.int64(3), grad_clip=0, gamma=0.0, delta=-1.5, beta=None,
                        saf_rho=0.01, sam_rho=np.float32(0.05))
    assert cfg.learning_rate == 1.0 and type(cfg.learning_rate) is float
    assert type(cfg.steps) is int and type(cfg.sam_rho) is float
    with pytest.raises(ValueError, match=r"UnlearnConfig\.saf=True .* sam_rho=0\.1"):
        UnlearnConfig(saf=True, sam_rho=0.1)


def _tiny_loss(p, b):
    return jnp.sum(p)


BAD_UNLEARNER_PARTS = [
    (lambda: ju.sam_estimator(-0.05), ValueError, r"sam_estimator\.rho must be a finite number >= 0"),
    (lambda: ju.sam_estimator(NAN), ValueError, r"sam_estimator\.rho must be"),
    (lambda: ju.sam_estimator(0.05, adaptive=1), TypeError, r"sam_estimator\.adaptive must be a bool"),
    (lambda: ju.saf_estimator("int2"), ValueError, r"saf_estimator\.scheme must be one of"),
    (lambda: ju.saf_estimator(block_size=0), ValueError, r"saf_estimator\.block_size must be an int >= 1"),
    (lambda: ju.saf_estimator(block_size=8.0), TypeError, r"saf_estimator\.block_size must be an int"),
    (lambda: ju.saf_estimator(rho=-1.0), ValueError, r"saf_estimator\.rho must be"),
    (lambda: ju.unlearner(_tiny_loss, optax.sgd(0.1), gamma=-1.0), ValueError, r"unlearner\.gamma must be"),
    (lambda: ju.unlearner(_tiny_loss, optax.sgd(0.1), alpha=INF), ValueError, r"unlearner\.alpha must be"),
    (lambda: ju.unlearner(_tiny_loss, optax.sgd(0.1), retain_loss=_tiny_loss, retain_k=0), ValueError,
     r"unlearner\.retain_k must be an int >= 1"),
    (lambda: ju.unlearner(_tiny_loss, optax.sgd(0.1), retain_k=2), ValueError, "retain_k=2 needs a retain_loss"),
    (lambda: ju.unlearner(_tiny_loss, optax.sgd(0.1), retain_loss=_tiny_loss, retain_k=2, alpha=0.5), ValueError,
     "with retain_k the transform weights the retain term"),
    (lambda: ju.unlearner(_tiny_loss, optax.sgd(0.1), forget_ref_logp=True), ValueError,
     "need the reference's apply_fn"),
    (lambda: ju.unlearner(_tiny_loss, optax.sgd(0.1), retain_ref_logits=True, apply_fn=_tiny_loss), ValueError,
     "retain_ref_logits=True needs a retain_loss"),
    (lambda: ju.unlearner(_tiny_loss, optax.sgd(0.1), forget_ref_logp=1), TypeError,
     r"unlearner\.forget_ref_logp must be a bool"),
    (lambda: ju.unlearner(_tiny_loss, "adamw"), TypeError, r"unlearner\.tx must be an optax GradientTransformation"),
    (lambda: ju.unlearner(None, optax.sgd(0.1)), TypeError, r"unlearner\.forget_loss must be callable"),
    (lambda: ju.forget_loss_fn(_tiny_loss, "rmu"), ValueError, r"forget_loss_fn\.method must be one of"),
    (lambda: ju.forget_loss_fn(_tiny_loss, "npo", beta=0.0), ValueError, r"forget_loss_fn\.beta must be"),
    (lambda: ju.retain_loss_fn(_tiny_loss, "l2"), ValueError, r"retain_loss_fn\.kind must be one of"),
]


@pytest.mark.parametrize("make,exc,msg", BAD_UNLEARNER_PARTS, ids=range(len(BAD_UNLEARNER_PARTS)))
def test_unlearner_parts_refuse(make, exc, msg):
    """The building blocks of the unlearning step check their arguments when built, naming them."""
    with pytest.raises(exc, match=msg) as info:
        make()
    assert type(info.value) is exc


# ---------------------------------------------------------------- projection under/overflow


def _np64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _proj64(R, g):
    """Float64 reference ``g - R^T pinv(R R^T) R g``."""
    return g - R.T @ (np.linalg.pinv(R @ R.T) @ (R @ g))


def _problem(k, seed=0):
    rng = np.random.default_rng(seed)
    R = rng.standard_normal((k, 40))
    g = rng.standard_normal(40)
    return R, g


def _tree(v):
    """A two-leaf pytree from the last axis of ``v`` (P = 40: a (5, 6) and a (10,) leaf)."""
    lead = v.shape[:-1]
    return {"a": jnp.asarray(v[..., :30].reshape(*lead, 5, 6), jnp.float32),
            "b": jnp.asarray(v[..., 30:], jnp.float32)}


def _flat(t):
    return np.concatenate([_np64(t["a"]).ravel(), _np64(t["b"]).ravel()])


@pytest.mark.parametrize("scale", [1e-19, 1.0, 1e19], ids=["1e-19", "1", "1e19"])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["global", "per_tensor"])
@pytest.mark.parametrize("impl", ["jnp", "auto"])
def test_projection_is_scale_invariant(scale, k, per_tensor, impl):
    Rn, gn = _problem(k)
    R32, g32 = np.float64(np.float32(Rn)), np.float64(np.float32(gn))  # the directions, as float32 holds them
    out = _flat(orthogonal_projection(_tree(g32), _tree(R32 * scale), per_tensor=per_tensor, impl=impl))
    if per_tensor:  # the reference of the unscaled-direction problem, leaf by leaf
        ref = np.concatenate([_proj64(R32[:, :30], g32[:30]), _proj64(R32[:, 30:], g32[30:])])
    else:
        ref = _proj64(R32, g32)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert np.linalg.norm(out - g32) > 0.1 * np.linalg.norm(g32 - ref)  # something was projected
    # <g_perp, r_j> ~ 0 relative to the norms, with the actual (scaled) retain gradients
    Rs = _np64(R32 * scale)
    for sl in [slice(0, 30), slice(30, 40)] if per_tensor else [slice(None)]:
        for j in range(k):
            r = Rs[j, sl]
            assert abs(out[sl] @ r) <= 1e-5 * np.linalg.norm(g32[sl]) * np.linalg.norm(r)


@pytest.mark.parametrize("impl", ["pallas", "xla", "reference"])
@pytest.mark.parametrize("scale", [1e-19, 1e19], ids=["1e-19", "1e19"])
def test_projection_kernel_passes_with_scale(impl, scale):
    """The kernel front end (full Pallas blocks of 64 and a tail) in the scaled basis."""
    rng = np.random.default_rng(1)
    Rn, gn = rng.standard_normal((4, 300)), rng.standard_normal(300)
    R32, g32 = np.asarray(Rn, np.float32), np.asarray(gn, np.float32)
    R = jnp.asarray(R32 * np.float32(scale))
    out = project_tree({"w": jnp.asarray(g32)}, {"w": R}, impl=impl, block_p=64, interpret=True)["w"]
    ref = _proj64(np.float64(R32), np.float64(g32))
    np.testing.assert_allclose(_np64(out), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # the passes themselves: with s = pow2_row_scales(max|r_i|) the Gram is that of S R
    s = kp.pow2_row_scales(kp.row_absmax(R))
    assert np.all((kp.row_absmax(R) * s >= 0.5) & (kp.row_absmax(R) * s < 1.0))
    G, d = kp.gram_and_dots(R, jnp.asarray(g32), impl=impl, block_p=64, interpret=True, scale=s)
    RS = _np64(R) * _np64(s)[:, None]
    np.testing.assert_allclose(_np64(G), RS @ RS.T, rtol=1e-5, atol=1e-5 * np.abs(RS @ RS.T).max())
    np.testing.assert_allclose(_np64(d), RS @ np.float64(g32), rtol=1e-4, atol=1e-4 * np.abs(RS @ g32).max())


@pytest.mark.parametrize("per_tensor", [False, True], ids=["global", "per_tensor"])
@pytest.mark.parametrize("scale", [1e-19, 1e19], ids=["1e-19", "1e19"])
def test_project_tree_sharded_scales_agree_across_shards(scale, per_tensor):
    """Inside shard_map the row maxima are pmax-ed: every shard scales its rows alike."""
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(7)
    # the shard holding the largest entry differs per row: a shard-local scale would be wrong
    Rn, gn = rng.standard_normal((3, 64)), rng.standard_normal(64)
    Rn[0, 5], Rn[1, 40], Rn[2, 60] = 8.0, -8.0, 8.0
    R32, g32 = np.float64(np.float32(Rn)), np.float64(np.float32(gn))
    g, r = {"w": jnp.asarray(g32, jnp.float32)}, {"w": jnp.asarray(R32 * scale, jnp.float32)}
    f = jax.jit(jax.shard_map(
        lambda g, r: project_tree(g, r, impl="xla", per_tensor=per_tensor, axis_name="x"),
        mesh=mesh, in_specs=({"w": PS("x")}, {"w": PS(None, "x")}), out_specs={"w": PS("x")}))
    out = _np64(f(g, r)["w"])
    ref = _proj64(R32, g32)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("scale", [1e-19, 1e19], ids=["1e-19", "1e19"])
def test_projection_bfloat16_scaled(scale):
    """Power-of-two scales are exact in bfloat16 too: the bf16 problem's own reference."""
    Rn, gn = _problem(4, seed=9)
    R16 = jnp.asarray(Rn * scale, jnp.bfloat16)
    g16 = jnp.asarray(gn, jnp.bfloat16)
    out = orthogonal_projection({"w": g16}, {"w": R16}, impl="auto")["w"]
    assert out.dtype == jnp.bfloat16
    ref = _proj64(_np64(R16) / scale, _np64(g16))
    np.testing.assert_allclose(_np64(out), ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


@pytest.mark.parametrize("per_tensor", [False, True], ids=["global", "per_tensor"])
def test_projection_rows_of_very_different_magnitudes(per_tensor):
    """Per-row scaling: a 1e-19 and a 1e19 retain gradient in the same subspace are both kept."""
    Rn, gn = _problem(2, seed=3)
    R32, g32 = np.float64(np.float32(Rn)), np.float64(np.float32(gn))
    Rbig = R32 * np.array([[1e-19], [1e19]])
    out = _flat(orthogonal_projection(_tree(g32), _tree(Rbig), per_tensor=per_tensor, impl="auto"))
    ref = (np.concatenate([_proj64(R32[:, :30], g32[:30]), _proj64(R32[:, 30:], g32[30:])]) if per_tensor
           else _proj64(R32, g32))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("impl", ["jnp", "auto", "xla"])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["global", "per_tensor"])
def test_projection_all_zero_retain_is_nothing_to_project(impl, per_tensor):
    _, gn = _problem(3)
    g = _tree(gn)
    out = orthogonal_projection(g, _tree(np.zeros((3, 40))), per_tensor=per_tensor, impl=impl)
    np.testing.assert_array_equal(_flat(out), _flat(g))


def test_project_orthogonal_transform_with_tiny_retain_grads():
    """The optax transform (used by the unlearning step) projects 1e-19 retain gradients too."""
    Rn, gn = _problem(4, seed=5)
    R32, g32 = np.float64(np.float32(Rn)), np.float64(np.float32(gn))
    tx = project_orthogonal()
    g = _tree(g32)
    u, _ = jax.jit(lambda g, r: tx.update(g, tx.init(g), retain_grads=r))(g, _tree(R32 * 1e-19))
    ref = _proj64(R32, g32)
    np.testing.assert_allclose(_flat(u), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_pow2_row_scales_edges():
    m = jnp.array([0.0, 1.0, 0.5, 0.75, 3e38, INF, NAN, 2.0 ** -100], jnp.float32)
    s = np.asarray(kp.pow2_row_scales(m))
    np.testing.assert_array_equal(s[[0, 5, 6]], [1.0, 1.0, 1.0])  # zero / non-finite rows: 1
    np.testing.assert_array_equal(s[[1, 2, 3, 7]], [0.5, 1.0, 1.0, 2.0 ** 99])
    assert s[4] == 2.0 ** -126  # clamped to the smallest normal scale
    assert np.all(np.log2(s) == np.round(np.log2(s)))  # powers of two: exact scaling


# ---------------------------------------------------------------- NaN / Inf checks


def _nested(bad=None, where=("layers", 1, "kernel")):
    t = {"layers": [{"kernel": jnp.ones((4, 8)), "bias": jnp.ones((8,))},
                    {"kernel": jnp.ones((4, 8)), "bias": jnp.ones((8,))}],
         "embed": jnp.ones((6, 4))}
    if bad is not None:
        a, i, b = where
        t[a][i][b] = t[a][i][b].at[1, 2].set(bad)
    return t


@pytest.mark.parametrize("bad,word", [(NAN, "NaN"), (INF, "Inf")])
@pytest.mark.parametrize("scheme", ["int4", "int8", "nf4"])
def test_fake_quantize_refuses_non_finite_params(bad, word, scheme):
    with pytest.raises(ValueError, match=re.escape(f"params has {word} values at 'layers/1/kernel'")):
        fake_quantize(_nested(bad), scheme)


def test_quantize_leaf_entry_points_refuse_nan():
    x = jnp.ones((4, 16)).at[0, 3].set(NAN)
    with pytest.raises(ValueError, match="x has NaN values"):
        quantize_leaf(x, "int4", block_size=16)
    with pytest.raises(ValueError, match="x has NaN values"):
        fake_quantize_leaf(x, "int4", block_size=16)
    # traced inputs are not checked (the check is at the boundary): no error under jit
    out = jax.jit(lambda p: fake_quantize(p, "int4"))(_nested())
    np.testing.assert_array_equal(out["embed"], np.ones((6, 4)))


def _params():
    return {"w": jnp.array([[0.5, -1.0], [2.0, 0.25]]), "nested": [jnp.array([1.0, 2.0, 3.0])]}


def _imp(value=1.0):
    return {"w": jnp.full((2, 2), value), "nested": [jnp.array([0.1, 5.0, 0.0])]}


def _with(tree, path, bad):
    tree = jax.tree.map(lambda x: x, tree)
    if path == "w":
        tree["w"] = tree["w"].at[0, 1].set(bad)
    else:
        tree["nested"][0] = tree["nested"][0].at[1].set(bad)
    return tree


BAD_TREE_CALLS = [
    ("task_vector/finetuned", lambda b: ju.task_vector(_with(_params(), "nested", b), _params()),
     "finetuned", "nested/0"),
    ("task_vector/base", lambda b: ju.task_vector(_params(), _with(_params(), "w", b)), "base", "w"),
    ("apply_task_vector/tau", lambda b: ju.apply_task_vector(_params(), _with(_params(), "w", b), -1.0), "tau", "w"),
    ("apply_task_vector/base", lambda b: ju.apply_task_vector(_with(_params(), "nested", b), _params(), -1.0),
     "base", "nested/0"),
    ("apply_task_vector/scale_tree", lambda b: ju.apply_task_vector(_params(), _params(), _with(_imp(), "w", b)),
     "scale", "w"),
    ("perta/importance_forget", lambda b: ju.perta(_params(), _params(), _with(_imp(), "nested", b), _imp(),
                                                  strength=1.0), "importance_forget", "nested/0"),
    ("perta/importance_retain", lambda b: ju.perta(_params(), _params(), _imp(), _with(_imp(), "w", b),
                                                  strength=1.0), "importance_retain", "w"),
    ("perta/base", lambda b: ju.perta(_with(_params(), "w", b), _params(), _imp(), _imp(), strength=1.0),
     "base", "w"),
    ("perta/tau", lambda b: ju.perta(_params(), _with(_params(), "nested", b), _imp(), _imp(), strength=1.0),
     "tau", "nested/0"),
    ("perta/weight_fn", lambda b: ju.perta(_params(), _params(), _imp(), _imp(), strength=1.0,
                                          weight_fn=lambda f, r: jnp.where(f > 2.0, b, 0.5)),
     "weight_fn output", "nested/0"),
    ("ssd/params", lambda b: ju.ssd(_with(_params(), "nested", b), _imp(), _imp()), "params", "nested/0"),
    ("ssd/importance_forget", lambda b: ju.ssd(_params(), _with(_imp(), "w", b), _imp()), "importance_forget", "w"),
    ("ssd/importance_full", lambda b: ju.ssd(_params(), _imp(), _with(_imp(), "nested", b)),
     "importance_full", "nested/0"),
    ("ssd_factors/importance_full", lambda b: ju.ssd_factors(_imp(), _with(_imp(), "w", b)), "importance_full", "w"),
    ("salun_mask/saliency", lambda b: ju.salun_mask(_with(_imp(), "nested", b), fraction=0.5), "saliency",
     "nested/0"),
    ("orthogonal_projection/updates", lambda b: orthogonal_projection(
        _with(_params(), "w", b), [_params()]), "updates", "w"),
    ("orthogonal_projection/retain_grads", lambda b: orthogonal_projection(
        _params(), [_with(_params(), "nested", b)]), "retain_grads", "nested/0"),
]


@pytest.mark.parametrize("bad,word", [(NAN, "NaN"), (INF, "Inf")])
@pytest.mark.parametrize("call,name,leaf", [c[1:] for c in BAD_TREE_CALLS], ids=[c[0] for c in BAD_TREE_CALLS])
def test_non_finite_tree_inputs_are_refused(call, name, leaf, bad, word):
    with pytest.raises(ValueError) as info:
        call(bad)
    assert isinstance(info.value, FloatingPointError)  # NonFiniteError: both kinds
    assert f"{name} has {word} values at '{leaf}'" in str(info.value)


# ---------------------------------------------------------------- scalar checks, eager and traced


BAD_SCALARS = [
    ("perta", "strength", lambda v: ju.perta(_params(), _params(), _imp(), _imp(), strength=v)),
    ("ssd", "alpha", lambda v: ju.ssd(_params(), _imp(), _imp(), alpha=v)),
    ("ssd", "lam", lambda v: ju.ssd(_params(), _imp(), _imp(), lam=v)),
    ("ssd_factors", "alpha", lambda v: ju.ssd_factors(_imp(), _imp(), alpha=v)),
    ("perta_weights", "retain_scale", lambda v: ju.perta_weights(_imp(), _imp(), retain_scale=v)),
    ("sam_perturbation", "rho", lambda v: ju.sam_perturbation(_params(), rho=v)),
    ("sam", "rho", lambda v: ju.sam(__import__("optax").sgd(0.1), rho=v)),
    ("saf_loss", "rho", lambda v: ju.saf_loss(lambda p, b: jnp.sum(p["w"] ** 2), _params(), None, rho=v)),
]


@pytest.mark.parametrize("value", [NAN, INF, -1.0, jnp.float32(NAN)], ids=["nan", "inf", "negative", "nan_array"])
@pytest.mark.parametrize("owner,name,call", BAD_SCALARS, ids=[f"{o}.{n}" for o, n, _ in BAD_SCALARS])
def test_bad_scalars_are_refused_eagerly(owner, name, call, value):
    with pytest.raises(ValueError) as info:
        call(value)
    assert str(info.value).startswith(f"{owner}.{name} must be a finite number"), str(info.value)


def test_negative_perta_strength_says_why():
    with pytest.raises(ValueError, match=r"perta\.strength must be a finite number >= 0, got -3\.5: .*re-learning"):
        ju.perta(_params(), _params(), _imp(), _imp(), strength=-3.5)
    with pytest.raises(TypeError, match=r"perta\.strength must be a real scalar"):
        ju.perta(_params(), _params(), _imp(), _imp(), strength=True)


def _close_trees(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_perta_under_jit_with_traced_strength():
    base, tau, f, r = _params(), jax.tree.map(lambda x: 0.1 * x, _params()), _imp(), _imp(0.5)
    eager = ju.perta(base, tau, f, r, strength=3.5)
    _close_trees(jax.jit(lambda s: ju.perta(base, tau, f, r, strength=s))(3.5), eager)
    # every argument traced
    traced = jax.jit(lambda b, t, f_, r_, s: ju.perta(b, t, f_, r_, strength=s))(base, tau, f, r, 3.5)
    _close_trees(traced, eager)
    # the reference, independently: theta_0 - s * I_f / (I_f + I_r + eps) * tau
    w = f["w"] / (f["w"] + r["w"] + 1e-12)
    np.testing.assert_allclose(np.asarray(eager["w"]), np.asarray(base["w"] - 3.5 * w * tau["w"]), rtol=1e-6)


def test_ssd_under_jit_with_traced_alpha_and_lam():
    p, f, d = _params(), {"w": jnp.array([[5.0, 1.0], [0.0, 30.0]]), "nested": [jnp.array([1.0, 9.0, 2.0])]}, _imp()
    eager = ju.ssd(p, f, d, alpha=2.0, lam=0.5)
    _close_trees(jax.jit(lambda a, l: ju.ssd(p, f, d, alpha=a, lam=l))(2.0, 0.5), eager)
    _close_trees(jax.jit(lambda a, l: ju.ssd_factors(f, d, alpha=a, lam=l))(2.0, 0.5), ju.ssd_factors(f, d, alpha=2.0,
                                                                                                   lam=0.5))
    # independent float64 reference: theta * min(lam I_D / I_f, 1) where I_f > alpha I_D
    fw, dw, pw = (np.asarray(x["w"], np.float64) for x in (f, d, p))
    sel = fw > 2.0 * dw
    ref = np.where(sel, pw * np.minimum(0.5 * dw / np.where(sel, fw, 1.0), 1.0), pw)
    np.testing.assert_allclose(np.asarray(eager["w"]), ref, rtol=1e-6)


def test_apply_task_vector_traced_and_bad_scalar_scale():
    base, tau = _params(), _params()
    _close_trees(jax.jit(lambda s: ju.apply_task_vector(base, tau, s))(-0.5), ju.apply_task_vector(base, tau, -0.5))
    with pytest.raises(ValueError, match=r"apply_task_vector\.scale must be a finite number, got nan"):
        ju.apply_task_vector(base, tau, NAN)


def test_sam_perturbation_traced_rho():
    g = _params()
    eager = ju.sam_perturbation(g, rho=0.05)
    _close_trees(jax.jit(lambda r: ju.sam_perturbation(g, rho=r))(0.05), eager)
    flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(g)])
    np.testing.assert_allclose(math.sqrt(sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(eager))), 0.05,
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(eager["w"]).ravel(),
                               0.05 * np.asarray(g["w"], np.float64).ravel() / np.linalg.norm(flat), rtol=1e-5)
