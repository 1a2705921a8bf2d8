"""What the solver compares: feature volumes made from the images.

* :mod:`jaxreg.features.intensity`: percentile clipping, the renders an encoder sees
  (intensity, gradient magnitude), foreground masks;
* :mod:`jaxreg.features.mind`: MIND-SSC, the handcrafted descriptor;
* :mod:`jaxreg.features.encoding`: a foundation-model encoder over the slices of a volume
  (input geometry, chunking, the on-disk feature cache);
* :mod:`jaxreg.features.pca`: PCA fitted jointly on both images' tokens;
* :mod:`jaxreg.features.config`: :class:`FeatureConfig`, the settings of every stage;
* :mod:`jaxreg.features.extract`: volumes -> slices -> encoder -> PCA -> feature volumes
  (:func:`pair_features`);
* :mod:`jaxreg.features.subtoken`: sub-token shifts, token maps denser than the stride;
* :mod:`jaxreg.features.upsample`: token maps to pixels guided by the image (joint
  bilateral upsampling);
* :mod:`jaxreg.features.sources`: a pair of images in, a pair of feature volumes out:
  :class:`MindSource`, :class:`EncoderSource`, :class:`HybridSource`; the solver only ever
  sees what a source returns.

The encoders themselves (Flax NNX ports) are in :mod:`jaxreg.encoders`.
"""

from jaxreg.features.encoding import FeatureCache
from jaxreg.features.encoding import SliceEncoder
from jaxreg.features.encoding import encoder_input
from jaxreg.features.encoding import token_geometry
from jaxreg.features.config import FeatureConfig
from jaxreg.features.extract import SlicePlan
from jaxreg.features.extract import interpolation_matrix
from jaxreg.features.extract import pair_features
from jaxreg.features.extract import slice_plan
from jaxreg.features.extract import to_image_grid
from jaxreg.features.intensity import AUTO_THRESHOLD
from jaxreg.features.intensity import choose_render
from jaxreg.features.intensity import contrast_agreement
from jaxreg.features.intensity import foreground_mask
from jaxreg.features.intensity import normalise_intensity
from jaxreg.features.intensity import render
from jaxreg.features.mind import mind_ssc
from jaxreg.features.pca import PCA
from jaxreg.features.pca import fit_pca
from jaxreg.features.pca import project
from jaxreg.features.sources import EncoderSource
from jaxreg.features.sources import FeatureSource
from jaxreg.features.sources import HybridSource
from jaxreg.features.sources import MindSource
from jaxreg.features.sources import PairFeatures
from jaxreg.features.sources import hybrid_scales

__all__ = [
    "FeatureConfig",
    "SlicePlan",
    "PCA",
    "normalise_intensity",
    "render",
    "choose_render",
    "contrast_agreement",
    "AUTO_THRESHOLD",
    "foreground_mask",
    "slice_plan",
    "interpolation_matrix",
    "encoder_input",
    "token_geometry",
    "SliceEncoder",
    "fit_pca",
    "project",
    "to_image_grid",
    "FeatureCache",
    "pair_features",
    "mind_ssc",
    "PairFeatures",
    "FeatureSource",
    "MindSource",
    "EncoderSource",
    "HybridSource",
    "hybrid_scales",
]
