"""The study's settings as frozen dataclasses, built once from the experiment's ConfigDict.

The CLI's settings are an ``ml_collections`` ConfigDict of plain values
(``experiments/configs/breast.py``). :func:`from_configdict` checks it once, refusing
nonsense before any work starts (naming the field and what it accepts), and returns a
:class:`StudyConfig`; below that edge the experiment takes typed settings only.
:func:`result_settings` is the part that shapes a pair's results, recorded beside each
pair so that a rerun with other settings is noticed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, get_args

from jaxreg import features as feat_lib
from jaxreg import phantom
from jaxreg import registration
from jaxreg import solver
from jaxreg.encoders import registry

__all__ = ["ConfigError", "ENCODERS", "HYBRID_SUFFIX", "PYRAMIDS", "MindSettings",
           "RegistrationConfig", "PhantomSettings", "StudyConfig", "from_configdict", "result_settings"]

HYBRID_SUFFIX = registration.HYBRID_SUFFIX
ENCODERS = registration.METHODS
Pyramid = registration.Pyramid
PYRAMIDS = get_args(Pyramid)
Dtype = registration.Dtype
Attention = registration.Attention
AFFINES = registration.AFFINES
# The typed registration settings are the library's (jaxreg.register takes them too).
MindSettings = registration.MindSettings
RegistrationConfig = registration.RegistrationConfig


ConfigError = registration.ConfigError


@dataclasses.dataclass(frozen=True)
class PhantomSettings:
    """The built-in breast phantom's task types, grid and seed."""

    tasks: tuple[str, ...] = phantom.TASKS
    shape: tuple[int, int, int] = (112, 80, 48)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """A whole study: which pairs, how each is registered, what is written.

    Attributes:
      registration: how each pair is registered.
      pairs, data_dir: the pairs CSV and the folder relative paths start from; both
        empty: the built-in phantom.
      phantom: the phantom's settings.
      batch_per_device: pairs per device at once (capped by the memory plan).
      devices: this host's devices (``""`` all, ``"2"`` the first two, ``"0,3"`` ids).
      qc: a QC picture per pair.
      hd95: score label maps by HD95 as well as Dice.
      similarity_mask: the label name whose maps (``mov_<name>``/``fix_<name>`` columns)
        restrict the similarity where a pair has them (``"mask"``: the ``mov_mask`` and
        ``fix_mask`` columns); ``""``: never.
    """

    registration: RegistrationConfig = RegistrationConfig()
    pairs: str = ""
    data_dir: str = ""
    phantom: PhantomSettings = PhantomSettings()
    batch_per_device: int = 1
    devices: str = ""
    qc: bool = True
    hd95: bool = True
    similarity_mask: str = "mask"

    @property
    def uses_phantom(self) -> bool:
        return not self.pairs and not self.data_dir


def _fail(field: str, value: Any, accepts: str) -> None:
    raise ConfigError(f"config.{field}={value!r}: {accepts}")


def _int(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(field, value, f"must be an integer >= {minimum}")
    return value


def _choice(value: Any, field: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        _fail(field, value, f"must be one of {', '.join(choices)}")
    return value


def _solver(c: Any) -> solver.ConvexAdamConfig:
    values = dict(c.solver)
    if "coupling" in values:
        values["coupling"] = tuple(values["coupling"])
    try:
        return solver.ConvexAdamConfig(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.solver: {e}") from None


def _percentiles(c: Any) -> tuple[float, float]:
    low_high = tuple(c.features.percentiles)
    if (len(low_high) != 2 or not all(isinstance(p, (int, float)) and math.isfinite(p)
                                       for p in low_high)
            or not 0 <= low_high[0] < low_high[1] <= 100):
        _fail("features.percentiles", low_high, "must be two numbers 0 <= low < high <= 100")
    return low_high


def _features(c: Any, pyramid: str) -> feat_lib.FeatureConfig:
    """The config's ``features`` block as a :class:`FeatureConfig` (its own checks)."""
    entry = registry.ENCODERS[c.encoder.removesuffix(HYBRID_SUFFIX)]
    fields = {f.name for f in dataclasses.fields(feat_lib.FeatureConfig)}
    values = {k: v for k, v in c.features.items() if k in fields}
    values.update(axes=tuple(values["axes"]), percentiles=_percentiles(c),
                  layers=("features",) if pyramid == "none" else entry.pyramid,
                  pca_dims=values["pca_dims"] or entry.pca_dims)  # 0: the encoder's own
    try:
        return feat_lib.FeatureConfig(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.features.{e}") from None


def _hybrid_weight(c: Any, encoder: str) -> float:
    weight = c.get("hybrid_weight", 0.0)
    if (isinstance(weight, bool) or not isinstance(weight, (int, float))
            or not math.isfinite(weight) or weight < 0):
        _fail("hybrid_weight", weight, "must be a finite number >= 0")
    if weight and not encoder.endswith(HYBRID_SUFFIX):
        _fail("hybrid_weight", weight, f"applies to a hybrid encoder only (e.g. "
              f"{encoder if encoder != 'mind' else 'litemedsam'}{HYBRID_SUFFIX}), not {encoder}")
    return float(weight)


def _registration(c: Any) -> RegistrationConfig:
    encoder = _choice(c.encoder, "encoder", ENCODERS)
    pyramid = _choice(c.features.pyramid, "features.pyramid", PYRAMIDS)
    return RegistrationConfig(
        encoder=encoder, solver=_solver(c),
        mind=MindSettings(radius=_int(c.mind.radius, "mind.radius", 0),
                          dilation=_int(c.mind.dilation, "mind.dilation", 1)),
        hybrid_weight=_hybrid_weight(c, encoder),
        features=None if encoder == "mind" else _features(c, pyramid),
        pyramid=pyramid, percentiles=_percentiles(c), weights=str(c.weights),
        mask=str(c.features.mask),
        dtype=_choice(c.features.dtype, "features.dtype", get_args(Dtype)),
        attention=_choice(c.features.get("attention", "xla"), "features.attention",
                          get_args(Attention)),
        cache=bool(c.features.cache),
        affine=_choice(c.get("affine", "none"), "affine", AFFINES))


def _phantom(c: Any, needed: bool) -> PhantomSettings:
    tasks, shape = tuple(c.phantom.tasks), tuple(c.phantom.shape)
    if needed:
        if not tasks or any(t not in phantom.TASKS for t in tasks):
            _fail("phantom.tasks", tasks, f"must be some of {', '.join(phantom.TASKS)}")
        if len(shape) != 3 or not all(isinstance(s, int) and s >= 8 for s in shape):
            _fail("phantom.shape", shape, "must be three integers >= 8")
    return PhantomSettings(tasks=tasks, shape=shape, seed=int(c.phantom.seed))


def from_configdict(c: Any) -> StudyConfig:
    """Checks the experiment's ConfigDict and turns it into a :class:`StudyConfig`.

    Raises:
      ConfigError: naming the field, its value and what it accepts.
    """
    if isinstance(c, StudyConfig):
        return c
    uses_phantom = not c.pairs and not c.data_dir
    return StudyConfig(
        registration=_registration(c), pairs=str(c.pairs), data_dir=str(c.data_dir),
        phantom=_phantom(c, uses_phantom),
        batch_per_device=_int(c.batch.batch_per_device, "batch.batch_per_device", 1),
        devices=str(c.batch.devices), qc=bool(c.qc), hd95=bool(c.metrics.hd95),
        similarity_mask=str(c.get("similarity_mask", "mask")))


_LATER_FEATURES = {"render": "intensity", "shifts": 1, "upsample": "linear",
                   "guide_sigma_spatial": 1.0, "guide_sigma_range": 0.1, "adapter": ""}
"""FeatureConfig fields added after results were first written, with the values that
reproduce the features from before them: :func:`result_settings` leaves them out there."""


def result_settings(config: StudyConfig) -> dict[str, Any]:
    """The settings that shape a pair's outputs (not how fast or where they are made)."""
    r = config.registration
    out: dict[str, Any] = {"encoder": r.encoder, "solver": dataclasses.asdict(r.solver),
                           "percentiles": list(r.percentiles), "hd95": config.hd95}
    if r.uses_mind:
        out["mind"] = dataclasses.asdict(r.mind)
    if r.encoder.endswith(HYBRID_SUFFIX):
        out["hybrid_weight"] = r.hybrid_weight
    if r.affine != "none":  # absent otherwise: earlier results stay valid
        out["affine"] = r.affine
    if r.model is not None:
        features = dataclasses.asdict(r.features)
        features.pop("chunk")
        # settings added later are absent at their reference values: results written
        # before them stay valid
        for field, reference in _LATER_FEATURES.items():
            if features.get(field) == reference:
                features.pop(field)
        out.update(weights=r.weights, features=features, pyramid=r.pyramid, mask=r.mask,
                   dtype=r.dtype)
    if config.uses_phantom:
        out["phantom"] = dataclasses.asdict(config.phantom)
    return out
