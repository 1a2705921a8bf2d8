"""Slices through a frozen encoder: input preprocessing, chunked jitted encoding, a disk cache.

Steps 3 and 4 of the feature pipeline (:mod:`jaxreg.features` runs them all and
re-exports these names):

* :func:`token_geometry` / :func:`encoder_input`: each slice resized (linear,
  anti-aliased) to the encoder's input size (square, or longest side then zero padding as
  LiteMedSAM's preprocessing does), grey copied to 3 channels, the encoder's own scaling
  and mean/std.
* :class:`SliceEncoder`: slices through the Flax encoder under ``jit`` in fixed-size
  chunks (one compilation per slice shape), any named output maps returned (the pyramid),
  each cut to the cells that cover the slice at its own stride (:func:`map_cells`).
  With ``shifts > 1`` each slice is encoded ``shifts**2`` times, shifted by fractions of a
  token, and the maps interleaved into maps ``shifts`` times denser
  (:mod:`jaxreg.features.subtoken`); :meth:`SliceEncoder.with_shifts`.
* :class:`FeatureCache`: encoded tokens on disk, keyed by slice content and encoder
  settings.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.typing import ArrayLike

from jaxreg.encoders._base import EncoderSpec, Preprocessing
from jaxreg.features import subtoken
from jaxreg.io import atomic

if TYPE_CHECKING:  # the annotations only: MIND-SSC runs never load flax
    from flax import nnx

__all__ = ["token_geometry", "encoder_input", "map_cells", "plan_chunk", "SliceEncoder",
           "FeatureCache"]


# encoder input (step 3) ------------------------------------------------------------------

def token_geometry(shape: tuple[int, int], preprocessing: Preprocessing, *, image_size: int,
                   patch_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a ``shape`` slice lands in the encoder input, in pixels and tokens.

    Returns:
      ``(resized, tokens)``: the slice's resized size in input pixels, and the number of
      token rows/columns that cover it (the rest of a padded input is left out).
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size "
                         f"{patch_size}")
    a, b = shape
    if preprocessing.resize == "square":
        resized = (image_size, image_size)
    elif preprocessing.resize == "longest_side_pad":
        s = image_size / max(a, b)
        resized = (max(1, round(a * s)), max(1, round(b * s)))
    else:
        raise ValueError(f"unknown resize mode {preprocessing.resize!r}")
    tokens = tuple(math.ceil(r / patch_size) for r in resized)
    return resized, tokens


def encoder_input(slices: ArrayLike, preprocessing: Preprocessing, *,
                  image_size: int) -> jax.Array:
    """``(B, h, w)`` slices in [0, 1] -> ``(B, S, S, 3)`` encoder input (``S = image_size``).

    Values go linearly to ``preprocessing.value_range``; the slice is resized (linear,
    anti-aliased when shrinking) to ``S x S``, or its longest side to ``S`` padded
    bottom/right; grey is copied to 3 channels and ``(x - mean) / std`` applied. The
    padding is zero before the mean/std or after it (``preprocessing.pad``).
    """
    x = jnp.asarray(slices, jnp.float32)
    lo, hi = preprocessing.value_range
    x = lo + (hi - lo) * x
    (ra, rb), _ = token_geometry(x.shape[1:], preprocessing, image_size=image_size,
                                 patch_size=1)
    x = jax.image.resize(x, (x.shape[0], ra, rb), method="linear", antialias=True)
    mean = jnp.asarray(preprocessing.mean, jnp.float32)
    std = jnp.asarray(preprocessing.std, jnp.float32)
    pad = ((0, 0), (0, image_size - ra), (0, image_size - rb))
    if preprocessing.pad == "normalised":
        return jnp.pad((x[..., None] - mean) / std, pad + ((0, 0),))
    if preprocessing.pad != "input":
        raise ValueError(f"unknown padding {preprocessing.pad!r}: 'input' or 'normalised'")
    return (jnp.pad(x, pad)[..., None] - mean) / std


# encoding (step 4) -----------------------------------------------------------------------

def plan_chunk(spec: EncoderSpec, image_size: int) -> int:
    """The memory plan: slices per encoder call so that activations stay within ~1/4 of
    the first device's memory (4 on a host, where batches gain nothing but memory).

    The estimate per slice is float32 activations of a ViT that materialises its
    attention weights (``tokens**2`` per head), the worst case of the families.
    """
    device = jax.devices()[0]
    try:
        budget = device.memory_stats()["bytes_limit"] / 4
    except (AttributeError, KeyError, TypeError, RuntimeError):
        return 4  # host: batches gain the CPU nothing but memory
    cfg = spec.config
    tokens = (image_size // spec.patch_size) ** 2
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "embed_dim", None) or 256
    heads = getattr(cfg, "num_heads", 0)
    heads = heads if isinstance(heads, int) else 0  # TinyViT: windowed attention only
    per_slice = 4 * (32 * tokens * width + 2 * heads * tokens ** 2 + 8 * image_size ** 2)
    return int(max(1, min(64, budget // per_slice)))


def map_cells(resized: tuple[int, int], side: tuple[int, int],
              image_size: int) -> tuple[int, int]:
    """Rows and columns of a ``side`` map (over an ``image_size`` input) that cover the slice.

    Each map has its own stride, ``image_size / side`` input pixels per cell (a ViT's patch
    size; 2, 4, 4, 4 for TinyViT's four stages at 256 px): the cells that cover the resized
    slice's ``resized`` pixels are ``ceil(resized / stride)`` along each axis.
    """
    return tuple(-(-r * n // image_size) for r, n in zip(resized, side))


def _chosen(out: Mapping[str, jax.Array], layers: Sequence[str]) -> dict[str, jax.Array]:
    """The maps ``layers`` of an encoder's outputs (ValueError naming any it lacks)."""
    missing = [k for k in layers if k not in out]
    if missing:
        raise ValueError(f"the encoder has no output {missing}; it has {sorted(out)}")
    return {k: out[k] for k in layers}


@functools.partial(jax.jit, static_argnames=("graphdef", "preprocessing", "patch_size",
                                             "layers", "image_size", "shifts", "stride"))
def _encode_chunk(state, slices, *, graphdef, preprocessing, patch_size, layers, image_size,
                  shifts=1, stride=None):
    """Preprocesses and encodes a chunk of slices (compiled once per architecture and shape,
    shared by every :class:`SliceEncoder` of that architecture); each map cropped to the
    cells that cover the slice (:func:`map_cells`). With ``shifts > 1`` the maps (all of
    input-pixel ``stride``) are ``shifts`` times denser (:func:`subtoken.shifted_maps`)."""
    resized, _ = token_geometry(slices.shape[1:], preprocessing, image_size=image_size,
                                patch_size=patch_size)
    from flax import nnx  # with the encoders only: MIND-SSC runs never load flax
    model = nnx.merge(graphdef, state)
    x = encoder_input(slices, preprocessing, image_size=image_size)
    if shifts == 1:
        out = _chosen(model(x), layers)
    else:
        out = subtoken.shifted_maps(lambda y: _chosen(model(y), layers), x, shifts=shifts,
                                    stride=stride, fill=subtoken.pad_fill(preprocessing))
    crops = {k: map_cells(resized, out[k].shape[1:3], image_size) for k in layers}
    return {k: out[k][:, :crops[k][0], :crops[k][1]].astype(jnp.float32) for k in layers}


class SliceEncoder:
    """A frozen encoder applied to raw slices: preprocessing, the model, chosen outputs.

    Args:
      model: an encoder NNX module (``jaxreg.encoders.*``) returning a dict of maps.
      spec: its :class:`~jaxreg.encoders._base.EncoderSpec`.
      layers: names of the output maps to return.
      image_size: input side in pixels (0: ``spec.preprocessing.image_size``).
      chunk: slices per call (0: from the device memory, 4 on a CPU); the last chunk is
        padded, so one slice shape compiles once (fewer slices than a chunk use the next
        power of two).
      name: identifies the weights in cache keys (e.g. encoder name and checkpoint path).
      devices: several devices: each chunk of slices is sharded over them (the weights
        replicated), the chunk rounded up to a multiple of their number.
      shifts: sub-token shifts per in-plane axis (1: none): each slice is encoded
        ``shifts**2`` times and every map comes ``shifts`` times denser, at ``1/shifts`` of
        the stride (:mod:`jaxreg.features.subtoken`); the maps of ``layers`` must share one
        stride.
    """

    def __init__(self, model: nnx.Module, spec: EncoderSpec, *, layers: Sequence[str],
                 image_size: int = 0, chunk: int = 0, name: str = "",
                 devices: Sequence[jax.Device] | None = None, shifts: int = 1):
        if isinstance(shifts, bool) or not isinstance(shifts, int) or shifts < 1:
            raise ValueError(f"shifts={shifts!r}: must be an integer >= 1")
        self.spec = spec
        self.shifts = shifts
        self.layers = tuple(layers)
        self.image_size = image_size or spec.preprocessing.image_size
        self.chunk = chunk or plan_chunk(spec, self.image_size)
        self.name = name or spec.name
        self.calls = 0  # encoder invocations (slices x shifts**2), for tests and logs
        self._strides = None
        from flax import nnx  # with the encoders only: MIND-SSC runs never load flax
        self._graphdef, self._state = nnx.split(model)
        self._sharding = None
        if devices is not None and len(devices) > 1:
            mesh = jax.sharding.Mesh(np.asarray(devices), ("slices",))
            P = jax.sharding.PartitionSpec
            self._sharding = jax.sharding.NamedSharding(mesh, P("slices"))
            self._state = jax.device_put(self._state, jax.sharding.NamedSharding(mesh, P()))
            self.chunk = -(-self.chunk // len(devices)) * len(devices)

    def with_shifts(self, shifts: int) -> SliceEncoder:
        """This encoder with ``shifts`` sub-token shifts (itself when it has them already):
        a copy sharing the weights, its own ``calls`` counted from 0."""
        if shifts == self.shifts:
            return self
        if isinstance(shifts, bool) or not isinstance(shifts, int) or shifts < 1:
            raise ValueError(f"shifts={shifts!r}: must be an integer >= 1")
        other = copy.copy(self)
        other.shifts, other.calls = shifts, 0
        return other

    def _shift_stride(self) -> tuple[float, float] | None:
        """The one input-pixel stride of the chosen maps, for the shifts (None without)."""
        if self.shifts == 1:
            return None
        strides = set(self._map_strides().values())
        if len(strides) != 1:
            raise ValueError(f"shifts={self.shifts}: the maps {list(self.layers)} have "
                             f"different strides {self._map_strides()}; sub-token shifts "
                             "need maps of one stride")
        return strides.pop()

    def _apply(self, state, slices):
        return _encode_chunk(state, slices, graphdef=self._graphdef,
                             preprocessing=self.spec.preprocessing,
                             patch_size=self.spec.patch_size, layers=self.layers,
                             image_size=self.image_size, shifts=self.shifts,
                             stride=self._shift_stride())

    def key(self) -> str:
        """What the features depend on besides the slices (for :class:`FeatureCache`);
        the shifts only when there are some (unshifted keys are those of earlier caches)."""
        parts = [self.name, self.spec.name, self.image_size, list(self.layers),
                 dataclasses.asdict(self.spec.preprocessing)]
        return json.dumps(parts + ([{"shifts": self.shifts}] if self.shifts > 1 else []))

    def __call__(self, slices: ArrayLike) -> dict[str, np.ndarray]:
        """``(m, h, w)`` slices in [0, 1] -> ``{layer: (m, th, tw, C)}`` float32 numpy."""
        slices = np.asarray(slices, np.float32)
        m = slices.shape[0]
        c = min(self.chunk, 1 << (m - 1).bit_length())  # few slices: a power-of-2 chunk
        if self._sharding is not None:
            n = self._sharding.mesh.size
            c = -(-c // n) * n
        pad = (-m) % c
        padded = np.concatenate([slices, np.repeat(slices[-1:], pad, axis=0)]) if pad else slices
        chunks = [padded[i:i + c] for i in range(0, m + pad, c)]
        if self._sharding is not None:
            chunks = [jax.device_put(x, self._sharding) for x in chunks]
        parts = [self._apply(self._state, x) for x in chunks]
        self.calls += m * self.shifts ** 2
        return {k: np.concatenate([np.asarray(p[k]) for p in parts])[:m] for k in self.layers}

    def strides(self) -> dict[str, tuple[float, float]]:
        """Input pixels per cell of each returned map, ``image_size / map side`` per axis
        (from the model's output shapes, traced once without computing), divided by the
        shifts."""
        s = self.shifts
        return {k: (a / s, b / s) for k, (a, b) in self._map_strides().items()}

    def _map_strides(self) -> dict[str, tuple[float, float]]:
        """Input pixels per cell of each of the model's own (unshifted) maps."""
        if self._strides is None:
            s = self.image_size
            from flax import nnx  # with the encoders only: MIND-SSC runs never load flax
            model = nnx.merge(self._graphdef, self._state)
            shapes = jax.eval_shape(model, jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
            self._strides = {k: (s / shapes[k].shape[1], s / shapes[k].shape[2])
                             for k in self.layers}
        return self._strides

    def token_scale(self, shape: tuple[int, int],
                    layer: str | None = None) -> tuple[float, float]:
        """Slice pixels per cell of map ``layer`` along each in-plane axis (None: per
        ``spec.patch_size`` token, over the shifts), for
        :func:`jaxreg.features.to_image_grid`."""
        resized, _ = token_geometry(shape, self.spec.preprocessing, image_size=self.image_size,
                                    patch_size=self.spec.patch_size)
        p = self.spec.patch_size / self.shifts
        sy, sx = (p, p) if layer is None else self.strides()[layer]
        return sy * shape[0] / resized[0], sx * shape[1] / resized[1]



# caching ---------------------------------------------------------------------------------

class FeatureCache:
    """Encoded tokens on disk (safetensors), keyed by slice content and encoder settings.

    Args:
      directory: cache folder (created on first write).
    """

    def __init__(self, directory: str):
        self.directory = directory

    def path(self, slices: np.ndarray, encoder: SliceEncoder) -> str:
        h = hashlib.sha256()
        h.update(encoder.key().encode())
        h.update(str(slices.shape).encode())
        h.update(np.ascontiguousarray(slices, np.float32).tobytes())
        return os.path.join(self.directory, h.hexdigest()[:32] + ".safetensors")

    def load(self, path: str, layers: Sequence[str]) -> dict[str, np.ndarray] | None:
        if not os.path.isfile(path):
            return None
        from safetensors.numpy import load_file

        try:
            data = load_file(path)
        except Exception as e:  # a damaged entry is recomputed, not fatal
            logging.warning("feature cache %s unreadable (%s); re-encoding", path, e)
            return None
        return data if all(k in data for k in layers) else None

    def encode(self, slices: np.ndarray, encoder: SliceEncoder) -> dict[str, np.ndarray]:
        """``encoder``'s maps of ``slices``: from this cache when it has them, else
        encoded and stored here."""
        path = self.path(slices, encoder)
        hit = self.load(path, encoder.layers)
        if hit is not None:
            logging.info("features from cache %s", path)
            return {k: hit[k] for k in encoder.layers}
        features = encoder(slices)
        self.save(path, features)
        return features

    def save(self, path: str, features: Mapping[str, np.ndarray]) -> None:
        from safetensors.numpy import save_file

        os.makedirs(self.directory, exist_ok=True)
        with atomic.atomic_path(path) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in features.items()}, tmp)

