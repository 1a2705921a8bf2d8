"""Synthetic training images for feature adapters (:mod:`jaxreg.finetune.features`), in
the manner of SynthMorph's domain randomisation.

* Anatomy: the MNI ICBM 2009a template's tissue maps (nilearn: GM and WM probabilities;
  CSF is the rest of the brain mask), plus three shells built around the brain at random
  thicknesses (outer CSF, skull, scalp), since real head images have them and the
  template is skull-stripped. Axial slices, evenly spaced through the brain.
* Contrasts: every tissue class gets a random intensity in [0, 1] per image (background in
  [0, 0.2]); partial volumes mix them by the probabilities; then a random blur, a smooth
  multiplicative bias field, noise and a gamma; then the pipeline's percentile
  normalisation (and, for the gradient input, its gradient render of a 5-slice slab).
* Deformations: image 0 of each slice is undeformed; images 1.. are the same anatomy
  pulled through a smooth random in-plane field, so every place of image ``v`` has a
  known place in image 0.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np

__all__ = ["template_paths", "SyntheticSlices", "synthetic_slices", "token_places", "SLAB"]


def template_paths() -> dict[str, str]:
    """nilearn's MNI ICBM152 2009a (sym) ``t1``, ``gm`` and ``wm`` files (the training
    anatomy; ``pip install nilearn``)."""
    try:
        import nilearn
    except ImportError as e:
        raise ImportError("training an adapter needs nilearn's MNI template: "
                          "pip install nilearn") from e
    base = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data")
    return {k: os.path.join(base, f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz")
            for k in ("t1", "gm", "wm")}


@dataclasses.dataclass(frozen=True)
class SyntheticSlices:
    """Synthetic training slices.

    Attributes:
      images: ``(n, V, H, W)`` float32 in [0, 1]: ``V`` contrasts of each of ``n`` slices.
      fields: ``(n, V, H, W, 2)`` float32 pixel displacements: pixel ``y`` of image ``v``
        shows the anatomy at ``y + fields[i, v, y]`` of image 0 (zero for ``v = 0``).
      foreground: ``(n, H, W)`` bool, the head in image 0.
    """

    images: np.ndarray
    fields: np.ndarray
    foreground: np.ndarray


def _tissue_maps(paths: Mapping[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, brain)``: ``(H, W, D, 3)`` CSF/GM/WM probabilities and the brain mask."""
    import nibabel as nib

    t1 = np.asarray(nib.load(paths["t1"]).dataobj, np.float32)
    gm, wm = (np.asarray(nib.load(paths[k]).dataobj, np.float32) / 255.0 for k in ("gm", "wm"))
    brain = t1 > 0.02 * t1.max()
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    return np.stack([csf, gm, wm], axis=-1), brain


def _shells(brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(..., 3)`` 0/1 maps of an outer CSF, skull and scalp around a brain mask (a 2D
    slice, or a slab ``(H, W, S)`` whose slices get the same thicknesses), at random
    thicknesses (pixels)."""
    from scipy import ndimage

    a = rng.uniform(1.0, 3.0)
    b = a + rng.uniform(3.0, 7.0)
    c = b + rng.uniform(3.0, 9.0)
    if brain.ndim == 3:
        dist = np.stack([ndimage.distance_transform_edt(~brain[:, :, z])
                         for z in range(brain.shape[2])], axis=-1)
    else:
        dist = ndimage.distance_transform_edt(~brain)
    return np.stack([(dist > 0) & (dist <= a), (dist > a) & (dist <= b),
                     (dist > b) & (dist <= c)], axis=-1).astype(np.float32)


def _render_contrast(classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random contrast of ``(H, W, K)`` or ``(H, W, S, K)`` class probabilities (K = 6:
    CSF, GM, WM, outer CSF, skull, scalp; the rest is background), normalised to [0, 1]."""
    from scipy import ndimage

    from jaxreg import phantom
    from jaxreg.features.intensity import normalise_intensity

    k = classes.shape[-1]
    means = rng.uniform(0.0, 1.0, k)
    background = 1.0 - np.clip(classes.sum(-1), 0.0, 1.0)
    img = classes @ means + background * rng.uniform(0.0, 0.2)
    img = ndimage.gaussian_filter(img, rng.uniform(0.0, 1.0))
    h, w = img.shape[:2]
    bias = phantom.smooth_field((h, w, 1), max_disp=rng.uniform(0.0, 0.3),
                                seed=int(rng.integers(1 << 31)), sigma=40.0,
                                max_derivative=None)[..., 0, 0]
    bias = bias.reshape(bias.shape + (1,) * (img.ndim - 2))
    img = img * np.exp(bias) + rng.normal(0.0, rng.uniform(0.0, 0.04), img.shape)
    img = np.clip(img, 0.0, None) ** np.exp(rng.normal(0.0, 0.25))
    return normalise_intensity(img.astype(np.float32))


SLAB = 5
"""Slices rendered around each training slice for ``render="gradient"``, whose gradient
is taken in 3D as the registration takes it on a volume."""


def synthetic_slices(paths: Mapping[str, str] | None = None, *, slices: int = 48,
                     variants: int = 3, max_disp: float = 4.0, seed: int = 0,
                     render: str = "intensity") -> SyntheticSlices:
    """Random contrasts of the template's axial slices (see the module docstring).

    Args:
      paths: ``t1``, ``gm``, ``wm`` files (default :func:`template_paths`).
      slices: axial slices, evenly spaced through the brain's middle 80 %.
      variants: contrasts per slice; all but the first deformed.
      max_disp: the deformations' longest vector, pixels.
      seed: everything random follows from it.
      render: what the encoder will see (:func:`jaxreg.features.render`); ``"gradient"``
        renders a slab of :data:`SLAB` slices (deformed alike) and keeps the middle slice
        of its 3D gradient magnitude.
    """
    from scipy import ndimage

    from jaxreg import phantom
    from jaxreg.features.intensity import RENDERS
    from jaxreg.features.intensity import render as render_volume

    if slices < 1 or variants < 2:
        raise ValueError(f"slices={slices}, variants={variants}: need slices >= 1 and "
                         "variants >= 2 (one image to compare with)")
    if render not in RENDERS:
        raise ValueError(f"render={render!r}: must be one of {', '.join(RENDERS)}")
    classes3d, brain3d = _tissue_maps(paths or template_paths())
    z = np.flatnonzero(brain3d.any(axis=(0, 1)))
    lo, hi = z[0] + 0.1 * (z[-1] - z[0]), z[-1] - 0.1 * (z[-1] - z[0])
    picks = np.unique(np.round(np.linspace(lo, hi, slices)).astype(int))
    rng = np.random.default_rng([seed, 2009])
    h, w, depth = brain3d.shape
    images = np.zeros((picks.size, variants, h, w), np.float32)
    fields = np.zeros((picks.size, variants, h, w, 2), np.float32)
    foreground = np.zeros((picks.size, h, w), bool)
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"))
    half = 0 if render == "intensity" else SLAB // 2
    for i, k in enumerate(picks):
        slab = np.clip(np.arange(k - half, k + half + 1), 0, depth - 1)
        brain = brain3d[:, :, slab] if half else brain3d[:, :, k]
        tissue = classes3d[:, :, slab] if half else classes3d[:, :, k]
        classes = np.concatenate([tissue, _shells(brain, rng)], axis=-1)
        middle = classes[:, :, half] if half else classes
        foreground[i] = middle.sum(-1) > 0.5
        for v in range(variants):
            moved = classes
            if v:
                u = phantom.smooth_field((h, w, 2), max_disp=max_disp, sigma=12.0,
                                         seed=int(rng.integers(1 << 31)))[:, :, 0, :2]
                fields[i, v] = u
                coords = grid + np.moveaxis(u, -1, 0)
                flat = classes.reshape(h, w, -1)
                moved = np.stack([ndimage.map_coordinates(flat[..., c], coords, order=1)
                                  for c in range(flat.shape[-1])], -1).reshape(classes.shape)
            img = _render_contrast(moved, rng)
            images[i, v] = render_volume(img, render)[:, :, half] if half else img
    return SyntheticSlices(images=images, fields=fields, foreground=foreground)


def token_places(data: SyntheticSlices, scale: tuple[float, float], grid: tuple[int, int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per image, per token of a ``grid`` map (``scale`` slice pixels per token): the
    token coordinates of its place in image 0, and whether that place is on the head;
    ``(n, V, th, tw, 2)`` and ``(n, V, th, tw)``."""
    from scipy import ndimage

    sy, sx = scale
    th, tw = grid
    # token j's centre is pixel (j + 1/2) * s - 1/2 (jaxreg.features.to_image_grid)
    py = (np.arange(th) + 0.5) * sy - 0.5
    px = (np.arange(tw) + 0.5) * sx - 0.5
    pts = np.stack(np.meshgrid(py, px, indexing="ij"))
    n, v = data.images.shape[:2]
    rc = np.zeros((n, v, th, tw, 2), np.float32)
    on = np.zeros((n, v, th, tw), bool)
    for i in range(n):
        for j in range(v):
            u = [ndimage.map_coordinates(data.fields[i, j, ..., a], pts, order=1,
                                         mode="nearest") for a in (0, 1)]
            y, x = pts[0] + u[0], pts[1] + u[1]
            rc[i, j] = np.stack([(y + 0.5) / sy - 0.5, (x + 0.5) / sx - 0.5], -1)
            on[i, j] = ndimage.map_coordinates(data.foreground[i].astype(np.float32),
                                               [y, x], order=1, mode="constant") > 0.5
    return rc, on
