"""Under ``impl="auto"`` a kernel is lowered only where it runs whole on each device.

``kernel_unless_partitioned(kernel, fallback)`` chooses when the computation is lowered: the
kernel on one device and inside a ``shard_map`` manual over every mesh axis, the XLA fallback
in a ``jit`` that XLA partitions over several devices (and a ``shard_map`` leaving axes to
XLA), where Mosaic refuses a kernel call. Two distinguishable functions stand in for the two
paths, so the choice is visible in the result; the real kernels are compiled for an 8-chip TPU
slice in ``test_tpu_compile.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxunlearn import sharding as sh
from jaxunlearn.kernels import dispatch as C
from jaxunlearn.projection import orthogonal_projection, project_orthogonal

KERNEL, FALLBACK = 1.0, 2.0
choose = C.kernel_unless_partitioned(lambda x, m: {"y": x + KERNEL, "n": jnp.sum(x)},
                                     lambda x, m: {"y": x + FALLBACK, "n": jnp.sum(x)})


def _first(out):
    return float(np.asarray(out["y"]).reshape(-1)[0])


@pytest.fixture(scope="module")
def mesh():
    return sh.make_mesh("fsdp=4,tp=2")


def test_one_device_and_eager_take_the_kernel():
    x = jnp.zeros((8, 4))
    assert _first(jax.jit(choose)(x, None)) == KERNEL
    assert _first(choose(x, None)) == KERNEL


def test_a_jit_over_sharded_arrays_takes_the_fallback(mesh):
    x = jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh, P("fsdp", "tp")))
    out = jax.jit(choose)(x, None)
    assert _first(out) == FALLBACK and float(out["n"]) == 0.0


def test_shard_map_manual_over_every_axis_takes_the_kernel(mesh):
    x = jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh, P("fsdp", "tp")))
    f = jax.shard_map(lambda x: choose(x, None)["y"], mesh=mesh, in_specs=P("fsdp", "tp"),
                      out_specs=P("fsdp", "tp"))
    assert float(jax.jit(f)(x)[0, 0]) == KERNEL


def test_shard_map_leaving_an_axis_to_xla_takes_the_fallback(mesh):
    x = jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh, P("fsdp", "tp")))
    f = jax.shard_map(lambda x: choose(x, None)["y"], mesh=mesh, in_specs=P("fsdp"), out_specs=P("fsdp"),
                      axis_names={"fsdp"})
    assert float(jax.jit(f)(x)[0, 0]) == FALLBACK


def test_vmap_maps_both_paths(mesh):
    x = jnp.arange(12.0).reshape(3, 4)
    out = jax.jit(jax.vmap(lambda r: choose(r, None)))(x)
    np.testing.assert_array_equal(out["y"], x + KERNEL)
    np.testing.assert_array_equal(out["n"], x.sum(axis=1))
    xs = jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh, P("fsdp", "tp")))
    assert float(jax.jit(jax.vmap(lambda r: choose(r, None)["y"]))(xs)[0, 0]) == FALLBACK


def test_automatically_partitioned_mirrors_mosaic_rule():
    class Jit:  # jit over n devices
        def __init__(self, n):
            self.num_devices = n

    class Mesh:
        axis_names, manual_axes = ("a", "b"), frozenset()

    class Spmd:  # inside shard_map
        def __init__(self, manual):
            self.manual_axes, self.mesh = frozenset(manual), Mesh()

    assert not C.automatically_partitioned(Jit(1)) and C.automatically_partitioned(Jit(8))
    assert not C.automatically_partitioned(Spmd({"a", "b"}))
    assert C.automatically_partitioned(Spmd({"a"}))
    assert not C.automatically_partitioned(None)


def test_projection_per_shard_in_the_optax_chain_equals_the_unsharded_one(mesh):
    rng = np.random.default_rng(0)
    g = {"a": jnp.asarray(rng.standard_normal((64, 96)), jnp.float32),
         "b": jnp.asarray(rng.standard_normal((16,)), jnp.float32)}
    R = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal((3, *x.shape)), jnp.float32), g)
    specs = {"a": P("fsdp", "tp"), "b": P()}
    place = lambda t, s: jax.device_put(t, NamedSharding(mesh, s))
    gs = {k: place(v, specs[k]) for k, v in g.items()}
    Rs = {k: place(v, P(None, *specs[k])) for k, v in R.items()}
    tx = project_orthogonal(mesh=mesh, specs=specs)
    out, _ = jax.jit(lambda u, r: tx.update(u, tx.init(u), None, retain_grads=r))(gs, Rs)
    want = orthogonal_projection(g, R, impl="jnp")
    for k in g:
        np.testing.assert_allclose(out[k], want[k], atol=2e-5, rtol=0)
    assert out["a"].sharding.spec == P("fsdp", "tp")


def test_projection_per_shard_needs_specs(mesh):
    with pytest.raises(ValueError, match="needs specs"):
        project_orthogonal(mesh=mesh)
