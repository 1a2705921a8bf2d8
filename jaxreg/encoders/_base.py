"""What every encoder family shares: preprocessing as data, output names, the load sequence.

What a family module must provide is listed in :mod:`jaxreg.encoders.registry`; this module
holds the pieces they all use.

Output maps. A model's ``__call__(images)`` takes ``(B, H, W, 3)`` images already
preprocessed and returns a dict of float32 arrays named the same way in every family,
every index counted from 1:

* ``"block_<i>"``, i = 1 .. depth: the patch tokens after transformer block ``i`` as a
  ``(B, h, w, C)`` map (SAM, DINOv2, DINOv3, CLIP); ``block_<i>`` is what transformers
  calls ``hidden_states[i]``;
* ``"stage_<i>"``, i = 1 .. number of stages: the output of hierarchical stage ``i``
  (TinyViT: after its patch merging; SAM2's Hiera: its last block);
* ``"fpn_<i>"``, i = 1 .. number of levels: FPN neck level ``i``, highest resolution
  first (SAM2: strides 4, 8, 16);
* ``"features"``: the final map, the reference's single output (SAM and TinyViT: the neck;
  the ViTs: the final-normed patch tokens, see each module);
* ``"cls"``: ``(B, C)``, the final class token, for models that have one.

A registry pyramid (``registry.ENCODERS[name].pyramid``) names maps this way, e.g. SAM's
``("block_6", "block_9", "features")``: after ViT-B's 2nd and 3rd global-attention blocks.

Loading. :func:`load_checkpoint` is every family's ``load``: read the file or folder
(:func:`jaxreg.encoders.checkpoint.read_checkpoint`), convert it with the family's
``convert`` unless it already holds jaxreg's names, build the model without computing its
initial values, check a folder's ``config.json`` / ``open_clip_config.json`` against the
architecture (:func:`jaxreg.encoders._folder_config.check_folder`: model type, activation,
sizes, heads, norm epsilon ...), assign every parameter strictly (everything missing,
unexpected or mis-shaped is listed in one :class:`~jaxreg.encoders.checkpoint.CheckpointError`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxreg.encoders import _folder_config
from jaxreg.encoders import checkpoint as _checkpoint

if TYPE_CHECKING:  # the annotations only: MIND-SSC runs never load flax
    from flax import nnx

__all__ = ["Preprocessing", "EncoderSpec", "variant_config", "read_params", "abstract_with",
           "ShapeOnlyRngs", "load_checkpoint"]


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a grey slice becomes the encoder's input.

    The pipeline min-max scales a slice to ``value_range``, copies grey to 3 channels,
    resizes it (``"square"``: to ``image_size`` x ``image_size``; ``"longest_side_pad"``:
    longest side to ``image_size``, padded bottom/right), then applies
    ``(x - mean) / std`` per channel. ``pad`` says where the padding's zeros are:
    ``"input"`` zero pixels before the mean/std (LiteMedSAM, which has none), or
    ``"normalised"`` zeros after it, the mean colour (SAM's and MobileSAM's predictors).
    """

    image_size: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    value_range: tuple[float, float] = (0.0, 1.0)
    resize: str = "square"
    pad: str = "input"


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """A named variant: architecture config, preprocessing, and output geometry."""

    name: str
    config: object  # the family's own frozen config dataclass
    preprocessing: Preprocessing
    patch_size: int
    channels: int  # channels of the default "features" output


def variant_config(variants: Mapping[str, EncoderSpec], variant: object, family: str):
    """The architecture ``create(variant)`` builds.

    Args:
      variants: the family's ``VARIANTS``.
      variant: a ``VARIANTS`` name, or a config of the family's config type (small test
        models, changed settings).
      family: the family's name for errors.

    Raises:
      ValueError: an unknown name. TypeError: neither a name nor a config of that type.
    """
    if isinstance(variant, str):
        if variant not in variants:
            raise ValueError(f"unknown {family} variant {variant!r}; known: {sorted(variants)}")
        return variants[variant].config
    config_type = type(next(iter(variants.values())).config)
    if not isinstance(variant, config_type):
        raise TypeError(f"{family} variant must be a name or a {config_type.__name__}, "
                        f"got {type(variant).__name__}")
    return variant


Convert = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def read_params(convert: Convert, path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """Reads a checkpoint and converts it to jaxreg's names, unless it already has them.

    Returns:
      (flat params, the path to quote in errors).
    """
    sd, source = _checkpoint.read_checkpoint(path)
    return (dict(sd) if _checkpoint.is_converted(sd) else convert(sd)), source


class ShapeOnlyRngs:
    """Stands in for ``nnx.Rngs`` when a model is built for its shapes only (under
    ``nnx.eval_shape``, its values replaced by a checkpoint's): every stream gives the same
    key, and no counter is advanced.

    An ``nnx.Rngs`` advances a traced counter at each draw; flax then compares that
    tracer's ``sharding`` with the old one's, and JAX answers each such query by searching
    and printing the trace so far for an error message: about 1.25 s of the 3.3 s a
    LiteMedSAM encoder + heads load took on the 2-core CPU, growing with the model. The
    layers jaxreg builds (flax's Linear, Conv, LayerNorm, BatchNorm, Embed and its own
    parameters) only ever call ``rngs.params()``; ``tests/test_encoder_loading.py`` checks
    that every family builds the same abstract state with it as with ``nnx.Rngs``.
    """

    def __call__(self):
        return jax.random.key(0)

    params = default = __call__


def abstract_with(create: Callable[..., nnx.Module], variant: object,
                  params: Mapping[str, np.ndarray], *, source: str,
                  dtype=jnp.float32, folder: str | os.PathLike | None = None) -> nnx.Module:
    """``create(variant)`` built without initial values, with ``params`` assigned strictly.

    ``folder``: the model folder ``params`` came from, if any; its ``config.json`` /
    ``open_clip_config.json`` must describe the model's ``config``
    (:func:`jaxreg.encoders._folder_config.check_folder`).
    """
    from flax import nnx  # with the encoders only: MIND-SSC runs never load flax
    model = nnx.eval_shape(lambda: create(variant, rngs=ShapeOnlyRngs(), dtype=dtype))
    if folder is not None and hasattr(model, "config"):
        _folder_config.check_folder(folder, model.config)
    _checkpoint.assign_params(model, params, source=source)
    return model


def load_checkpoint(create: Callable[..., nnx.Module], convert: Convert, variant: object,
                    path: str | os.PathLike, *, dtype=jnp.float32,
                    variant_for: Callable[[object, Mapping[str, np.ndarray]], object] | None = None
                    ) -> nnx.Module:
    """The load sequence of every family: read, convert, check strictly, assign.

    Args:
      create: the family's ``create``.
      convert: the family's ``convert``.
      variant: a ``VARIANTS`` name or a config (see :func:`variant_config`).
      path: a weight file, a Hugging Face model folder or an offline Hugging Face cache
        folder (:func:`jaxreg.encoders.checkpoint.resolve_checkpoint`).
      dtype: compute dtype (parameters stay float32).
      variant_for: ``(variant, converted params) -> variant`` when the checkpoint's layout
        decides between variants (:func:`jaxreg.encoders.clip.variant_for`).

    Returns:
      The model, its parameters on the default device.

    Raises:
      CheckpointError: unreadable, not the family's layout, a folder whose
        ``config.json`` / ``open_clip_config.json`` describes another architecture (the
        file and fields named), or any parameter missing, unexpected or mis-shaped (all
        listed).
    """
    params, source = read_params(convert, path)
    if variant_for is not None:
        variant = variant_for(variant, params)
    folder = path if os.path.isdir(path) else None
    model = abstract_with(create, variant, params, source=source, dtype=dtype, folder=folder)
    from flax import nnx  # with the encoders only: MIND-SSC runs never load flax
    graphdef, state = nnx.split(model)  # host numpy -> jax arrays
    logging.info("Loaded %s from %s (%d tensors).",
                 variant if isinstance(variant, str) else type(model).__name__, source,
                 len(params))
    # jax.device_put, not jnp.asarray: jax 0.10 stages each numpy array through a small
    # jitted program per shape (traced, lowered and compiled or loaded: ~25 ms each, 1.5 s
    # for LiteMedSAM's 61 shapes); device_put copies the arrays without one.
    return nnx.merge(graphdef, jax.tree.map(jax.device_put, state))
