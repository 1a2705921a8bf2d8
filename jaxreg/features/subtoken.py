"""Sub-token shifts: a token map ``shifts`` times denser along each in-plane axis.

A ViT (or TinyViT) map has one token per ``q x q`` input pixels (its stride ``q``), so the
registration sees the slice through a grid of that spacing. Encoding the same input
``shifts**2`` times, shifted by fractions of a token, and interleaving the maps gives a
map of stride ``q / shifts`` whose tokens are real encoder outputs, not interpolations
(the encoder costs ``shifts**2`` times as much).

Geometry, along one axis, in input pixels (pixel ``u`` covers ``[u, u + 1)``, centre
``u + 1/2``). Shift ``i`` of ``s`` (``0 <= i < s``) feeds the encoder
``y[u] = x[u + d_i]`` with

    d_i = q * (2 i - s + 1) / (2 s)         (s = 2: -q/4, +q/4; s = 1: 0)

so its token ``t`` covers ``[t q + d_i, (t + 1) q + d_i)`` of the unshifted input. Dense
cell ``k = t s + i`` then covers ``[k q/s - q (s-1)/(2s), ...)``: its centre is
``(k + 1/2) q / s``, exactly where a map of stride ``q / s`` has its cell ``k``. The set
of shifts is centred on the unshifted tokens, so the dense map starts where the
pipeline's convention (:func:`jaxreg.features.encoding.map_cells`,
:func:`jaxreg.features.to_image_grid`) puts cell 0 of a stride-``q/s`` map, and the rest
of the pipeline needs nothing but the smaller stride.

A shift is resampling with constant padding: an integer part by padding and cropping, a
fractional part (when ``2 s`` does not divide ``q``, e.g. a 14-pixel ViT patch) by linear
interpolation of the two neighbouring integer shifts. What enters at the border is the
encoder's own padding value (:func:`pad_fill`), as for the padding of
``"longest_side_pad"`` inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from jaxreg.encoders._base import Preprocessing

__all__ = ["shift_offsets", "pad_fill", "shift_input", "interleave", "shifted_maps"]


def shift_offsets(shifts: int, stride: float) -> tuple[float, ...]:
    """The ``shifts`` input-pixel offsets ``d_i = stride (2 i - s + 1) / (2 s)`` along one
    axis (module docstring), centred on 0."""
    return tuple(stride * (2 * i - shifts + 1) / (2 * shifts) for i in range(shifts))


def pad_fill(preprocessing: Preprocessing) -> jax.Array:
    """``(3,)`` value of a padding pixel in the encoder input: zero intensity through the
    mean/std (``pad="input"``), or zero after it (``"normalised"``)."""
    if preprocessing.pad == "normalised":
        return jnp.zeros(3, jnp.float32)
    return -jnp.asarray(preprocessing.mean, jnp.float32) / jnp.asarray(preprocessing.std,
                                                                       jnp.float32)


def _shift_whole(x: jax.Array, k: int, axis: int) -> jax.Array:
    """``y[u] = x[u + k]`` along ``axis`` (integer ``k``), zeros where ``u + k`` is outside."""
    if k == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (max(-k, 0), max(k, 0))
    start = max(k, 0)
    return jax.lax.slice_in_dim(jnp.pad(x, pad), start, start + x.shape[axis], axis=axis)


def _shift_axis(x: jax.Array, d: float, axis: int) -> jax.Array:
    """``y[u] = x[u + d]`` along ``axis``, linear between whole pixels, zeros outside."""
    k = math.floor(d)
    f = d - k
    y = _shift_whole(x, k, axis)
    if f == 0.0:
        return y
    return (1.0 - f) * y + f * _shift_whole(x, k + 1, axis)


def shift_input(x: jax.Array, offset: tuple[float, float], fill: jax.Array) -> jax.Array:
    """``(B, S, S, 3)`` encoder input shifted: ``y[u, v] = x[u + dy, v + dx]`` (bilinear
    for fractional offsets), ``fill`` (per channel) where that lies outside the input."""
    dy, dx = offset
    return _shift_axis(_shift_axis(x - fill, dy, 1), dx, 2) + fill


def interleave(maps: jax.Array, shifts: int) -> jax.Array:
    """``(s, s, B, h, w, C)`` maps of the shifts ``(i, j)`` -> ``(B, h s, w s, C)`` with
    ``out[:, t s + i, r s + j] = maps[i, j, :, t, r]``."""
    s, _, b, h, w, c = maps.shape
    return maps.transpose(2, 3, 0, 4, 1, 5).reshape(b, h * s, w * s, c)


def shifted_maps(model: Callable[[jax.Array], Mapping[str, jax.Array]], x: jax.Array, *,
                 shifts: int, stride: tuple[float, float],
                 fill: jax.Array) -> dict[str, jax.Array]:
    """Every map of ``model`` (which returns only ``(B, h, w, C)`` maps of one ``stride``)
    made ``shifts`` times denser: ``model`` is run on the ``shifts**2`` shifted inputs
    one after the other (:func:`jax.lax.map`: the activations of one input at a time,
    one compiled model), and the maps interleaved.

    Args:
      model: encoder input ``(B, S, S, 3)`` -> ``{name: (B, h, w, C)}``.
      x: the unshifted encoder input.
      shifts: shifts per axis.
      stride: input pixels per token along the two axes.
      fill: ``(3,)`` padding value of the input (:func:`pad_fill`).
    """
    rows, cols = (shift_offsets(shifts, q) for q in stride)
    shifted = jnp.stack([shift_input(x, (dy, dx), fill) for dy in rows for dx in cols])
    out = jax.lax.map(model, shifted)
    return {k: interleave(v.reshape(shifts, shifts, *v.shape[1:]), shifts)
            for k, v in out.items()}
