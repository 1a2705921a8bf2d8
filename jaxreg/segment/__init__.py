"""Zero-shot promptable segmentation: SAM's prompt encoder and mask decoder in Flax NNX.

* :mod:`~jaxreg.segment.prompt_encoder`: points, boxes, masks -> prompt embeddings;
* :mod:`~jaxreg.segment.mask_decoder` (two-way transformer in ``_two_way``): image and
  prompt embeddings -> mask logits and predicted IoU;
* :mod:`~jaxreg.segment.heads`: both together, their checkpoints (LiteMedSAM's and
  MobileSAM's from the installed packages, cached torch-free; SAM / MedSAM from a path);
* :mod:`~jaxreg.segment.predict`: 2D segmentation from a box or points, 3D from a box by
  LiteMedSAM's middle-slice propagation, or from a mask on one slice;
* :mod:`~jaxreg.segment.run`: the segment command's work, file to file (a volume and a
  box to a mask file, or Dice/IoU against a label map): :func:`segment_files`, behind
  ``python -m experiments.segment`` and ``jaxreg segment``.
"""

from jaxreg.segment.heads import HeadsConfig, SamHeads, convert, create, load, load_heads
from jaxreg.segment.mask_decoder import MaskDecoder
from jaxreg.segment.predict import (
    MODELS,
    Segmenter,
    load_segmenter,
    mask_box,
    normalise_intensity,
    propagate_from_mask,
    segment_2d,
    segment_3d,
)
from jaxreg.segment.prompt_encoder import PromptEncoder
from jaxreg.segment.run import SegmentSettings, segment_files

__all__ = [
    "PromptEncoder", "MaskDecoder", "HeadsConfig", "SamHeads", "create", "convert", "load",
    "load_heads", "MODELS", "Segmenter", "load_segmenter", "normalise_intensity", "mask_box",
    "segment_2d", "segment_3d", "propagate_from_mask", "SegmentSettings", "segment_files",
]
