"""Quality-control pictures of a registration, written as one PNG.

Uses ``matplotlib.figure.Figure`` with the Agg canvas directly: no pyplot, no change to
matplotlib's backend or ``rcParams``, so it is safe in library code and in threads.
matplotlib is imported when a picture is drawn, not with this module. Only the three
planes shown are scaled and drawn; the statistics (percentiles, folding) are over the
whole volumes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
from jax.typing import ArrayLike

from jaxreg import metrics
from jaxreg.io import atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["save_qc_png"]

_PANEL_IN = 2.2  # inches per panel
_TILE = 8  # checkerboard tile, voxels


def _scale(x: np.ndarray, lo: float = 1.0, hi: float = 99.0) -> tuple[float, float]:
    """The ``lo`` / ``hi`` percentiles of ``x`` (its min and max if they coincide), as
    numpy float64 (the scaling then runs in float64, as it did on whole volumes)."""
    a, b = np.percentile(x, [lo, hi])
    if b <= a:
        a, b = float(x.min()), float(x.max())
    return a, b


def _robust(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """``x`` min-max scaled to [0, 1] between ``a`` and ``b`` (from :func:`_scale`)."""
    return np.clip((x - a) / max(b - a, 1e-12), 0.0, 1.0)


def _plane(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The plane ``axis = index``, transposed so rows are the last remaining axis."""
    # A view (np.take copied the plane out through a gather: 8 ms a plane at MNI size).
    return vol[(slice(None),) * axis + (index,)].swapaxes(0, 1)


def _cut(vol: np.ndarray, slices: Sequence[int]) -> list[np.ndarray]:
    """The three planes shown, one per axis, as :func:`_plane` cuts them."""
    return [_plane(vol, axis, slices[axis]) for axis in range(3)]


def save_qc_png(path: str, *, fixed: ArrayLike, moving: ArrayLike, warped: ArrayLike,
                field: ArrayLike, features: Optional[ArrayLike] = None,
                slices: Optional[Sequence[int]] = None,
                spacing: Optional[Sequence[float]] = None,
                title: Optional[str] = None, jacobian: Optional[ArrayLike] = None) -> str:
    """Writes a QC figure of one registration to ``path`` (PNG, atomically).

    One row per view: the planes ``i = slices[0]``, ``j = slices[1]`` and ``k = slices[2]``
    of the ``(H, W, D)`` = ``(i, j, k)`` grid. In each panel the first remaining axis runs
    left to right and the second bottom to top (``origin='lower'``): row 1 shows ``j``
    horizontally and ``k`` vertically, row 2 ``i`` / ``k``, row 3 ``i`` / ``j``.
    Columns: fixed, moving, warped, a checkerboard of fixed and warped (8-voxel tiles,
    each robustly normalised), ``|warped - fixed|``, the features as RGB (if given) and
    the Jacobian determinant of ``x -> x + field(x)`` (``RdBu_r``, 0 to 2, centred on 1;
    the title gives the % of voxels with ``det <= 0`` in the whole volume).

    Args:
      path: the PNG to write; its folder must exist. Written to a temporary file in the
        same folder, then renamed, so readers never see a partial file.
      fixed, moving, warped: ``(H, W, D)`` volumes on one grid (``warped`` is ``moving``
        pulled by ``field``, see :func:`jaxreg.warping.warp`).
      field: ``(H, W, D, 3)`` displacement in voxels.
      features: optional ``(H, W, D, C)`` features (e.g. PCA of the fixed image); the
        first 3 channels are shown as RGB, each scaled by its 1 / 99 percentiles, with
        zero channels added if ``C < 3``.
      slices: ``(i, j, k)`` of the three planes; default the volume centre.
      spacing: voxel sizes in mm along ``(i, j, k)`` for the panels' aspect; default 1.
      title: optional figure title.
      jacobian: the ``(H, W, D)`` Jacobian determinant of ``field`` if the caller has it
        (:func:`jaxreg.metrics.jacobian_summary`); default computed here.

    Returns:
      ``path``.

    Raises:
      ValueError: if the shapes disagree or a slice is outside the volume.
    """
    fixed, moving, warped = (np.asarray(v, np.float32) for v in (fixed, moving, warped))
    field = np.asarray(field, np.float32)
    _check_shapes(fixed, moving, warped, field)
    slices, spacing = _planes(slices, spacing, fixed.shape)
    rgb = None if features is None else _features_rgb(features, fixed.shape, slices)
    jac = metrics.jacobian_summary(field)[0] if jacobian is None else np.asarray(jacobian)
    if jac.shape != fixed.shape:
        raise ValueError(f"jacobian {jac.shape} does not match the volumes {fixed.shape}")
    fig = _figure(_columns(fixed, moving, warped, jac, rgb, slices), slices, spacing, title)
    with atomic.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def _check_shapes(fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray,
                  field: np.ndarray) -> None:
    """Raises unless the volumes are ``(H, W, D)`` on one grid and ``field`` is
    ``(H, W, D, 3)``."""
    if fixed.ndim != 3:
        raise ValueError(f"fixed must be (H, W, D), got {fixed.shape}")
    shape = fixed.shape
    for name, v in (("moving", moving), ("warped", warped)):
        if v.shape != shape:
            raise ValueError(f"{name} shape {v.shape} does not match fixed {shape}")
    if field.shape != shape + (3,):
        raise ValueError(f"field shape {field.shape} does not match fixed {shape} (+ (3,))")


def _features_rgb(features: ArrayLike, shape: tuple[int, int, int],
                  slices: Sequence[int]) -> list[np.ndarray]:
    """``(H, W, D, C)`` features -> the three planes as RGB in [0, 1]: the first 3 channels
    robustly scaled (zeros for missing ones)."""
    features = np.asarray(features, np.float32)
    if features.ndim != 4 or features.shape[:3] != shape:
        raise ValueError(
            f"features shape {features.shape} does not match fixed {shape} (+ (C,))")
    planes = [np.zeros(p.shape[:2] + (3,), np.float32) for p in _cut(features, slices)]
    for c in range(min(3, features.shape[-1])):
        scale = _scale(features[..., c])
        for plane, cut in zip(planes, _cut(features[..., c], slices)):
            plane[..., c] = _robust(cut, *scale)
    return planes


def _planes(slices: Optional[Sequence[int]], spacing: Optional[Sequence[float]],
            shape: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The checked ``(i, j, k)`` plane indices (default the centre) and voxel sizes
    (default 1)."""
    slices = tuple(s // 2 for s in shape) if slices is None else tuple(int(s) for s in slices)
    if len(slices) != 3 or not all(0 <= s < n for s, n in zip(slices, shape)):
        raise ValueError(f"slices {slices} must be 3 indices inside {shape}")
    spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 values, got {spacing}")
    return slices, spacing


def _tiles(shape: Sequence[int], slices: Sequence[int]) -> list[np.ndarray]:
    """The checkerboard's tiles (``_TILE`` voxels) on the three planes: True where the
    tile's index sum is even."""
    index = [np.arange(n) // _TILE for n in shape]
    out = []
    for axis in range(3):
        p, q = [a for a in range(3) if a != axis]
        parity = index[p][:, None] + index[q][None, :] + slices[axis] // _TILE
        out.append((parity % 2 == 0).swapaxes(0, 1))
    return out


def _columns(fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, jac: np.ndarray,
             rgb: Optional[list[np.ndarray]], slices: Sequence[int]
             ) -> list[tuple[str, list[np.ndarray], dict]]:
    """The figure's columns as ``(title, the three planes, imshow keywords)``, left to
    right."""
    def robust(vol):
        scale = _scale(vol)  # over the whole volume, once
        return [_robust(p, *scale) for p in _cut(vol, slices)]

    f01, w01 = robust(fixed), robust(warped)
    tiles = _tiles(fixed.shape, slices)
    diff = np.abs(warped - fixed)
    folding = 100.0 * float(np.mean(jac <= 0))
    gray = dict(cmap="gray", vmin=0.0, vmax=1.0)
    columns = [("fixed", f01, gray), ("moving", robust(moving), gray), ("warped", w01, gray),
               ("checkerboard", [np.where(t, f, w) for t, f, w in zip(tiles, f01, w01)], gray),
               ("|warped - fixed|", _cut(diff, slices),
                dict(cmap="magma", vmin=0.0, vmax=max(float(np.percentile(diff, 99)), 1e-6)))]
    if rgb is not None:
        columns.append(("features (RGB)", rgb, {}))
    columns.append((f"Jacobian det ({folding:.2f}% <= 0)", _cut(jac, slices),
                    dict(cmap="RdBu_r", vmin=0.0, vmax=2.0)))
    return columns


def _figure(columns: list[tuple[str, list[np.ndarray], dict]], slices: tuple[int, ...],
            spacing: tuple[float, ...], title: Optional[str]) -> Figure:
    """One row of panels per plane (``i``, ``j``, ``k``), one column per volume, a
    colour bar for the last column (on an Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(_PANEL_IN * len(columns) + 0.6, _PANEL_IN * 3 + 0.5),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, len(columns), squeeze=False)
    for axis in range(3):
        p, q = [a for a in range(3) if a != axis]
        for col, (name, planes, kw) in enumerate(columns):
            ax = axes[axis, col]
            im = ax.imshow(planes[axis], origin="lower",
                           aspect=spacing[q] / spacing[p], interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if axis == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{'ijk'[axis]} = {slices[axis]}\n({'ijk'[q]} up, {'ijk'[p]} right)",
                              fontsize=8)
    fig.colorbar(im, ax=axes[:, -1], shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig
