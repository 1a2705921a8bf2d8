"""Writing NIfTI and NRRD files (private; :func:`jaxreg.io.save_volume` checks the input,
picks the storage type and makes the write atomic)."""

from __future__ import annotations

import gzip

import nibabel as nib
import nrrd
import numpy as np

from jaxreg.io import reading as _reading


def storage_dtype(data: np.ndarray) -> np.dtype:
    """The smallest of uint8, int16, int32 holding integer/bool data; float32 for floats."""
    if data.dtype.kind in "biu":
        if data.size == 0:
            return np.dtype(np.uint8)
        low, high = int(data.min()), int(data.max())
        for dtype in (np.uint8, np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= low and high <= info.max:
                return np.dtype(dtype)
        raise ValueError(f"label values {low}..{high} do not fit int32")
    if data.dtype.kind == "f":
        return np.dtype(np.float32)
    raise ValueError(f"cannot save data of type {data.dtype}")


def write_nrrd(path: str, data: np.ndarray, affine: np.ndarray) -> None:
    """A 3D volume as NRRD, its RAS affine written in NRRD's LPS space."""
    lps = np.diag(_reading.SPACE_TO_RAS["lps"] + (1.0,)) @ affine
    header = {"space": "left-posterior-superior", "space directions": lps[:3, :3].T,
              "space origin": lps[:3, 3], "kinds": ["domain"] * 3}
    nrrd.write(path, data, header)


def write_nifti(path: str, data: np.ndarray, affine: np.ndarray, *, gz: bool,
                compresslevel: int | None, comment: str | None = None) -> None:
    """A volume, or a field (``(H, W, D, 3)``, or ITK's ``(H, W, D, 1, 3)``) with intent
    ``vector``, as NIfTI-1 (sform and qform set to ``affine``, mm); a ``gz`` file at
    ``compresslevel`` (``None``: nibabel's default); ``comment``: text in a comment
    header extension (other readers ignore it)."""
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    if data.ndim >= 4:
        image.header.set_intent("vector")
    if comment is not None:
        image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", comment.encode()))
    if gz and compresslevel is not None:
        with gzip.open(path, "wb", compresslevel=compresslevel) as fh:
            fh.write(image.to_bytes())
    else:
        nib.save(image, path)
