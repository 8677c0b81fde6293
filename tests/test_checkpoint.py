import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn import checkpoint as ckpt


def _tree():
    return {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16), "step": jnp.array(3, jnp.int32)}


def test_roundtrip_preserves_values_and_dtypes(tmp_path):
    t = _tree()
    ckpt.save_pytree(tmp_path / "c", t)
    back = ckpt.restore_pytree(tmp_path / "c", t)
    for k in t:
        assert back[k].dtype == t[k].dtype
        np.testing.assert_array_equal(np.asarray(back[k], np.float32), np.asarray(t[k], np.float32))


def test_restore_onto_sharding(tmp_path):
    t = {"w": jnp.arange(16.0).reshape(8, 2)}
    ckpt.save_pytree(tmp_path / "c", t)
    mesh = jax.make_mesh((len(jax.devices()),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    target = {"w": jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=sh)}
    back = ckpt.restore_pytree(tmp_path / "c", target)
    assert back["w"].sharding == sh
    np.testing.assert_array_equal(back["w"], t["w"])


def test_refuses_overwrite_and_missing(tmp_path):
    ckpt.save_pytree(tmp_path / "c", _tree())
    with pytest.raises(FileExistsError, match="already exists"):
        ckpt.save_pytree(tmp_path / "c", _tree())
    ckpt.save_pytree(tmp_path / "c", {**_tree(), "w": jnp.zeros((2, 3))}, overwrite=True)
    np.testing.assert_array_equal(ckpt.restore_pytree(tmp_path / "c", _tree())["w"], np.zeros((2, 3)))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.restore_pytree(tmp_path / "missing", _tree())


def test_mismatched_target_is_named(tmp_path):
    ckpt.save_pytree(tmp_path / "c", _tree())
    bad = {**_tree(), "w": jnp.zeros((3, 3))}
    with pytest.raises(ValueError, match="'w'"):
        ckpt.restore_pytree(tmp_path / "c", bad)
    with pytest.raises(ValueError, match="extra"):
        ckpt.restore_pytree(tmp_path / "c", {**_tree(), "extra": jnp.zeros(1)})
