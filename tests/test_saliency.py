import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxunlearn.saliency import masked_updates, salun_mask, top_k_mask


def _np_mask(tree, fraction):
    """Reference: stable sort of -|s| over the concatenated leaves (flattening order)."""
    leaves, treedef = jax.tree.flatten(tree)
    flat = np.concatenate([np.abs(np.asarray(x, np.float64)).ravel() for x in leaves])
    k = max(1, min(flat.size, round(fraction * flat.size)))
    order = np.argsort(-flat, kind="stable")
    m = np.zeros(flat.size, bool)
    m[order[:k]] = True
    out, i = [], 0
    for x in leaves:
        out.append(m[i : i + x.size].reshape(x.shape))
        i += x.size
    return jax.tree.unflatten(treedef, out)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), y)


def test_hand_computed_case_with_ties():
    s = {"a": jnp.array([0.5, -3.0, 1.0]), "b": jnp.array([[1.0, -1.0], [2.0, 0.0]])}
    # |s| in flattening order (a, then b row-major): 0.5 3 1 | 1 1 2 0 ; N = 7, k = round(0.5*7) = 4
    # top: 3, 2, then two of the four 1.0s: the earliest are a[2] and b[0, 0].
    m = jax.jit(functools.partial(salun_mask, fraction=0.5))(s)
    np.testing.assert_array_equal(m["a"], [False, True, True])
    np.testing.assert_array_equal(m["b"], [[True, False], [True, False]])
    assert m["a"].dtype == jnp.bool_


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_global_sort_reference(dtype):
    rng = np.random.default_rng(0)
    s = {
        "w": jnp.asarray(rng.normal(size=(7, 9)), dtype),
        "b": jnp.asarray(rng.integers(-3, 4, size=(11,)).astype(np.float32), dtype),  # many ties
        "n": (jnp.asarray(rng.integers(-2, 3, size=(3, 4)).astype(np.float32), dtype),),
    }
    for fraction in (0.01, 0.29, 0.5, 0.9, 1.0):
        m = salun_mask(s, fraction=fraction)
        _assert_tree_equal(m, _np_mask(s, fraction))
        n = 63 + 11 + 12
        assert sum(int(np.sum(x)) for x in jax.tree.leaves(m)) == max(1, round(fraction * n))


@pytest.mark.parametrize("rb", [1, 2, 3])
def test_two_digit_counting_with_small_radix(rb):
    # a tiny radix makes every count carry across digits, as 2^31+ parameters would with 2^16
    rng = np.random.default_rng(1)
    leaves = [rng.integers(0, 4, size=n).astype(np.float32) for n in (13, 1, 29, 8)]
    for k in (1, 5, 17, 33, 51):
        got = top_k_mask([jnp.asarray(x) for x in leaves], k, rb=rb)
        ref = _np_mask(leaves, k / 51)
        for g, r in zip(got, ref):
            np.testing.assert_array_equal(g, r)


def test_all_equal_saliency_takes_the_first_entries():
    s = {"a": jnp.zeros((5,)), "b": jnp.zeros((2, 3))}
    m = salun_mask(s, fraction=0.6)  # k = round(6.6) = 7: all of a, then b[0, :2]
    np.testing.assert_array_equal(m["a"], np.ones(5, bool))
    np.testing.assert_array_equal(m["b"], [[True, True, False], [False, False, False]])


def test_masked_updates_in_optax_chain():
    p = {"w": jnp.arange(4.0), "b": jnp.ones((2,))}
    g = {"w": jnp.array([1.0, 2.0, jnp.inf, 4.0]), "b": jnp.array([3.0, 5.0])}
    mask = {"w": jnp.array([True, True, False, True]), "b": jnp.array([0.5, 0.0])}  # bool and soft
    tx = optax.chain(masked_updates(mask), optax.sgd(0.1))
    state = tx.init(p)
    u, _ = jax.jit(tx.update)(g, state, p)
    np.testing.assert_allclose(u["w"], [-0.1, -0.2, 0.0, -0.4], rtol=1e-6)
    np.testing.assert_allclose(u["b"], [-0.15, 0.0], rtol=1e-6)
    assert isinstance(masked_updates(mask).init(p), optax.EmptyState)


def test_bad_input():
    s = {"a": jnp.ones((3,)), "b": jnp.ones((2,))}
    for f in (0.0, -0.1, 1.5, True, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            salun_mask(s, fraction=f)
    with pytest.raises(FloatingPointError, match="NaN values at 'b'"):
        salun_mask(dict(s, b=jnp.array([1.0, jnp.nan])), fraction=0.5)
    with pytest.raises(ValueError, match="empty"):
        salun_mask({}, fraction=0.5)
    tx = masked_updates({"a": jnp.ones((3,), bool)})
    with pytest.raises(ValueError, match="updates has leaf 'b'"):
        tx.update(s, tx.init(s))


def test_sharded_input_matches_unsharded():
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(2)
    s = {"w": jnp.asarray(rng.integers(-5, 6, size=(16, 8)).astype(np.float32)), "b": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}
    ss = {"w": jax.device_put(s["w"], NamedSharding(mesh, P("d", None))), "b": jax.device_put(s["b"], NamedSharding(mesh, P("d")))}
    _assert_tree_equal(salun_mask(ss, fraction=0.3), _np_mask(s, 0.3))
