"""Orthogonal projection and the project_orthogonal transform against numpy references.

References are independent of the Gram/eigh code under test: ``np.linalg.lstsq`` on
the raveled vectors in float64, the k = 1 closed form, PCGrad's rule, and a finite
difference of a small network's retain loss.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxunlearn import projection as pj

SHAPES = {"a": (3, 4), "b": {"c": (5,)}, "d": (2, 2, 2)}  # P = 25


def rand_tree(rng, lead=(), dtype=jnp.float32):
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=lead + s), dtype),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def vec(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def mat(stacked):
    leaves = jax.tree.leaves(stacked)
    k = leaves[0].shape[0]
    return np.concatenate([np.asarray(x, np.float64).reshape(k, -1) for x in leaves], axis=1)


def unravel_like(v, like):
    """numpy float64 vector -> float32 pytree shaped like ``like``."""
    sizes = np.cumsum([x.size for x in jax.tree.leaves(like)])[:-1]
    parts = [jnp.asarray(p.reshape(x.shape), jnp.float32)
             for p, x in zip(np.split(v, sizes), jax.tree.leaves(like))]
    return jax.tree.unflatten(jax.tree.structure(like), parts)


def lstsq_project(gv, rm):
    """g - R^T c with c the least-squares solution of R^T c = g (float64)."""
    c = np.linalg.lstsq(rm.T, gv, rcond=None)[0]
    return gv - rm.T @ c


project = jax.jit(pj.orthogonal_projection, static_argnames=("rcond", "per_tensor", "impl"))


def assert_orthogonal(out, g, rm, tol=1e-5):
    ov, gn = vec(out), np.linalg.norm(vec(g))
    for r in rm:
        assert abs(ov @ r) <= tol * gn * np.linalg.norm(r) + 1e-30, (ov @ r, gn, np.linalg.norm(r))


def test_projection_matches_lstsq_orthogonal_idempotent():
    rng = np.random.default_rng(0)
    g, R = rand_tree(rng), rand_tree(rng, (3,))
    out = project(g, R)
    assert jax.tree.structure(out) == jax.tree.structure(g)
    np.testing.assert_allclose(vec(out), lstsq_project(vec(g), mat(R)), atol=1e-5)
    assert_orthogonal(out, g, mat(R))
    np.testing.assert_allclose(vec(project(out, R)), vec(out), atol=1e-5 * np.linalg.norm(vec(g)))
    # a list of k pytrees is brought to the same stacked form
    as_list = [jax.tree.map(lambda x, j=j: x[j], R) for j in range(3)]
    stacked, k = pj.stack_retain_grads(g, as_list)
    assert k == 3
    np.testing.assert_array_equal(mat(stacked), mat(R))
    # all-zero retain gradients: g unchanged
    np.testing.assert_array_equal(vec(project(g, jax.tree.map(jnp.zeros_like, R))), vec(g))


def test_k1_closed_form():
    rng = np.random.default_rng(1)
    g, r = rand_tree(rng), rand_tree(rng)
    out = project(g, [r])
    gv, rv = vec(g), vec(r)
    np.testing.assert_allclose(vec(out), gv - (gv @ rv) / (rv @ rv) * rv, atol=1e-5)


def test_rank_deficient_duplicated_and_zero_rows():
    rng = np.random.default_rng(2)
    g, r1, r2 = rand_tree(rng), rand_tree(rng), rand_tree(rng)
    zero = jax.tree.map(jnp.zeros_like, r1)
    r3 = jax.tree.map(lambda a, b: a + b, r1, r2)
    big = jax.tree.map(lambda a: 1e3 * a, r1)
    out = project(g, [r1, r2, r3, r1, zero, big])
    assert np.all(np.isfinite(vec(out)))
    np.testing.assert_allclose(vec(out), lstsq_project(vec(g), mat(pj.stack_retain_grads(g, [r1, r2])[0])),
                               atol=1e-5)
    assert_orthogonal(out, g, np.stack([vec(r1), vec(r2), vec(r3)]))
    # a nearly dependent direction (cosine-Gram eigenvalue ~4e-8 < rcond) is dropped:
    near = jax.tree.map(lambda a, b: a + 3e-4 * b, r1, r2)
    out = project(g, [r1, near])
    gv, rv = vec(g), vec(r1)
    np.testing.assert_allclose(vec(out), gv - (gv @ rv) / (rv @ rv) * rv, atol=1e-3 * np.linalg.norm(gv))


def test_per_tensor_projects_each_leaf_against_its_own_subspace():
    rng = np.random.default_rng(3)
    g, R = rand_tree(rng), rand_tree(rng, (3,))
    out = project(g, R, per_tensor=True)
    for x, gl, rl in zip(jax.tree.leaves(out), jax.tree.leaves(g), jax.tree.leaves(R)):
        rm = np.asarray(rl, np.float64).reshape(3, -1)
        gv = np.asarray(gl, np.float64).ravel()
        np.testing.assert_allclose(np.asarray(x).ravel(), lstsq_project(gv, rm), atol=1e-5)
        for r in rm:
            assert abs(np.asarray(x, np.float64).ravel() @ r) <= 1e-5 * np.linalg.norm(gv) * np.linalg.norm(r)
    # differs from the global projection
    assert not np.allclose(vec(out), vec(project(g, R)), atol=1e-3)


def test_bfloat16_inputs():
    rng = np.random.default_rng(4)
    g, R = rand_tree(rng, dtype=jnp.bfloat16), rand_tree(rng, (3,), dtype=jnp.bfloat16)
    out = project(g, R)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
    ref = lstsq_project(vec(g), mat(R))  # float64 from the bf16 values
    np.testing.assert_allclose(vec(out), ref, atol=2e-2 * np.abs(ref).max())
    assert_orthogonal(out, g, mat(R), tol=2e-2)


def test_impl_callable_is_used_globally_and_per_leaf():
    calls = []

    def pinv_core(g, retain, *, rcond):
        # independent core: explicit pseudo-inverse of the raveled k x P matrix.
        leaves = jax.tree.leaves(retain)
        calls.append(len(leaves))
        k = leaves[0].shape[0]
        rm = jnp.concatenate([x.reshape(k, -1) for x in leaves], axis=1)
        gv, unravel = jax.flatten_util.ravel_pytree(g)
        return unravel(gv - jnp.linalg.pinv(rm) @ (rm @ gv))

    rng = np.random.default_rng(5)
    g, R = rand_tree(rng), rand_tree(rng, (3,))
    a = project(g, R, impl=pinv_core)
    np.testing.assert_allclose(vec(a), vec(project(g, R)), atol=1e-5)
    assert calls == [3]
    b = project(g, R, per_tensor=True, impl=pinv_core)
    np.testing.assert_allclose(vec(b), vec(project(g, R, per_tensor=True)), atol=1e-5)
    assert calls == [3, 1, 1, 1]


# ------------------------------------------------------------- first-order check


def mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def test_projected_step_leaves_retain_loss_unchanged_to_first_order():
    rng = np.random.default_rng(6)
    params = {
        "w1": jnp.asarray(rng.normal(size=(4, 8)) / 2, jnp.float32),
        "b1": jnp.asarray(rng.normal(size=(8,)) / 2, jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(8, 3)) / 2, jnp.float32),
    }
    xr, yr = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32), jnp.asarray(rng.integers(0, 3, 16))
    xf, yf = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), jnp.asarray(rng.integers(0, 3, 8))
    grad = jax.jit(jax.grad(mlp_loss))
    g = grad(params, xf, yf)
    # two micro-batch retain gradients; their mean is the gradient of L_r.
    retain = [grad(params, xr[:8], yr[:8]), grad(params, xr[8:], yr[8:])]
    g_perp = project(g, retain)
    loss_r = jax.jit(lambda p: mlp_loss(p, xr, yr))
    base = float(loss_r(params))

    @jax.jit
    def shifted(u, eta):
        return loss_r(jax.tree.map(lambda p, d: p - eta * d, params, u))

    def delta(u, eta):
        return float(shifted(u, jnp.float32(eta))) - base

    eta = 0.02
    d_plain = [delta(g, eta), delta(g, eta / 2)]
    d_proj = [delta(g_perp, eta), delta(g_perp, eta / 2)]
    assert 1.8 < d_plain[0] / d_plain[1] < 2.2  # O(eta)
    assert 3.6 < d_proj[0] / d_proj[1] < 4.4  # O(eta^2)
    assert abs(d_proj[0]) < 0.1 * abs(d_plain[0])


# ------------------------------------------------------------- the optax transform


def test_transform_in_chain_with_adamw_under_jit():
    rng = np.random.default_rng(7)
    params = rand_tree(rng)
    tx = optax.chain(pj.project_orthogonal(), optax.adamw(1e-2))
    ref_tx = optax.adamw(1e-2)
    state, ref_state = tx.init(params), ref_tx.init(params)
    step, ref_step = jax.jit(tx.update), jax.jit(ref_tx.update)
    for _ in range(3):
        g, R = rand_tree(rng), rand_tree(rng, (2,))
        u, state = step(g, state, params, retain_grads=R)
        g_ref = unravel_like(lstsq_project(vec(g), mat(R)), g)
        u_ref, ref_state = ref_step(g_ref, ref_state, params)
        np.testing.assert_allclose(vec(u), vec(u_ref), rtol=1e-4, atol=1e-6)
        params = jax.tree.map(lambda p, d: p + np.asarray(d), params, u)
    with pytest.raises(ValueError, match="retain_grads"):
        tx.update(g, state, params)


def test_joint_update_scales():
    rng = np.random.default_rng(8)
    g, R = rand_tree(rng), rand_tree(rng, (3,))
    tx = pj.project_orthogonal(forget_scale=0.5, retain_scale=0.3)
    u, st = jax.jit(tx.update)(g, tx.init(g), None, retain_grads=R)
    assert st == optax.EmptyState()
    ref = 0.5 * lstsq_project(vec(g), mat(R)) + 0.3 * mat(R).mean(0)
    np.testing.assert_allclose(vec(u), ref, atol=1e-5)
    # bfloat16 updates with float32 retain gradients: bfloat16 out, float32 inside
    gb = jax.tree.map(lambda x: x.astype(jnp.bfloat16), g)
    ub, _ = jax.jit(tx.update)(gb, tx.init(gb), None, retain_grads=R)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(ub))
    refb = 0.5 * lstsq_project(vec(gb), mat(R)) + 0.3 * mat(R).mean(0)
    np.testing.assert_allclose(vec(ub), refb, atol=1e-2 * np.abs(refb).max())


def test_only_conflicting_is_pcgrad():
    rng = np.random.default_rng(9)
    r = rand_tree(rng)
    base = rand_tree(rng)
    rv = vec(r)
    tx = pj.project_orthogonal(only_conflicting=True)
    update = jax.jit(tx.update)
    for sign in (1.0, -1.0):
        # g = base + sign * c r with <g, r> of the chosen sign
        c = (sign * 2.0 * np.linalg.norm(vec(base)) / np.linalg.norm(rv)) - (vec(base) @ rv) / (rv @ rv)
        g = jax.tree.map(lambda a, b: a + jnp.float32(c) * b, base, r)
        gv = vec(g)
        u, _ = update(g, tx.init(g), None, retain_grads=[r])
        pcgrad = gv - min(gv @ rv, 0.0) / (rv @ rv) * rv
        np.testing.assert_allclose(vec(u), pcgrad, atol=1e-4)
        if sign > 0:
            np.testing.assert_array_equal(vec(u), gv)  # non-conflicting: untouched

    # per-tensor: the decision is per leaf
    g = jax.tree.map(lambda x: x, r)
    g["a"] = -r["a"] + 0.1 * base["a"]  # conflicting leaf
    txp = pj.project_orthogonal(only_conflicting=True, per_tensor=True)
    u, _ = jax.jit(txp.update)(g, txp.init(g), None, retain_grads=[r])
    np.testing.assert_array_equal(u["b"]["c"], g["b"]["c"])
    np.testing.assert_array_equal(u["d"], g["d"])
    ga, ra = np.asarray(g["a"], np.float64).ravel(), np.asarray(r["a"], np.float64).ravel()
    np.testing.assert_allclose(np.asarray(u["a"]).ravel(), ga - (ga @ ra) / (ra @ ra) * ra, atol=1e-5)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_adam_metric_orthogonal_in_preconditioned_inner_product(per_tensor):
    rng = np.random.default_rng(10)
    b2, eps = 0.9, 1e-8
    tx = pj.project_orthogonal(metric="adam", b2=b2, eps=eps, per_tensor=per_tensor)
    params = rand_tree(rng)
    state = tx.init(params)
    update = jax.jit(tx.update)
    nu = np.zeros_like(vec(params))
    for t in range(1, 4):
        g = jax.tree.map(lambda x: x * jnp.float32(rng.uniform(0.1, 3.0)), rand_tree(rng))
        R = rand_tree(rng, (2,))
        u, state = update(g, state, params, retain_grads=R)
        gv, rm = vec(g), mat(R)
        nu = b2 * nu + (1 - b2) * gv**2
        np.testing.assert_allclose(vec(state.nu), nu, rtol=1e-5)
        assert int(state.count) == t
        pdiag = 1.0 / (np.sqrt(nu / (1 - b2**t)) + eps)
        uv = vec(u)
        if not per_tensor:
            for r in rm:  # <u, r>_P = 0, while the Euclidean <u, r> is not
                assert abs(uv @ (pdiag * r)) <= 1e-5 * np.sqrt(uv @ (pdiag * uv)) * np.sqrt(r @ (pdiag * r))
                assert abs(uv @ r) > 1e-3 * np.linalg.norm(uv) * np.linalg.norm(r)
            d = np.sqrt(pdiag)  # reference: whiten, project (lstsq), map back
            np.testing.assert_allclose(uv, lstsq_project(d * gv, rm * d) / d, rtol=1e-4, atol=1e-5)
        else:
            sizes = np.cumsum([x.size for x in jax.tree.leaves(g)])[:-1]
            for us, rs, ps in zip(np.split(uv, sizes), np.split(rm, sizes, axis=1), np.split(pdiag, sizes)):
                for r in rs:
                    assert abs(us @ (ps * r)) <= 1e-5 * np.sqrt(us @ (ps * us)) * np.sqrt(r @ (ps * r))


def test_errors():
    rng = np.random.default_rng(11)
    g, R = rand_tree(rng), rand_tree(rng, (2,))
    with pytest.raises(ValueError, match="'d'"):
        pj.orthogonal_projection(g, {"a": R["a"], "b": R["b"]})
    bad = dict(R, d=jnp.zeros((2, 2, 2, 3)))
    with pytest.raises(ValueError, match="'d'"):
        pj.orthogonal_projection(g, bad)
    with pytest.raises(ValueError, match="disagree on k"):
        pj.orthogonal_projection(g, dict(R, d=jnp.zeros((3, 2, 2, 2))))
    with pytest.raises(ValueError, match="empty"):
        pj.orthogonal_projection(g, [])
    with pytest.raises(ValueError, match=r"retain_grads\[1\]"):
        pj.orthogonal_projection(g, [g, {"a": g["a"]}])
    with pytest.raises(ValueError, match="k = 0"):
        pj.orthogonal_projection(g, jax.tree.map(lambda x: x[:0], R))
    with pytest.raises(FloatingPointError, match="b/c"):
        pj.orthogonal_projection(g, dict(R, b={"c": R["b"]["c"].at[0, 0].set(jnp.nan)}))
    with pytest.raises(ValueError, match="rcond"):
        pj.orthogonal_projection(g, R, rcond=-1.0)
    with pytest.raises(ValueError, match="impl"):
        pj.orthogonal_projection(g, R, impl="cuda")
    with pytest.raises(ValueError, match="metric"):
        pj.project_orthogonal(metric="fisher")
    with pytest.raises(ValueError, match="eps"):
        pj.project_orthogonal(metric="adam", eps=0.0)


def test_sharded_leaves():
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(12)
    g, R = rand_tree(rng), rand_tree(rng, (3,))
    g_specs = {"a": P(None, "x"), "b": {"c": P()}, "d": P("x")}
    r_specs = {"a": P(None, None, "x"), "b": {"c": P()}, "d": P(None, "x")}
    put = lambda t, specs: jax.tree.map(  # noqa: E731
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, specs,
        is_leaf=lambda x: isinstance(x, P),
    )
    gs, rs = put(g, g_specs), put(R, r_specs)
    out = jax.jit(pj.orthogonal_projection)(gs, rs)
    np.testing.assert_allclose(vec(out), lstsq_project(vec(g), mat(R)), atol=1e-5)
