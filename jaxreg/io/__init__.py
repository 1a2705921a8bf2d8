"""Files in and out: volumes, label maps, fields and landmarks, with their geometry.

* :mod:`jaxreg.io.volumes`: :class:`Volume` (voxels + voxel-to-RAS affine), loading and
  saving, resampling, voxel/mm field conversion, and the limits on what is accepted;
* :mod:`jaxreg.io.reading`: NIfTI, NRRD and Slicer segmentation files, read defensively
  (:class:`InputError` names the file and the problem);
* :mod:`jaxreg.io.dicom`: DICOM series (SimpleITK), with strict slice checks;
* :mod:`jaxreg.io.writing`: NIfTI and NRRD writers;
* :mod:`jaxreg.io.points`: landmarks (ANTs CSV, Slicer ``.fcsv`` and ``.mrk.json``);
* :mod:`jaxreg.io.atomic`: write to a temporary file, then rename.

Transforms for ANTs, ITK and Slicer are written by :class:`jaxreg.transform.Transform`.
"""

from jaxreg.io.points import Points
from jaxreg.io.points import read_points
from jaxreg.io.points import write_points
from jaxreg.io.reading import InputError
from jaxreg.io.volumes import MAX_ABS_VALUE
from jaxreg.io.volumes import MAX_SPACING_MM
from jaxreg.io.volumes import MAX_VOXELS
from jaxreg.io.volumes import MIN_SIDE
from jaxreg.io.volumes import MIN_SPACING_MM
from jaxreg.io.volumes import Volume
from jaxreg.io.volumes import coverage
from jaxreg.io.volumes import field_to_mm
from jaxreg.io.volumes import field_to_voxels
from jaxreg.io.volumes import load_field
from jaxreg.io.volumes import load_labels
from jaxreg.io.volumes import load_volume
from jaxreg.io.volumes import resample_to
from jaxreg.io.volumes import same_grid
from jaxreg.io.volumes import save_volume

__all__ = [
    "InputError", "Volume", "MAX_VOXELS", "MIN_SIDE", "MIN_SPACING_MM", "MAX_SPACING_MM",
    "MAX_ABS_VALUE", "load_volume", "load_labels", "load_field", "save_volume", "resample_to",
    "same_grid", "coverage", "field_to_mm", "field_to_voxels",
    "Points", "read_points", "write_points",
]
