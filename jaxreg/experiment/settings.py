"""The experiment config checked once at start, and turned into the library's typed configs.

The experiment's settings are an ``ml_collections`` ConfigDict of plain values
(``experiments/configs/breast.py``). :func:`check_config` refuses nonsense before any
work starts, naming the field and what it accepts; :func:`solver_config` and
:func:`feature_config` give the frozen dataclasses that the library takes.
:func:`result_settings` is the part of the config that shapes a pair's results, recorded
beside each pair so that a rerun with other settings is noticed.
"""

from __future__ import annotations

import math
from typing import Any

from jaxreg import features as feat_lib
from jaxreg import io
from jaxreg import phantom
from jaxreg import solver
from jaxreg.encoders import registry

__all__ = ["ConfigError", "ENCODERS", "PYRAMIDS", "check_config", "solver_config",
           "feature_config", "result_settings"]

ENCODERS = ("mind",) + tuple(registry.ENCODERS)
PYRAMIDS = ("none", "joint", "coarse_to_fine")
DTYPES = ("auto", "float32", "bfloat16")


class ConfigError(io.InputError):
    """A setting that cannot work; the message names the field and what it accepts."""


def _fail(field: str, value: Any, accepts: str) -> None:
    raise ConfigError(f"config.{field}={value!r}: {accepts}")


def _int(config: Any, field: str, minimum: int) -> None:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(field, value, f"must be an integer >= {minimum}")


def _get(config: Any, field: str) -> Any:
    value = config
    for key in field.split("."):
        value = value[key]
    return value


def solver_config(config: Any) -> solver.ConvexAdamConfig:
    """The solver's frozen config from ``config.solver``.

    Raises:
      ConfigError: a field of ``config.solver`` is out of range.
    """
    values = dict(config.solver)
    if "coupling" in values:
        values["coupling"] = tuple(values["coupling"])
    try:
        return solver.ConvexAdamConfig(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.solver: {e}") from None


def feature_config(config: Any, encoder: str | None = None) -> feat_lib.FeatureConfig:
    """The feature pipeline's frozen config from ``config.features`` and the encoder.

    Raises:
      ConfigError: a field of ``config.features`` is out of range.
    """
    f = config.features
    entry = registry.ENCODERS[encoder or config.encoder]
    if f.pyramid not in PYRAMIDS:
        _fail("features.pyramid", f.pyramid, f"must be one of {', '.join(PYRAMIDS)}")
    layers = ("features",) if f.pyramid == "none" else entry.pyramid
    try:
        return feat_lib.FeatureConfig(
            axes=tuple(f.axes), fusion=f.fusion, gap=f.gap, layers=layers,
            pca_dims=f.pca_dims or entry.pca_dims, image_size=f.image_size, chunk=f.chunk,
            percentiles=tuple(f.percentiles))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.features: {e}") from None


def check_config(config: Any) -> None:
    """Refuses settings that cannot work, before anything is loaded or written.

    Raises:
      ConfigError: naming the field, its value and what it accepts.
    """
    if config.encoder not in ENCODERS:
        _fail("encoder", config.encoder, f"must be one of {', '.join(ENCODERS)}")
    solver_config(config)
    _int(config, "mind.radius", 0)
    _int(config, "mind.dilation", 1)
    _int(config, "batch.batch_per_device", 1)
    if config.features.dtype not in DTYPES:
        _fail("features.dtype", config.features.dtype, f"must be one of {', '.join(DTYPES)}")
    for field in ("gap", "pca_dims", "image_size", "chunk"):
        _int(config, f"features.{field}", 1 if field == "gap" else 0)
    low_high = tuple(config.features.percentiles)
    if (len(low_high) != 2 or not all(isinstance(p, (int, float)) and math.isfinite(p)
                                       for p in low_high)
            or not 0 <= low_high[0] < low_high[1] <= 100):
        _fail("features.percentiles", low_high, "must be two numbers 0 <= low < high <= 100")
    if config.encoder != "mind":
        feature_config(config)
    elif config.features.pyramid not in PYRAMIDS:
        _fail("features.pyramid", config.features.pyramid, f"must be one of {', '.join(PYRAMIDS)}")
    if not config.pairs and not config.data_dir:
        tasks = tuple(config.phantom.tasks)
        unknown = [t for t in tasks if t not in phantom.TASKS]
        if not tasks or unknown:
            _fail("phantom.tasks", tasks, f"must be some of {', '.join(phantom.TASKS)}")
        shape = tuple(config.phantom.shape)
        if len(shape) != 3 or not all(isinstance(s, int) and s >= 8 for s in shape):
            _fail("phantom.shape", shape, "must be three integers >= 8")


def result_settings(config: Any) -> dict[str, Any]:
    """The settings that shape a pair's outputs (not how fast or where they are made)."""
    out: dict[str, Any] = {
        "encoder": config.encoder,
        "solver": config.solver.to_dict(),
        "metrics": config.metrics.to_dict(),
    }
    if config.encoder == "mind":
        out["mind"] = config.mind.to_dict()
        out["percentiles"] = list(config.features.percentiles)
    else:
        out["weights"] = config.weights
        out["features"] = {k: v for k, v in config.features.to_dict().items()
                           if k not in ("cache", "chunk")}
    if not config.pairs and not config.data_dir:
        out["phantom"] = config.phantom.to_dict()
    return out
