"""jaxreg: zero-shot deformable registration with foundation-model features, in JAX.

One call registers a pair, one object holds the result::

    transform = jaxreg.register("fixed.nii.gz", "moving.nii.gz", method="mind")
    transform.apply("moving_phase2.nii.gz"); transform.export("out/")

The pieces, by folder (docs/architecture.md draws the layers and the data flow):

* :mod:`jaxreg.registration`: :func:`register` and its stages, the settings of every
  method (:func:`~jaxreg.registration.default_config`);
* :mod:`jaxreg.transform`: :class:`Transform` (apply to images and labels, map points,
  invert, save as ANTs/ITK/Slicer files);
* :mod:`jaxreg.warping`: identity grid, warping (pull, trilinear; nearest for labels),
  composition, inversion and resizing of voxel displacement fields ``(H, W, D, 3)``, or
  ``(H, W, 2)`` for 2D images (every engine module takes 2D input; the dimension comes
  from it);
* :mod:`jaxreg.regularisers`: diffusion and bending regularisers, Jacobian determinant;
* :mod:`jaxreg.losses`: similarity losses to compose (SSD, NCC, local NCC, Parzen mutual
  information);
* :mod:`jaxreg.features`: what the solver compares: MIND-SSC, and volumes -> slices ->
  encoder -> PCA -> feature volumes, behind one source interface;
* :mod:`jaxreg.solver`: ConvexAdam (coupled convex coarse stage, Adam fine stage), the
  rigid/affine pre-alignment, many pairs at once; :mod:`jaxreg.kernels`: its CPU kernels;
* :mod:`jaxreg.io`: NIfTI/NRRD/DICOM volumes and label maps with their affines, landmark
  files, atomic writes;
* :mod:`jaxreg.encoders`: Flax NNX ports of SAM, TinyViT (LiteMedSAM, MobileSAM), DINOv2,
  DINOv3, CLIP, SAM2's Hiera; :mod:`jaxreg.encoders.registry` names them and finds their
  weights;
* :mod:`jaxreg.segment`: promptable segmentation (SAM-style prompt encoder and mask
  decoder, 2D and 3D);
* :mod:`jaxreg.experiment`: a registration study over pairs (behind the CLIs);
* :mod:`jaxreg.metrics` (Dice, HD95, Jacobian statistics, TRE, field error),
  :mod:`jaxreg.qc` (QC pictures), :mod:`jaxreg.phantom` (the built-in breast MRI phantom),
  :mod:`jaxreg.compilation` (``jax.jit`` with the XLA options the warp's loss needs on
  CPU), :mod:`jaxreg.filters`.

Importing jaxreg registers nothing and leaves ``jax.config`` alone.
"""

from jaxreg.compilation import jit
from jaxreg.features import FeatureConfig
from jaxreg.features import SliceEncoder
from jaxreg.features import pair_features
from jaxreg.features.mind import mind_ssc
from jaxreg.features.sources import EncoderSource
from jaxreg.features.sources import MindSource
from jaxreg.features.sources import PairFeatures
from jaxreg.io import InputError
from jaxreg.io import Volume
from jaxreg.io import field_to_mm
from jaxreg.io import field_to_voxels
from jaxreg.io import load_labels
from jaxreg.io import load_volume
from jaxreg.io import resample_to
from jaxreg.io import save_volume
from jaxreg.io.points import Points
from jaxreg.io.points import read_points
from jaxreg.io.points import write_points
from jaxreg.losses import local_ncc
from jaxreg.losses import ncc
from jaxreg.losses import ssd
from jaxreg.losses.mi import MIConfig
from jaxreg.metrics import dice
from jaxreg.metrics import field_error
from jaxreg.metrics import hd95
from jaxreg.metrics import jacobian_stats
from jaxreg.metrics import tre
from jaxreg.phantom import breast_pair
from jaxreg.phantom import random_field
from jaxreg.registration import RegistrationConfig
from jaxreg.registration import default_config
from jaxreg.registration import make_source
from jaxreg.registration import register
from jaxreg.regularisers import bending_energy
from jaxreg.regularisers import diffusion
from jaxreg.regularisers import jacobian_determinant
from jaxreg.solver import ConvexAdamConfig
from jaxreg.solver import coarse_stage
from jaxreg.solver import convex_adam
from jaxreg.solver import fine_stage
from jaxreg.solver import register_mind
from jaxreg.solver.affine import AffineConfig
from jaxreg.solver.affine import register_affine
from jaxreg.solver.batching import register_batch
from jaxreg.transform import Transform
from jaxreg.transform import inverse_consistency
from jaxreg.warping import compose
from jaxreg.warping import identity_grid
from jaxreg.warping import invert
from jaxreg.warping import resize_field
from jaxreg.warping import warp
from jaxreg.warping import warp_labels

__version__ = "0.1.0"

__all__ = [
    "register", "RegistrationConfig", "default_config", "make_source",
    "Transform", "inverse_consistency",
    "Points", "read_points", "write_points",
    "AffineConfig", "register_affine",
    "register_batch",
    "jit",
    "FeatureConfig", "SliceEncoder", "pair_features",
    "InputError", "Volume", "field_to_mm", "field_to_voxels", "load_labels", "load_volume",
    "resample_to", "save_volume",
    "local_ncc", "ncc", "ssd",
    "dice", "field_error", "hd95", "jacobian_stats", "tre",
    "mind_ssc",
    "MIConfig",
    "breast_pair", "random_field",
    "bending_energy", "diffusion", "jacobian_determinant",
    "ConvexAdamConfig", "coarse_stage", "convex_adam", "fine_stage", "register_mind",
    "EncoderSource", "MindSource", "PairFeatures",
    "compose", "identity_grid", "invert", "resize_field", "warp", "warp_labels",
]
