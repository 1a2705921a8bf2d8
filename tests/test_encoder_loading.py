"""Models built for their shapes only (:func:`jaxreg.encoders._base.abstract_with`) use
:class:`~jaxreg.encoders._base.ShapeOnlyRngs` instead of ``nnx.Rngs``: the same modules,
the same parameters, shapes and dtypes, for every encoder family and the SAM heads."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxreg.encoders import _base, clip, dinov2, dinov3, hiera, sam, tinyvit
from jaxreg.segment import heads

CASES = [(clip, "clip_vitb16"), (dinov2, "dinov2_vits14_reg"), (dinov3, "dinov3_vits16"),
         (hiera, "sam2.1_hiera_tiny"), (sam, "sam_vitb"), (tinyvit, "litemedsam"),
         (tinyvit, "mobilesam"), (heads, "litemedsam"), (heads, "sam")]


def _abstract(family, variant, rngs):
    model = nnx.eval_shape(lambda: family.create(variant, rngs=rngs(), dtype=jnp.float32))
    graphdef, state = nnx.split(model)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return graphdef, [(jax.tree_util.keystr(p), v.shape, v.dtype) for p, v in leaves]


@pytest.mark.parametrize("family,variant", CASES, ids=[v for _, v in CASES])
def test_shape_only_rngs_build_the_same_model(family, variant):
    graphdef, leaves = _abstract(family, variant, lambda: nnx.Rngs(0))
    graphdef_fast, leaves_fast = _abstract(family, variant, _base.ShapeOnlyRngs)
    assert leaves_fast == leaves
    assert graphdef_fast == graphdef
    # nnx.Rngs(0)'s own state (the key and counter) is not part of any model
    assert not any("rngs" in path or "count" in path for path, *_ in leaves)


def test_shape_only_rngs_give_keys():
    rngs = _base.ShapeOnlyRngs()
    for key in (rngs(), rngs.params(), rngs.default()):
        assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
