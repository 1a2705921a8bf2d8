"""Input checks of the solver's entry points (private; use jaxreg.solver).

They run on concrete arguments only, before the jitted function (a traced call, inside a
user's jit, vmap or grad, skips them): a few reductions over the inputs on their device
and one small transfer back (the inputs themselves go to the device once, then on to the
jitted function). :func:`jaxreg.jit`'s ``check=`` runs them (:func:`_check_features`
for ``convex_adam``, :func:`_check_images` for ``register_mind``).
:func:`check_field` (public as ``jaxreg.solver.check_field``) checks a result.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


@functools.partial(jax.jit, static_argnames=("ranges",))
def _input_stats(arrays, ranges):
    """Per array: whether all values are finite, and (``ranges``) the min and max."""
    finite = jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays])
    if not ranges:
        return finite, None, None
    lo = jnp.stack([jnp.min(a).astype(jnp.float32) for a in arrays])
    hi = jnp.stack([jnp.max(a).astype(jnp.float32) for a in arrays])
    return finite, lo, hi


@jax.jit
def _count_nonfinite(x):
    """How many values are NaN or Inf (for the message; a slower reduction)."""
    return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)


def _as_arrays(where, arguments, names):
    """The named arguments that are given, as jax arrays (moved to a device once, then
    passed on to the jitted function), with the check that none is empty."""
    arrays = {}
    for name in names:
        if arguments.get(name) is None:
            continue
        x = jnp.asarray(arguments[name])
        if x.size == 0:
            raise ValueError(f"{where}: {name} is empty, shape {x.shape}")
        arrays[name] = x
    return arrays


def _check_features(arguments):
    """:func:`jaxreg.solver.convex_adam`'s concrete inputs: finite features, an extent
    within the grid."""
    features = _as_arrays("convex_adam", arguments,
                          ("fixed", "moving", "coarse_fixed", "coarse_moving"))
    masks = _as_arrays("convex_adam", arguments, ("fixed_mask", "moving_mask"))
    # Ranges only where they are checked: the masks (the features are the large arrays).
    (finite, _, _), mask_stats, extent = jax.device_get((
        _input_stats(tuple(features.values()), ranges=False),
        _input_stats(tuple(masks.values()), ranges=True) if masks else None,
        arguments.get("extent")))
    for (name, x), ok in zip(features.items(), finite):
        if not ok:
            raise ValueError(f"convex_adam: {name} features have {_count_nonfinite(x)} NaN or "
                             f"Inf value(s) (of {x.size}); replace or mask them first")
    grid = features["fixed"].shape[:-1] if "fixed" in features else None
    for i, (name, x) in enumerate(masks.items()):
        ok, lo, hi = (stat[i] for stat in mask_stats)
        if not ok:
            raise ValueError(f"convex_adam: {name} mask have {_count_nonfinite(x)} NaN or "
                             f"Inf value(s) (of {x.size}); replace or mask them first")
        if x.shape != grid:
            raise ValueError(f"convex_adam: {name} must be the fixed grid {grid}, got "
                             f"{x.shape}")
        if lo < 0 or hi > 1 or hi == 0:
            raise ValueError(f"convex_adam: {name} must be weights in [0, 1], not all "
                             f"zero; got values from {lo:g} to {hi:g}")
    arrays = {**features, **masks}
    if extent is not None and "fixed" in arrays and arrays["fixed"].ndim in (3, 4):
        grid = arrays["fixed"].shape[:-1]
        e = np.asarray(extent)
        if e.shape != (len(grid),) or np.any(e < 1) or np.any(e > np.asarray(grid)):
            raise ValueError(f"convex_adam: extent must be {len(grid)} sizes in [1, {grid}], "
                             f"got {e.tolist()}")
    return arrays


def _check_images(arguments):
    """:func:`jaxreg.solver.register_mind`'s concrete inputs: finite, non-constant images."""
    arrays = _as_arrays("register_mind", arguments, ("fixed", "moving"))
    finite, lo, hi = jax.device_get(_input_stats(tuple(arrays.values()), ranges=True))
    for i, (name, x) in enumerate(arrays.items()):
        if not finite[i]:
            raise ValueError(f"register_mind: {name} image has {_count_nonfinite(x)} NaN or "
                             f"Inf voxel(s) (of {x.size}); replace or mask them first")
        if lo[i] == hi[i]:
            raise ValueError(f"register_mind: {name} image is constant (all {float(lo[i])}); "
                             f"nothing to register")
    return arrays



def check_field(field: ArrayLike, *, name: str = "field") -> None:
    """Raises if a displacement field has NaN or Inf values, e.g. before writing it.

    A diverged registration (too large a learning rate, bad inputs given to a traced
    solver, which cannot check them) gives such fields.

    Args:
      field: a concrete array (numpy, or jax: counted on its device), any shape.
      name: what the message calls it.

    Raises:
      ValueError: ``"field has 123 NaN/Inf values (of N): the registration diverged;
        ..."``.
      TypeError: ``field`` is traced (call this outside ``jit``/``vmap``).
    """
    if isinstance(field, jax.core.Tracer):
        raise TypeError(f"check_field: {name} is traced; check it outside jit/vmap")
    if isinstance(field, jax.Array):
        bad = int(_count_nonfinite(field))
    else:
        bad = int(np.count_nonzero(~np.isfinite(np.asarray(field))))
    if bad:
        raise ValueError(f"{name} has {bad} NaN/Inf values (of {np.size(field)}): the "
                         f"registration diverged; check the learning rate and the inputs")
