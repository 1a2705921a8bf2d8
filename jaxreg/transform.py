"""A registration's result: apply it to any image, map points, invert it, save it for ANTs.

A :class:`Transform` maps the fixed image's space to the moving image's space, the
direction every registration tool stores (pull: an image is warped onto the fixed grid
by reading the moving image where the transform sends each fixed voxel). It holds

* ``field``: the total displacement ``(H, W, D, 3)`` float32 on the fixed grid, in
  voxels, component ``i`` along array axis ``i`` (jaxreg's convention,
  :mod:`jaxreg.warping`): fixed voxel ``x`` corresponds to the moving-space point whose
  coordinates on the fixed grid are ``x + field(x)``, that is the world point
  ``affine @ (x + field(x))``;
* ``affine``: the fixed grid's voxel -> world matrix (RAS+ mm, as :class:`jaxreg.io.Volume`);
* ``prealignment``: optionally the affine stage's world matrix (fixed world -> moving
  world, RAS+), already contained in ``field``; kept so that the deformable stage can
  be written apart (ANTs' ``-t deformable -t affine`` pair) and inverted exactly.

Points are world millimetres in RAS+ (nibabel's, jaxreg's convention); ``space="lps"``
reads and returns them in LPS (ITK's, ANTs', DICOM's: x and y negated).

Files (:meth:`Transform.save`, :meth:`Transform.export`) are what ANTs, ITK and 3D
Slicer read: a displacement field is a NIfTI of shape ``(X, Y, Z, 1, 3)``, intent
``vector``, float32, on the fixed grid, vectors in LPS millimetres; the affine stage an
ITK ``.mat``. Then ``antsApplyTransforms -r fixed -i moving -t warp.nii.gz`` warps the
moving image onto the fixed grid (the field alone holds the whole transform), and so
does ``-t deformable_warp.nii.gz -t affine.mat`` (the stages apart, in ANTs' order).
jaxreg reads a warp back with :meth:`Transform.load`, ANTs' own warps included.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxreg import io
from jaxreg import warping
from jaxreg.io import atomic
from jaxreg.io import volumes

__all__ = ["Transform", "inverse_consistency"]

_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS, either way
_EXTENSION = "jaxreg"  # key of the JSON a saved warp carries in a NIfTI comment extension


def _matrix(value, name: str) -> np.ndarray:
    m = np.asarray(value, np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)) or not np.allclose(m[3], [0, 0, 0, 1]):
        raise ValueError(f"Transform: {name} must be a finite 4x4 affine matrix (last row "
                         f"0 0 0 1), got shape {m.shape}")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise ValueError(f"Transform: {name} is not invertible")
    return m


def _points(points: ArrayLike, space: str) -> np.ndarray:
    if space not in ("ras", "lps"):
        raise ValueError(f"space must be 'ras' or 'lps', got {space!r}")
    p = np.asarray(points, np.float64)
    if p.ndim != 2 or p.shape[1] != 3 or not np.all(np.isfinite(p)):
        raise ValueError(f"points must be (N, 3) finite world coordinates, got {p.shape}")
    return p @ _LPS if space == "lps" else p


@jax.jit
def _positions(field, voxel_matrix):
    """``voxel_matrix @ (x + field(x))`` for every voxel ``x``: (H, W, D, 3) float32."""
    c = warping.identity_grid(field.shape[:3]) + field
    return c @ voxel_matrix[:3, :3].T + voxel_matrix[:3, 3]


@jax.jit
def _map(field, points):
    """``p + field(p)`` for voxel positions ``p`` (N, 3), the field continued at its edges."""
    return points + warping.sample(field, points, mode="edge")


@dataclasses.dataclass(frozen=True, eq=False)
class Transform:
    """Fixed -> moving mapping of a registration (see the module docstring).

    Attributes:
      field: ``(H, W, D, 3)`` float32 total displacement, voxels of the fixed grid.
      affine: ``(4, 4)`` float64 fixed grid voxel -> world (RAS+ mm).
      prealignment: ``(4, 4)`` float64 world matrix of an affine stage contained in
        ``field`` (fixed world -> moving world, RAS+), or None.

    Raises:
      ValueError: a field that is not ``(H, W, D, 3)`` and finite, or a matrix that is
        not a finite invertible 4x4 affine.
    """

    field: np.ndarray
    affine: np.ndarray
    prealignment: np.ndarray | None = None

    def __post_init__(self):
        field = np.asarray(self.field, np.float32)
        if field.ndim != 4 or field.shape[-1] != 3 or not np.all(np.isfinite(field)):
            raise ValueError(f"Transform: field must be (H, W, D, 3) and finite, got "
                             f"{field.shape}")
        object.__setattr__(self, "field", field)
        object.__setattr__(self, "affine", _matrix(self.affine, "affine"))
        if self.prealignment is not None:
            object.__setattr__(self, "prealignment",
                               _matrix(self.prealignment, "prealignment"))

    @classmethod
    def from_stages(cls, deformable: ArrayLike, affine: ArrayLike,
                    prealignment: ArrayLike | None = None) -> "Transform":
        """The transform "affine stage, then a deformable field on the affinely resampled
        moving image": ``field(x) = M(x + deformable(x)) - x`` with ``M`` the
        prealignment in fixed voxels (exact, :func:`jaxreg.solver.affine.compose`)."""
        t = cls(deformable, affine)
        if prealignment is None:
            return t
        m = np.linalg.inv(t.affine) @ _matrix(prealignment, "prealignment") @ t.affine
        total = _positions(jnp.asarray(t.field), jnp.asarray(m, jnp.float32))
        out = cls(np.asarray(total - warping.identity_grid(t.shape)), affine, prealignment)
        # kept for :attr:`deformable`: exact, and not computed back from the total (0.7 s
        # at 192x224x184 on 2 cores)
        object.__setattr__(out, "_deformable", t.field)
        return out

    @property
    def shape(self) -> tuple[int, int, int]:
        """The fixed grid."""
        return self.field.shape[:3]

    @property
    def deformable(self) -> np.ndarray:
        """The deformable stage alone (``field`` without the prealignment), voxels."""
        if self.prealignment is None:
            return self.field
        if "_deformable" in self.__dict__:  # built by from_stages
            return self.__dict__["_deformable"]
        m = np.linalg.inv(self.affine) @ np.linalg.inv(self.prealignment) @ self.affine
        pos = _positions(jnp.asarray(self.field), jnp.asarray(m, jnp.float32))
        return np.asarray(pos - warping.identity_grid(self.shape))

    def apply(self, volume: io.Volume | str | os.PathLike, *, labels: bool = False
              ) -> io.Volume:
        """Resamples a moving-space image onto the fixed grid.

        Any image of the moving visit works, on its own grid and orientation (another
        phase, a mask drawn later): each fixed voxel reads it where the transform sends
        it, through the two affines.

        Args:
          volume: a :class:`jaxreg.io.Volume`, or a file (:func:`jaxreg.io.load_volume`,
            or :func:`~jaxreg.io.load_labels` with ``labels``).
          labels: nearest-neighbour resampling that keeps the labels and their dtype;
            else trilinear (float32). Outside the image: 0.

        Returns:
          The resampled :class:`jaxreg.io.Volume` on the fixed grid (``affine``).
        """
        if not isinstance(volume, io.Volume):
            volume = io.load_labels(volume) if labels else io.load_volume(volume)
        m = np.linalg.inv(volume.affine) @ self.affine
        disp = _positions(jnp.asarray(self.field), jnp.asarray(m, jnp.float32)) \
            - warping.identity_grid(self.shape)
        if labels:
            data = np.asarray(warping.warp_labels(jnp.asarray(volume.data), disp))
        else:
            data = np.asarray(warping.warp(volume.data, disp))
        return io.Volume(data=data, affine=self.affine,
                         segment_names=volume.segment_names if labels else {})

    def map_points(self, points: ArrayLike, *, space: str = "ras") -> np.ndarray:
        """Maps world points of the fixed space to the moving space.

        Learn2Reg's TRE maps fixed landmarks so. Outside the fixed grid the field's
        border value is used (as ITK reads a displacement field).

        Args:
          points: ``(N, 3)`` world coordinates (mm).
          space: ``"ras"`` (jaxreg's, nibabel's) or ``"lps"`` (ITK's, ANTs' CSV).

        Returns:
          ``(N, 3)`` float64 in the same space.
        """
        p = _points(points, space)
        inv = np.linalg.inv(self.affine)
        vox = p @ inv[:3, :3].T + inv[:3, 3]
        mapped = np.asarray(_map(jnp.asarray(self.field), jnp.asarray(vox, jnp.float32)),
                            np.float64)
        # Only the displacement goes through float32: add it to the float64 positions.
        out = p + (mapped - vox.astype(np.float32)) @ self.affine[:3, :3].T
        return out @ _LPS if space == "lps" else out

    def inverse(self, reference: io.Volume | tuple | None = None, *,
                iterations: int = 30) -> "Transform":
        """The moving -> fixed transform, on ``reference``'s grid.

        The deformable stage is inverted on the fixed grid by fixed-point iteration
        (:func:`jaxreg.warping.invert`) and the prealignment exactly; the result maps each
        voxel of ``reference`` (the moving image's grid, say) to the fixed space, so its
        :meth:`apply` warps fixed-space images onto that grid and its :meth:`map_points`
        maps moving points to the fixed space. :func:`inverse_consistency` measures it.

        Args:
          reference: the grid of the result: a :class:`jaxreg.io.Volume`, a
            ``(shape, affine)`` pair, or None (the fixed grid).
          iterations: fixed-point steps.

        Returns:
          A :class:`Transform` (no prealignment: its field holds everything).
        """
        if reference is None:
            shape, ref_affine = self.shape, self.affine
        elif isinstance(reference, io.Volume):
            shape, ref_affine = reference.shape[:3], reference.affine
        else:
            shape, ref_affine = reference
        shape, ref_affine = tuple(int(s) for s in shape), _matrix(ref_affine, "reference affine")
        inv_def, _ = warping.invert(jnp.asarray(self.deformable), iterations=iterations)
        pre = np.eye(4) if self.prealignment is None else np.linalg.inv(self.prealignment)
        # reference voxel -> (undo the prealignment) -> fixed voxel z; then x = z + v(z).
        to_fixed = np.linalg.inv(self.affine) @ pre @ ref_affine
        z = _positions(jnp.zeros(shape + (3,), jnp.float32), jnp.asarray(to_fixed, jnp.float32))
        x = _map(inv_def, z.reshape(-1, 3)).reshape(z.shape)
        back = np.linalg.inv(ref_affine) @ self.affine  # fixed voxel -> reference voxel
        field = x @ jnp.asarray(back[:3, :3].T, jnp.float32) + jnp.asarray(back[:3, 3], jnp.float32)
        return Transform(np.asarray(field - warping.identity_grid(shape)), ref_affine)

    # ------------------------------------------------------------------ files

    def itk_field(self, deformable: bool = False) -> np.ndarray:
        """The field as ITK stores it: ``(X, Y, Z, 1, 3)`` float32 LPS millimetres
        (``deformable``: the deformable stage alone)."""
        u = self.deformable if deformable else self.field
        return (io.field_to_mm(u, self.affine) @ _LPS.astype(np.float32))[:, :, :, None, :]

    def save(self, path: str | os.PathLike, *, deformable: bool = False) -> None:
        """Writes the transform as an ITK displacement field (see the module docstring).

        The prealignment travels in a NIfTI header extension that other tools ignore, so
        :meth:`load` restores it. Written atomically.

        Args:
          path: ``.nii.gz`` or ``.nii``.
          deformable: write the deformable stage alone (ANTs' ``-t`` pair with the
            ``.mat`` of :meth:`export`); :meth:`load` then gives that stage.
        """
        from jaxreg.io import writing as _writing  # nibabel

        path = os.fspath(path)
        if not path.endswith((".nii", ".nii.gz")):
            raise ValueError(f"{path}: a warp is written as .nii.gz or .nii")
        meta = None
        if self.prealignment is not None and not deformable:
            meta = json.dumps({_EXTENSION: {"prealignment": self.prealignment.tolist()}})
        gz = path.endswith(".gz")
        with atomic.atomic_path(path, suffix=".nii.gz" if gz else ".nii") as tmp:
            # Stored uncompressed (still .gz): zlib shrinks float fields ~8 % for seconds.
            _writing.write_nifti(tmp, self.itk_field(deformable), self.affine, gz=gz,
                                 compresslevel=0, comment=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Transform":
        """Reads a warp written by :meth:`save`, or any ITK/ANTs displacement field.

        Raises:
          jaxreg.io.InputError: the file is unreadable or not a displacement field
            ``(X, Y, Z, 1, 3)`` / ``(X, Y, Z, 3)`` of finite values.
        """
        import nibabel as nib

        data, affine, _, path = volumes._read(path)  # pylint: disable=protected-access
        data = np.asarray(data, np.float32)
        if data.ndim not in (4, 5) or data.shape[-1] != 3 or (data.ndim == 5 and
                                                             data.shape[3] != 1):
            raise io.InputError(f"{path}: not a displacement field: shape {data.shape}, "
                                f"expected (X, Y, Z, 1, 3) as ITK writes it")
        if not np.all(np.isfinite(data)):
            raise io.InputError(f"{path}: the displacement field has NaN or Inf values")
        mm = data.reshape(data.shape[:3] + (3,)) @ _LPS.astype(np.float32)
        prealignment = None
        for ext in nib.load(path).header.extensions:
            try:
                meta = json.loads(ext.get_content())
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(meta, dict) and _EXTENSION in meta:
                prealignment = meta[_EXTENSION].get("prealignment")
        return cls(io.field_to_voxels(mm, affine), affine, prealignment)

    def export(self, folder: str | os.PathLike, *, inverse: "Transform | None" = None
               ) -> dict[str, str]:
        """Writes every file ANTs, ITK and Slicer need into ``folder`` (created).

        ``warp.nii.gz`` (the whole transform); with a prealignment also ``affine.mat``
        (ITK/ANTs, double precision) and ``deformable_warp.nii.gz``; with ``inverse``
        ``inverse_warp.nii.gz``.

        Returns:
          The written paths by name (``"warp"``, ``"affine"``, ``"deformable"``,
          ``"inverse"``).
        """
        from jaxreg.solver import affine as affine_lib  # nitransforms, for the .mat only

        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        out = {"warp": os.path.join(folder, "warp.nii.gz")}
        self.save(out["warp"])
        if self.prealignment is not None:
            out["affine"] = os.path.join(folder, "affine.mat")
            affine_lib.save_itk(out["affine"], self.prealignment)
            out["deformable"] = os.path.join(folder, "deformable_warp.nii.gz")
            self.save(out["deformable"], deformable=True)
        if inverse is not None:
            out["inverse"] = os.path.join(folder, "inverse_warp.nii.gz")
            inverse.save(out["inverse"])
        return out


def inverse_consistency(forward: Transform, inverse: Transform, *,
                        mask: ArrayLike | None = None) -> dict[str, float]:
    """How far ``inverse(forward(x))`` lands from ``x``, over the fixed grid (mm).

    Scored at the fixed voxels (in ``mask``) that ``forward`` sends inside the inverse's
    grid, where the inverse is defined; ``"inside"`` is their fraction.

    Args:
      forward: fixed -> moving.
      inverse: moving -> fixed (:meth:`Transform.inverse`).
      mask: optional ``(H, W, D)`` fixed-grid voxels to score (e.g. the anatomy).

    Returns:
      ``{"mean": ..., "p95": ..., "max": ..., "inside": ...}``, millimetres but the
      fraction ``inside``.
    """
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in forward.shape], indexing="ij"), -1)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != forward.shape:
            raise ValueError(f"mask {mask.shape} is not the fixed grid {forward.shape}")
        grid = grid[mask]
    vox = grid.reshape(-1, 3).astype(np.float64)
    world = vox @ forward.affine[:3, :3].T + forward.affine[:3, 3]
    mapped = forward.map_points(world)
    to_inv = np.linalg.inv(inverse.affine)
    inv_vox = mapped @ to_inv[:3, :3].T + to_inv[:3, 3]
    inside = np.all((inv_vox >= 0) & (inv_vox <= np.asarray(inverse.shape) - 1), axis=-1)
    if not inside.any():
        raise ValueError("inverse_consistency: no scored voxel maps inside the inverse's grid")
    err = np.linalg.norm(inverse.map_points(mapped[inside]) - world[inside], axis=-1)
    return {"mean": float(err.mean()), "p95": float(np.percentile(err, 95)),
            "max": float(err.max()), "inside": float(inside.mean())}
