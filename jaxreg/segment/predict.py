"""Promptable 2D and 3D segmentation with a SAM-family model (image encoder + SAM heads).

:func:`load_segmenter` pairs a registry encoder (:mod:`jaxreg.encoders.registry`) with its
prompt encoder and mask decoder (:mod:`jaxreg.segment.heads`). Preprocessing is the
encoder's own (:class:`jaxreg.encoders._base.Preprocessing`, applied by
:func:`jaxreg.features.encoding.encoder_input`): LiteMedSAM 256 px in [0, 1], longest side resized
and zero-padded; MobileSAM / SAM 1024 px, 0-255, SAM's mean / std, padded after it. Each
slice is first min-max scaled to [0, 1] as LiteMedSAM's inference does (a volume is
clipped to its 0.5 / 99.5 percentiles before: :func:`normalise_intensity`, the one of
:mod:`jaxreg.features.intensity`, re-exported here). The low-res mask logits (256x256)
are resized to the encoder input, cropped to the slice's part and resized to the slice
(bilinear, as SAM's ``postprocess_masks``); the mask is logits > 0.

Conventions: arrays are indexed ``[row, col]``; a 2D box is ``(r0, c0, r1, c1)`` and a 3D
box ``(i0, j0, k0, i1, j1, k1)`` in voxel indices, starts inclusive, ends exclusive (a
box's axes are the volume's, whichever the slicing axis); points are ``(row, col)``, labels 1 (foreground) or 0 (background). SAM's own
``(x, y)`` pixel convention is internal.

3D (:func:`segment_3d`, LiteMedSAM's 3D inference): the box's middle slice is the key
slice, prompted by the box; from it the propagation goes slice by slice up and down, each
slice prompted by the bounding box (widened by ``margin`` pixels of a 256 px input per
side, LiteMedSAM's 3) of the previous slice's mask, within the box's slice range, and
stops in a direction where a mask comes out empty (LiteMedSAM's script would prompt
that slice with the key box again). :func:`propagate_from_mask` starts from a given mask
on one slice instead. The slices are encoded when the propagation reaches them,
:attr:`Segmenter.ahead` at a time in the direction of travel (``chunk`` per jitted call on
each of the segmenter's devices: on a 2-core CPU one slice on each of two CPU devices; so
a propagation that stops early encodes at most ``ahead - 1`` slices in vain); the decoder
(jitted once per slice shape) runs per slice. Embeddings go to ``cache`` for reuse by
other boxes on the same volume.

Cost: LiteMedSAM's TinyViT keeps 64x64 tokens at 256 px (1x1 patch embedding), about as
much work per slice as MobileSAM at 1024 px (88 and 91 GFLOP); on a 2-core CPU a slice
takes about a second, the decoder a tenth of that, so the encoder sets the time of a 3D
run. The encoder is compiled with :data:`jaxreg.compilation.COMPILER_OPTIONS` on CPU
(YNNPACK's fusions off): 10-20 % less CPU time per slice (1.9 against 2.2 CPU-s on the
2-core CPU under load), the embedding the same to 3e-6 (relative), the 3D masks
identical. Slices go to the jitted functions as numpy arrays: a ``jnp.asarray`` of a new
shape compiles a small XLA program of its own.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import MutableMapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from jaxreg import compilation
from jaxreg.encoders import registry
from jaxreg.features import encoding
from jaxreg.features.intensity import normalise_intensity
from jaxreg.segment import heads as heads_lib

__all__ = ["MODELS", "Segmenter", "load_segmenter", "normalise_intensity", "segment_2d",
           "segment_3d", "propagate_from_mask", "mask_box"]

MODELS = ("litemedsam", "mobilesam", "sam", "medsam")
"""Model names: registry encoders whose checkpoints hold SAM's heads."""


@compilation.jit(static_argnames=("graphdef", "preprocessing", "image_size"))
def _encode(state, slices, *, graphdef, preprocessing, image_size):
    """Per-slice min-max, the encoder's preprocessing and the encoder: ``(B, h, w, C)``."""
    lo = slices.min(axis=(1, 2), keepdims=True)
    hi = slices.max(axis=(1, 2), keepdims=True)
    x = (slices - lo) / jnp.maximum(hi - lo, 1e-8)
    x = encoding.encoder_input(x, preprocessing, image_size=image_size)
    return nnx.merge(graphdef, state)(x)["features"]


@functools.partial(jax.jit, static_argnames=("graphdef", "shape", "resized", "multimask",
                                             "use_box", "use_points"))
def _decode(state, embedding, box, coords, labels, *, graphdef, shape, resized, multimask,
            use_box, use_points):
    """Prompts (SAM's pixel units) -> the best mask's logits at ``shape`` and its IoU."""
    heads = nnx.merge(graphdef, state)
    pe = heads.prompt_encoder
    sparse, dense = pe(points=(coords[None], labels[None]) if use_points else None,
                       boxes=box[None] if use_box else None)
    low, iou = heads.mask_decoder(embedding[None], pe.dense_pe(), sparse, dense,
                                  multimask_output=multimask)
    best = jnp.argmax(iou[0])
    size = pe.input_image_size
    logits = jax.image.resize(low[0, best], size, method="linear", antialias=False)
    logits = jax.image.resize(logits[: resized[0], : resized[1]], shape, method="linear",
                              antialias=False)
    return logits, iou[0, best]


class Segmenter:
    """An image encoder, SAM's heads and the encoder's preprocessing (see the module docstring).

    Args:
      encoder: the image encoder (NNX module returning ``"features"``).
      spec: its :class:`~jaxreg.encoders._base.EncoderSpec`.
      heads: the matching :class:`~jaxreg.segment.heads.SamHeads`.
      chunk: slices per encoder call; ``None``: 1 on CPU, and 4 on an accelerator. A CPU
        gains nothing from batches (LiteMedSAM, 2 cores: 1.6-1.9 CPU-s per slice in calls
        of 1, 2 or 4; with YNNPACK's fusions, off here, a call of 4 took 2.5x longer per
        slice).
      devices: the devices that encode at once, one call each (default: on CPU the first
        two CPU devices, where there are two, else the default device). The heads run on
        the first. One XLA:CPU device runs one program at a time and keeps the 2-core CPU
        ~1.7 cores busy (its small operations run on one thread); two CPU devices
        (``jax.config.update("jax_num_cpu_devices", 2)`` before JAX starts, as
        :func:`jaxreg.segment.run.prepare_process` does) encode two slices at once
        and keep both busy: 0.88 against 1.04 s a slice (LiteMedSAM), the same embeddings.

    In 3D the propagation encodes :attr:`ahead` slices per step (``chunk`` on each
    device), so one that stops early encodes at most ``ahead - 1`` slices in vain.
    """

    def __init__(self, encoder: nnx.Module, spec, heads: heads_lib.SamHeads, *,
                 chunk: int | None = None, devices: Sequence[jax.Device] | None = None):
        self.spec = spec
        self.image_size = spec.preprocessing.image_size
        if heads.config.input_image_size != self.image_size:
            raise ValueError(f"heads for {heads.config.input_image_size} px inputs do not fit "
                             f"the {spec.name} encoder's {self.image_size} px")
        cpu = jax.default_backend() == "cpu"
        self.chunk = int(chunk or (1 if cpu else 4))
        if devices is None:
            devices = jax.local_devices()[:2] if cpu else jax.local_devices()[:1]
        self.devices = tuple(devices)
        self._enc = nnx.split(encoder)
        # the weights on each device (device_put to their own device copies nothing)
        self._enc_states = [jax.device_put(self._enc[1], d) for d in self.devices]
        self._heads = nnx.split(heads)

    @property
    def heads(self) -> heads_lib.SamHeads:
        """The prompt encoder and mask decoder (a new module over the same arrays)."""
        return nnx.merge(*self._heads)

    def with_heads(self, heads: heads_lib.SamHeads) -> "Segmenter":
        """A segmenter with other heads (e.g. a tuned mask decoder,
        :mod:`jaxreg.finetune.segment`) and this one's encoder, shared, not copied."""
        if heads.config.input_image_size != self.image_size:
            raise ValueError(f"heads for {heads.config.input_image_size} px inputs do not fit "
                             f"the {self.spec.name} encoder's {self.image_size} px")
        other = copy.copy(self)
        other._heads = nnx.split(heads)
        return other

    @property
    def ahead(self) -> int:
        """Slices a 3D propagation encodes per step: ``chunk`` on each of :attr:`devices`."""
        return self.chunk * len(self.devices)

    def encode(self, slices: ArrayLike, *, pad_to: int | None = None) -> jax.Array:
        """``(B, h, w)`` grey slices -> ``(B, 64, 64, 256)`` image embeddings (on the first
        device).

        Runs in calls of ``pad_to`` slices (default: 1 for a single slice, else ``chunk``),
        the last padded with copies of its last slice, so that each slice shape compiles
        once per call size; call ``i`` runs on ``devices[i % len(devices)]``, all
        dispatched before any is awaited.
        """
        x = np.asarray(slices, np.float32)  # numpy: no per-shape XLA program to stage it
        if x.ndim != 3:
            raise ValueError(f"slices must be (B, h, w), got {x.shape}")
        n, graphdef = x.shape[0], self._enc[0]
        size = int(pad_to or (1 if n == 1 else self.chunk))
        out = []
        for i, start in enumerate(range(0, n, size)):
            part = x[start:start + size]
            if part.shape[0] < size:
                part = np.concatenate([part, np.repeat(part[-1:], size - part.shape[0], 0)])
            lane = i % len(self.devices)
            emb = _encode(self._enc_states[lane], part, graphdef=graphdef,
                          preprocessing=self.spec.preprocessing, image_size=self.image_size)
            out.append(emb if lane == 0 else jax.device_put(emb, self.devices[0]))
        if len(out) == 1 and size == n:
            return out[0]
        return jnp.concatenate(out)[:n]

    def decode(self, embedding: ArrayLike, shape: tuple[int, int], *,
               box: Sequence[float] | None = None, points: ArrayLike | None = None,
               labels: ArrayLike | None = None, multimask: bool = False
               ) -> tuple[jax.Array, jax.Array]:
        """Mask logits ``shape`` for one slice's embedding from a box and/or points.

        Args:
          embedding: ``(64, 64, 256)`` from :meth:`encode`.
          shape: the slice's ``(h, w)``.
          box: ``(r0, c0, r1, c1)``, ends exclusive.
          points: ``(N, 2)`` ``(row, col)``; labels: ``(N,)`` 1 or 0 (default all 1).
          multimask: predict SAM's 3 masks and keep the one of highest predicted IoU.

        Returns:
          ``(logits (h, w), predicted IoU)``.
        """
        if box is None and points is None:
            raise ValueError("give a box or points")
        shape = tuple(int(s) for s in shape)
        resized, _ = encoding.token_geometry(shape, self.spec.preprocessing,
                                             image_size=self.image_size, patch_size=1)
        sy, sx = resized[0] / shape[0], resized[1] / shape[1]
        sam_box = np.zeros(4, np.float32)
        if box is not None:
            r0, c0, r1, c1 = (float(v) for v in box)
            sam_box = np.array([c0 * sx, r0 * sy, (c1 - 1) * sx, (r1 - 1) * sy], np.float32)
        coords, labs = np.zeros((1, 2), np.float32), np.ones(1, np.int32)
        if points is not None:
            p = np.asarray(points, np.float32).reshape(-1, 2)
            coords = np.stack([p[:, 1] * sx, p[:, 0] * sy], axis=-1)
            labs = (np.ones(len(p), np.int32) if labels is None
                    else np.asarray(labels, np.int32).reshape(-1))
            if labs.shape[0] != p.shape[0]:
                raise ValueError(f"{p.shape[0]} points but {labs.shape[0]} labels")
        return _decode(self._heads[1], jnp.asarray(embedding), sam_box, coords, labs,
                       graphdef=self._heads[0], shape=shape, resized=resized,
                       multimask=bool(multimask), use_box=box is not None,
                       use_points=points is not None)


def load_segmenter(name: str = "litemedsam", *, weights: str | None = None,
                   chunk: int | None = None) -> Segmenter:
    """A :class:`Segmenter` for model ``name`` (:data:`MODELS`), encoder and heads from the
    same checkpoint: ``weights`` (needed for ``sam`` / ``medsam``) or the installed
    package's (``litemedsam``, ``mobilesam``; cached torch-free after the first load)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    encoder, spec = registry.load_encoder(name, weights)
    return Segmenter(encoder, spec, heads_lib.load_heads(name, weights), chunk=chunk)


def mask_box(mask: ArrayLike) -> tuple[int, int, int, int] | None:
    """The ``(r0, c0, r1, c1)`` bounding box (ends exclusive) of a 2D mask, None if empty."""
    m = np.asarray(mask, bool)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def segment_2d(segmenter: Segmenter, image: ArrayLike, *, box: Sequence[float] | None = None,
               points: ArrayLike | None = None, labels: ArrayLike | None = None,
               multimask: bool = False) -> np.ndarray:
    """Segments a grey 2D image from a box and/or points (see :meth:`Segmenter.decode`).

    Returns:
      The boolean mask, the image's shape.
    """
    img = np.asarray(image, np.float32)
    if img.ndim != 2:
        raise ValueError(f"image must be 2D (h, w), got shape {img.shape}")
    emb = segmenter.encode(normalise_intensity(img)[None])[0]
    logits, _ = segmenter.decode(emb, img.shape, box=box, points=points, labels=labels,
                                 multimask=multimask)
    return np.asarray(logits) > 0


def _check_volume(volume: ArrayLike, axis: int, normalise: bool) -> np.ndarray:
    vol = np.asarray(volume, np.float32)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3D, got shape {vol.shape}")
    if not -3 <= axis < 3:
        raise ValueError(f"axis must be in -3..2, got {axis}")
    vol = normalise_intensity(vol) if normalise else vol
    return np.moveaxis(vol, axis, -1)


def _embedding(segmenter: Segmenter, vol: np.ndarray, k: int, step: int,
               limits: tuple[int, int], cache: MutableMapping) -> jax.Array:
    """Slice ``k``'s embedding; if not cached, encodes it with the next ``ahead - 1`` slices
    in direction ``step`` (within ``limits``, not cached) at once."""
    if k not in cache:
        lo, hi = limits
        todo = [j for j in range(k, k + step * segmenter.ahead, step)
                if lo <= j < hi and j not in cache]
        embs = segmenter.encode(np.stack([vol[..., j] for j in todo]), pad_to=segmenter.chunk)
        for j, e in zip(todo, embs):
            cache[j] = e
    return cache[k]


def _propagate(segmenter: Segmenter, vol: np.ndarray, key: int, key_mask: np.ndarray,
               limits: tuple[int, int], *, margin: float, cache: MutableMapping,
               multimask: bool) -> np.ndarray:
    """From the key slice's mask, slice by slice both ways within ``limits`` (see the module
    docstring); slices encoded on demand in chunks along the direction of travel.
    ``vol`` has the slicing axis last."""
    lo, hi = limits
    shape = vol.shape[:2]
    grow = margin * max(shape) / 256.0
    out = np.zeros(vol.shape, bool)
    out[..., key] = key_mask
    for step in (1, -1):
        prev, k = key_mask, key + step
        while lo <= k < hi:
            b = mask_box(prev)
            if b is None:
                break
            b = (max(0.0, b[0] - grow), max(0.0, b[1] - grow),
                 min(float(shape[0]), b[2] + grow), min(float(shape[1]), b[3] + grow))
            emb = _embedding(segmenter, vol, k, step, limits, cache)
            logits, _ = segmenter.decode(emb, shape, box=b, multimask=multimask)
            prev = np.asarray(logits) > 0
            out[..., k] = prev
            k += step
    return out


def segment_3d(segmenter: Segmenter, volume: ArrayLike, box: Sequence[int], *, axis: int = -1,
               margin: float = 3.0, normalise: bool = True, multimask: bool = False,
               cache: MutableMapping | None = None) -> np.ndarray:
    """Segments a volume from a 3D box by middle-slice propagation (module docstring).

    Args:
      segmenter: from :func:`load_segmenter`.
      volume: the 3D image.
      box: ``(i0, j0, k0, i1, j1, k1)`` voxel indices, starts inclusive, ends exclusive,
        in the volume's axis order; the slices are taken along ``axis``.
      axis: the slicing axis (default the last).
      margin: how much the previous slice's mask box is widened per side, in pixels of a
        256 px input (LiteMedSAM's 3).
      normalise: clip the volume to its 0.5 / 99.5 percentiles and scale to [0, 1] first.
      multimask: let SAM predict 3 masks per slice and keep the highest predicted IoU.
      cache: slice index -> embedding, filled and reused (several boxes on one volume with
        the same axis and ``normalise``).

    Returns:
      The boolean mask, the volume's shape.

    Raises:
      ValueError: not a 3D volume, a box of the wrong length, empty, or outside it.
    """
    shape = np.shape(volume)
    box = [int(v) for v in box]
    if len(box) != 6 or len(shape) != 3:
        raise ValueError(f"need a 3D volume and a box of 6 indices, got shape {shape}, box {box}")
    lo3, hi3 = box[:3], box[3:]
    if any(a < 0 or b > s or a >= b for a, b, s in zip(lo3, hi3, shape)):
        raise ValueError(f"box {tuple(box)} is empty or outside the volume of shape {shape}")
    ax = axis % 3
    in_plane = [d for d in range(3) if d != ax]
    vol = _check_volume(volume, axis, normalise)
    key = (lo3[ax] + hi3[ax] - 1) // 2
    cache = {} if cache is None else cache
    box2d = (lo3[in_plane[0]], lo3[in_plane[1]], hi3[in_plane[0]], hi3[in_plane[1]])
    emb = _embedding(segmenter, vol, key, 1, (lo3[ax], hi3[ax]), cache)
    logits, _ = segmenter.decode(emb, vol.shape[:2], box=box2d, multimask=multimask)
    out = _propagate(segmenter, vol, key, np.asarray(logits) > 0, (lo3[ax], hi3[ax]),
                     margin=margin, cache=cache, multimask=multimask)
    return np.moveaxis(out, -1, axis)


def propagate_from_mask(segmenter: Segmenter, volume: ArrayLike, mask: ArrayLike, index: int, *,
                        axis: int = -1, limits: tuple[int, int] | None = None,
                        margin: float = 3.0, normalise: bool = True, multimask: bool = False,
                        cache: MutableMapping | None = None) -> np.ndarray:
    """Segments a volume from a 2D mask on slice ``index`` (taken as it is), propagated both
    ways as :func:`segment_3d` does, within ``limits = (start, end)`` slices (default all).

    Args:
      segmenter: from :func:`load_segmenter`.
      volume: the 3D image.
      mask: the key slice's 2D mask (the volume's shape without ``axis``).
      index: the key slice.
      axis, margin, normalise, multimask, cache: as :func:`segment_3d`.
      limits: the slice range propagated into, end exclusive.

    Returns:
      The boolean mask, the volume's shape.
    """
    vol = _check_volume(volume, axis, normalise)
    m = np.asarray(mask, bool)
    if m.shape != vol.shape[:2]:
        raise ValueError(f"mask shape {m.shape} is not a slice of the volume ({vol.shape[:2]})")
    lo, hi = (0, vol.shape[2]) if limits is None else (int(limits[0]), int(limits[1]))
    if not 0 <= lo <= index < hi <= vol.shape[2]:
        raise ValueError(f"slice {index} / limits {(lo, hi)} outside the {vol.shape[2]} slices")
    out = _propagate(segmenter, vol, int(index), m, (lo, hi), margin=margin,
                     cache={} if cache is None else cache, multimask=multimask)
    return np.moveaxis(out, -1, axis)
