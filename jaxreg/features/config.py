"""How features are made from a volume pair: :class:`FeatureConfig`, the settings of every
stage of :func:`jaxreg.features.pair_features` (:mod:`jaxreg.features.extract`)."""

from __future__ import annotations

import dataclasses

from jaxreg.features.intensity import PERCENTILES, RENDERS

__all__ = ["FeatureConfig", "UPSAMPLES", "RENDER_SETTINGS"]


UPSAMPLES = ("linear", "guided")  # FeatureConfig.upsample
RENDER_SETTINGS = RENDERS + ("auto",)  # FeatureConfig.render


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """How features are made from a volume pair.

    Attributes:
      axes: slicing axes of the ``(H, W, D)`` volume; ``(2,)`` is the reference (slices
        along the third axis), ``(0, 1, 2)`` is tri-planar. A 2D pair has one plane, the
        image itself: any single axis means it, several are refused.
      fusion: how tri-planar features are fused: ``"concat"`` (a PCA per axis, channels
        concatenated: ``3 * pca_dims`` channels) or ``"mean"`` (one PCA basis fitted on the
        tokens of all three axes, the three projected volumes averaged).
      gap: encode every ``gap``-th slice (and the last); 1 encodes all.
      layers: encoder output maps to use (``"features"``: the reference's last layer).
      pca_dims: PCA channels per output map.
      image_size: encoder input side in pixels; 0 is the encoder's own.
      chunk: slices per encoder call; 0 chooses from the device memory.
      percentiles: intensity clipping of :func:`normalise_intensity`.
      uniform_tolerance: a slice whose normalised range is at most this is dropped.
      scale: divide PCA outputs by the standard deviation of the first component, so that
        the solver's similarity weight means the same for every encoder.
      render: what the encoder sees (:func:`render`): ``"intensity"`` (the reference),
        ``"gradient"`` (the gradient magnitude, for pairs of different contrasts) or
        ``"auto"`` (chosen per pair by :func:`choose_render`; the registration
        defaults of every encoder, :func:`jaxreg.registration.default_config`).
      shifts: sub-token shifts per in-plane axis; 1 is off, 2 encodes every slice 4 times
        (half-token shifts) for maps twice as dense (:mod:`jaxreg.features.subtoken`).
      upsample: token maps to pixels in-plane: ``"linear"`` (the reference) or
        ``"guided"`` (joint bilateral, guided by the normalised intensities,
        :mod:`jaxreg.features.upsample`); between encoded slices it is linear either way.
      guide_sigma_spatial: ``"guided"``: spatial sigma, in tokens.
      guide_sigma_range: ``"guided"``: intensity sigma, in normalised intensity [0, 1].
      adapter: a trained feature adapter file (:mod:`jaxreg.finetune.features`, written
        by ``python -m experiments.finetune``): the tokens of the maps it was trained for
        go through it before the PCA; ``render="auto"`` then means the render it was
        trained on. ``""``: none (the reference).
    """

    axes: tuple[int, ...] = (2,)
    fusion: str = "concat"
    gap: int = 6
    layers: tuple[str, ...] = ("features",)
    pca_dims: int = 3
    image_size: int = 0
    chunk: int = 0
    percentiles: tuple[float, float] = PERCENTILES
    uniform_tolerance: float = 1e-6
    scale: bool = True
    render: str = "intensity"
    shifts: int = 1
    upsample: str = "linear"
    guide_sigma_spatial: float = 1.0
    guide_sigma_range: float = 0.1
    adapter: str = ""

    def __post_init__(self):
        """Refuses settings that cannot work; each message starts ``<field>=<value>:``."""
        def refuse(name, accepts):
            raise ValueError(f"{name}={getattr(self, name)!r}: {accepts}")

        if not self.axes or any(a not in (0, 1, 2) for a in self.axes):
            refuse("axes", "must be a non-empty subset of 0, 1, 2")
        if self.render not in RENDER_SETTINGS:
            refuse("render", f"must be one of {', '.join(RENDER_SETTINGS)}")
        if self.fusion not in ("concat", "mean"):
            refuse("fusion", "must be one of concat, mean")
        if self.upsample not in UPSAMPLES:
            refuse("upsample", f"must be one of {', '.join(UPSAMPLES)}")
        for name in ("guide_sigma_spatial", "guide_sigma_range"):
            if isinstance(getattr(self, name), bool) or not getattr(self, name) > 0:
                refuse(name, "must be a number > 0")
        for name, minimum in (("gap", 1), ("pca_dims", 1), ("image_size", 0), ("chunk", 0),
                              ("shifts", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                refuse(name, f"must be an integer >= {minimum}")
        if not isinstance(self.adapter, str):
            refuse("adapter", "must be a file path (a string), '' for none")
        if not self.layers:
            refuse("layers", "need at least one encoder output map")
