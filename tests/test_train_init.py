"""A fresh run's random parameters (`train.step.init_params`): drawn leaf by leaf by a few small
programs, as the model's own constructors draw them, the same on every mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax.model.vlm import Qwen25VL
from nsa_jax.train import sharding
from nsa_jax.train.config import load_config
from nsa_jax.train.step import ModelDef, init_params


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny").model


def test_parameters_start_as_the_models_constructors_draw_them(tiny):
    """Zeros and ones exactly where the constructors put them, N(0, 0.02) elsewhere."""
    md = ModelDef.of(tiny, jnp.float32, jnp.float32)
    ours = init_params(md, seed=0)
    state = nnx.state(Qwen25VL(tiny, dtype=jnp.float32, rngs=nnx.Rngs(0)), nnx.Param)
    theirs = dict(zip(md.names, jax.tree.leaves(state), strict=True))
    assert set(ours) == set(theirs)
    for name in md.names:
        a, b = np.asarray(ours[name]), np.asarray(theirs[name])
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if np.all(b == b.flat[0]):
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            assert abs(a.std() - b.std()) <= 0.1 * b.std(), (name, a.std(), b.std())
            assert abs(a.mean()) <= 4 * 0.02 / np.sqrt(a.size), name


def test_parameters_are_independent_across_leaves_and_fixed_by_the_seed(tiny):
    md = ModelDef.of(tiny, jnp.float32, jnp.float32)
    one, again, other = init_params(md, 0), init_params(md, 0), init_params(md, 1)
    kernels = [n for n in md.names if n.endswith(".kernel")]
    for n in kernels:
        np.testing.assert_array_equal(one[n], again[n])
        assert not np.array_equal(one[n], other[n]), n
    same_shape = [n for n in kernels if md.shapes[n].shape == md.shapes[kernels[0]].shape]
    assert len(same_shape) > 1 and not np.array_equal(one[same_shape[0]], one[same_shape[1]])


def test_parameters_are_created_with_their_shardings(tiny):
    """On a mesh the leaves come out sharded as asked, with the values of one device."""
    mesh = sharding.make_mesh("fsdp=-1")
    md = ModelDef.of(tiny, jnp.float32, jnp.float32)
    shardings = sharding.param_shardings({n: s.shape for n, s in md.shapes.items()}, mesh)
    placed, plain = init_params(md, 0, shardings), init_params(md, 0)
    for n in md.names:
        assert placed[n].sharding == shardings[n], n
        np.testing.assert_array_equal(placed[n], plain[n])


def test_a_parameter_without_a_known_initialiser_is_named(tiny):
    md = ModelDef.of(tiny, jnp.float32, jnp.float32)
    name = md.names[0]
    odd = ModelDef(md.graphdef, md.treedef, (name + "_scale",),
                   {name + "_scale": md.shapes[name]})
    with pytest.raises(ValueError, match="no initialiser for 'embedding_scale'"):
        init_params(odd, 0)
