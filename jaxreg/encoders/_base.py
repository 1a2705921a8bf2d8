"""What every encoder module hands the feature pipeline: its preprocessing as data.

An encoder module (``sam.py``, ``tinyvit.py``, ``dinov2.py`` ...) exposes
  * the NNX model, whose ``__call__(images)`` takes ``(B, H, W, 3)`` images already
    preprocessed and returns a dict of named float32 feature maps ``(B, h, w, C)``
    (the feature pyramid; the key ``"features"`` is the reference's default output);
  * ``VARIANTS``: ``{name: EncoderSpec}``;
  * ``create(name, *, dtype, rngs)`` and ``load(name, path, *, dtype)``.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Preprocessing", "EncoderSpec"]


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a grey slice becomes the encoder's input.

    The pipeline min-max scales a slice to ``value_range``, copies grey to 3 channels,
    resizes it (``"square"``: to ``image_size`` x ``image_size``; ``"longest_side_pad"``:
    longest side to ``image_size``, zero-padded bottom/right), then applies
    ``(x - mean) / std`` per channel.
    """

    image_size: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    value_range: tuple[float, float] = (0.0, 1.0)
    resize: str = "square"


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """A named variant: architecture config, preprocessing, and output geometry."""

    name: str
    config: object  # the family's own frozen config dataclass
    preprocessing: Preprocessing
    patch_size: int
    channels: int  # channels of the default "features" output
