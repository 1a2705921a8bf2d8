"""Similarity losses between two images or feature volumes, to compose with
:mod:`jaxreg.warping` and :mod:`jaxreg.regularisers` in your own objective.

* :mod:`jaxreg.losses.image`: SSD, NCC, local (windowed) NCC, and the fused warp + SSD the
  fine stage minimises;
* :mod:`jaxreg.losses.mi`: Parzen-window mutual information (Gaussian or cubic B-spline
  kernels) for cross-contrast pairs.

MIND-SSC, the default similarity of the solver, is a feature descriptor compared by SSD:
see :mod:`jaxreg.features.mind`.
"""

from jaxreg.losses.image import local_ncc
from jaxreg.losses.image import ncc
from jaxreg.losses.image import ssd
from jaxreg.losses.image import warped_ssd
from jaxreg.losses.mi import MIConfig
from jaxreg.losses.mi import mutual_information

__all__ = ["ssd", "warped_ssd", "ncc", "local_ncc", "MIConfig", "mutual_information"]
