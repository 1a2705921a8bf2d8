"""The solvers: what turns two feature volumes into a displacement field.

* :mod:`jaxreg.solver.config`: :class:`ConvexAdamConfig`, the settings of both stages, and
  the padded-grid helpers they share;
* :mod:`jaxreg.solver.coarse`: the coarse stage (dense correlation over a cube of offsets,
  coupled convex optimisation, inverse consistency);
* :mod:`jaxreg.solver.convexadam`: the fine stage (Adam on the warped-feature SSD plus a
  diffusion regulariser) and the two stages chained (:func:`convex_adam`,
  :func:`register_mind`);
* :mod:`jaxreg.solver.checks`: the checks of concrete inputs and of a solved field;
* :mod:`jaxreg.solver.affine`: rigid/affine pre-alignment (optax), its world matrices and
  ITK files;
* :mod:`jaxreg.solver.batching`: many pairs at once (shape buckets, padding, vmap and
  sharding over devices, the memory plan).

The CPU kernels the fine stage uses are in :mod:`jaxreg.kernels`.
"""

from jaxreg.solver.affine import AffineConfig
from jaxreg.solver.affine import register_affine
from jaxreg.solver.batching import register_batch
from jaxreg.solver.checks import check_field
from jaxreg.solver.coarse import coarse_stage
from jaxreg.solver.coarse import correlation_cost
from jaxreg.solver.coarse import coupled_convex
from jaxreg.solver.coarse import inverse_consistency
from jaxreg.solver.config import ConvexAdamConfig
from jaxreg.solver.convexadam import convex_adam
from jaxreg.solver.convexadam import fine_stage
from jaxreg.solver.convexadam import register_mind

__all__ = [
    "ConvexAdamConfig",
    "correlation_cost",
    "coupled_convex",
    "inverse_consistency",
    "coarse_stage",
    "fine_stage",
    "convex_adam",
    "register_mind",
    "check_field",
    "AffineConfig",
    "register_affine",
    "register_batch",
]
