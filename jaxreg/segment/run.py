"""The segment command's work, file to file: ``python -m experiments.segment`` and
``jaxreg segment`` only turn their flags into :class:`SegmentSettings` and call
:func:`segment_files`.

Two modes:

* a 3D box (``box``, ``out``): :func:`jaxreg.segment.segment_3d` on the image, the mask
  written as uint8 NIfTI (0/1) with the image's affine, atomically
  (:func:`jaxreg.io.save_volume`);
* a label map (``labels``): each structure prompted by its own bounding box
  (:func:`label_box`), the slices' embeddings shared by all structures, Dice and IoU per
  structure and their means (:func:`scores`); ``out`` the predicted label map, ``json``
  the scores.

Boxes are ``i0,j0,k0,i1,j1,k1`` in voxel indices of the image array, starts inclusive,
ends exclusive. A file or setting that does not fit raises :class:`jaxreg.io.InputError`
naming it. The commands first call :func:`prepare_process`: XLA's persistent
compilation cache (a second run loads the encoder and decoder programs instead of
compiling them), XLA's temporaries kept in the process (not mapped afresh for every
slice), and two CPU devices (two slices encoded at once).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from jaxreg import compilation, io
from jaxreg.io import InputError, atomic
from jaxreg.segment import predict

__all__ = ["SegmentSettings", "segment_files", "parse_box", "label_box", "scores",
           "choose_structures", "labels_on_grid", "prepare_process",
           "keep_freed_memory", "use_cpu_devices", "DEFAULT_COMPILATION_CACHE"]

DEFAULT_COMPILATION_CACHE = compilation.DEFAULT_CACHE
"""The commands' cache folder (:func:`jaxreg.compilation.use_caches`)."""


@dataclasses.dataclass(frozen=True)
class SegmentSettings:
    """What the segment command is asked, flag for flag (see the module docstring).

    Attributes:
      image: the input volume (.nii, .nii.gz, .nrrd, DICOM).
      box: ``"i0,j0,k0,i1,j1,k1"`` (segmentation mode, with ``out``).
      labels: a label map on the image's grid (evaluation mode; ``box`` is then unused).
      out: the mask (segmentation) or the predicted label map (evaluation, optional).
      model: one of :data:`jaxreg.segment.MODELS`.
      checkpoint: the model's checkpoint file (needed for ``sam`` / ``medsam``).
      axis: the slicing axis of the image array.
      margin: widening of each propagated box, pixels of a 256 px input.
      multimask: keep the best of SAM's 3 masks per slice.
      structures: label values to evaluate, as given (default: the ``largest`` largest).
      largest: how many structures without ``structures``.
      json: where to write the evaluation scores.
      decoder: a tuned mask decoder file (:func:`jaxreg.finetune.segment.save_decoder`,
        for the same model); ``""``: the pretrained heads.
    """

    image: str | None
    box: str | None = None
    labels: str | None = None
    out: str | None = None
    model: str = "litemedsam"
    checkpoint: str | None = None
    axis: int = 2
    margin: float = 3.0
    multimask: bool = False
    structures: Sequence[str] | None = None
    largest: int = 12
    json: str | None = None
    decoder: str = ""


def keep_freed_memory() -> bool:
    """glibc only: freed memory stays in the process (one malloc arena, no ``mmap`` for
    large blocks, no trimming), for the rest of the process.

    Each LiteMedSAM encoder call allocates ~550 MB of XLA temporaries (a 357 MB block and
    four of 32-64 MB) from XLA's worker threads; glibc serves such blocks with ``mmap`` and
    returns them with ``munmap``, so every slice faulted in and zero-filled them again:
    92,000 page faults and 0.2-0.25 s of system time per slice on the 2-core CPU, ~12 % of
    its CPU time; with this, no page faults after the first slice. A command's setting,
    for a process that runs one segmentation; the library functions never call it.
    Returns whether it applied (False off glibc).
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
    return all([mallopt(m_arena_max, 1), mallopt(m_mmap_max, 0),
                mallopt(m_trim_threshold, 2**31 - 1)])  # the most an int holds: 2 GiB


def use_cpu_devices(count: int = 2) -> bool:
    """Splits the CPU into ``count`` XLA:CPU devices (``jax_num_cpu_devices``), so that a
    :class:`~jaxreg.segment.Segmenter` encodes two slices at once (its ``devices``); they
    share the CPU's threads. Left alone when the number was set already (the config or
    ``XLA_FLAGS=--xla_force_host_platform_device_count``), when ``$JAX_PLATFORMS`` puts
    another platform first, or once JAX has started (then too late). On an accelerator
    the segmenter does not use the CPU devices. Returns whether it applied."""
    import jax

    if (jax.config.jax_num_cpu_devices != -1
            or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
            or os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] not in ("", "cpu")):
        return False
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backends have started: too late, and harmless
        return False
    return True


def prepare_process(compilation_cache: str | None = DEFAULT_COMPILATION_CACHE) -> dict:
    """The segment commands' process settings, before JAX starts: :func:`keep_freed_memory`,
    :func:`use_cpu_devices`, :func:`jaxreg.compilation.use_caches`. Returns what each did."""
    return {"keep_freed_memory": keep_freed_memory(), "cpu_devices": use_cpu_devices(),
            "compilation_cache": compilation.use_caches(compilation_cache)}


def parse_box(text: str, shape: Sequence[int], path: str) -> tuple[int, ...]:
    """``"i0,j0,k0,i1,j1,k1"`` -> 6 ints, checked to lie inside ``shape`` (of file ``path``)."""
    try:
        box = tuple(int(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 6:
        raise InputError(f"--box={text}: expected 6 integers i0,j0,k0,i1,j1,k1")
    if any(a < 0 or b > s or a >= b for a, b, s in zip(box[:3], box[3:], shape)):
        raise InputError(f"--box={text} is empty or outside the image {path} of shape "
                         f"{tuple(shape)} (starts inclusive, ends exclusive)")
    return box


def label_box(labels: np.ndarray, value: int) -> tuple[int, ...]:
    """The 3D bounding box (ends exclusive) of ``labels == value``."""
    idx = np.nonzero(labels == value)
    return tuple(int(i.min()) for i in idx) + tuple(int(i.max()) + 1 for i in idx)


def scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice and IoU of two boolean masks, with the voxels of each."""
    inter, p, t = int(np.sum(pred & truth)), int(pred.sum()), int(truth.sum())
    union = p + t - inter
    return {"dice": 2.0 * inter / (p + t) if p + t else float("nan"),
            "iou": inter / union if union else float("nan"), "voxels": t, "predicted": p}


def labels_on_grid(path: str, image: io.Volume, image_path: str) -> io.Volume:
    """The label map ``path``, which must lie on the grid of ``image`` (read from
    ``image_path``; InputError naming both otherwise)."""
    labels = io.load_labels(path)
    if labels.shape != image.shape:
        raise InputError(f"{path}: label map of shape {labels.shape} is not on the grid of "
                         f"{image_path} ({image.shape})")
    return labels


def choose_structures(labels: np.ndarray, structures: Sequence[str] | None, largest: int,
                      path: str) -> list[int]:
    """The label values to evaluate: ``structures`` (checked to be in ``labels``), else the
    ``largest`` largest non-zero labels."""
    values, counts = np.unique(labels[labels != 0], return_counts=True)
    if structures:
        try:
            chosen = [int(v) for v in structures]
        except ValueError:
            raise InputError(f"--structures={','.join(structures)}: not integers") from None
        absent = sorted(set(chosen) - set(values.tolist()))
        if absent:
            raise InputError(f"{path}: labels {absent} are not in the label map")
        return chosen
    if values.size == 0:
        raise InputError(f"{path}: the label map is empty")
    return [int(v) for v in values[np.argsort(-counts, kind="stable")][:largest]]


class _Clock:
    """Seconds per step into ``timings``; :meth:`lap` returns the seconds since the start."""

    def __init__(self, timings: dict):
        self.timings, self.start = timings, time.perf_counter()
        self.last = self.start

    def lap(self, step: str) -> float:
        now = time.perf_counter()
        self.timings[step] = round(now - self.last, 3)
        self.last = now
        return now - self.start


def segment_files(s: SegmentSettings, *, segmenter: predict.Segmenter | None = None,
                  echo: Callable[[str], None] = print, timings: dict | None = None) -> dict:
    """Runs the mode ``s`` asks for (module docstring), printing through ``echo``.

    Args:
      s: the settings.
      segmenter: a loaded model to use instead of loading ``s.model``.
      echo: where the progress and result lines go.
      timings: if given, filled with seconds per step: ``read``, ``load_model`` (weights,
        and the tuned decoder of ``s.decoder``),
        ``segment`` (encoder, decoder, propagation; compilation included), ``write``.

    Returns:
      Segmentation: ``{"out", "voxels", "seconds"}``; evaluation: the scores report
      (what ``s.json`` receives).

    Raises:
      InputError: a missing or unfit file, a box outside the image, unknown structures.
      CheckpointError: the model's weights are missing or do not fit.
    """
    clock = _Clock({} if timings is None else timings)
    if not s.image:
        raise InputError("--image is required")
    if s.axis not in (0, 1, 2):
        raise InputError(f"--axis={s.axis}: must be 0, 1 or 2")
    if s.labels is None and (s.box is None or s.out is None):
        raise InputError("give --box and --out (segmentation) or --labels (evaluation)")
    image = io.load_volume(s.image)
    box = parse_box(s.box, image.shape, s.image) if s.labels is None else None
    labels = labels_on_grid(s.labels, image, s.image) if s.labels else None
    values = (None if labels is None else
              choose_structures(labels.data, s.structures, s.largest, s.labels))
    clock.lap("read")
    if segmenter is None:
        segmenter = predict.load_segmenter(s.model, weights=s.checkpoint)
    if s.decoder:
        from jaxreg.finetune import segment as fewshot

        try:
            segmenter = fewshot.load_decoder(s.decoder, segmenter)
        except (ValueError, FileNotFoundError) as e:  # each names the file
            raise InputError(f"--decoder: {e}") from e
    clock.lap("load_model")
    if labels is None:
        mask = predict.segment_3d(segmenter, image.data, box, axis=s.axis, margin=s.margin,
                                  multimask=s.multimask)
        clock.lap("segment")
        io.save_volume(s.out, mask.astype(np.uint8), image.affine)
        seconds = clock.lap("write")
        echo(f"{s.out}: {int(mask.sum())} voxels in {seconds:.1f} s")
        return {"out": s.out, "voxels": int(mask.sum()), "seconds": round(seconds, 2)}
    return _evaluate(segmenter, image, labels, values, s, echo, clock)


def _evaluate(segmenter, image: io.Volume, labels: io.Volume, values: list[int],
              s: SegmentSettings, echo: Callable[[str], None], clock: _Clock) -> dict:
    """Segments each structure from its box (embeddings shared); prints and writes the
    scores and the predicted label map as ``s`` asks; returns the report."""
    vol, cache, per_label = predict.normalise_intensity(image.data), {}, {}
    pred_map = np.zeros(labels.shape, np.int16)
    for value in values:
        t = time.perf_counter()
        box = label_box(labels.data, value)
        mask = predict.segment_3d(segmenter, vol, box, axis=s.axis, margin=s.margin,
                                  normalise=False, multimask=s.multimask, cache=cache)
        pred_map[mask] = value
        row = per_label[value] = dict(scores(mask, labels.data == value), box=list(box),
                                      seconds=round(time.perf_counter() - t, 2))
        echo(f"label {value:4d}  dice {row['dice']:.3f}  iou {row['iou']:.3f}"
             f"  voxels {row['voxels']:6d}  box {box}")
    mean = {k: float(np.nanmean([v[k] for v in per_label.values()])) for k in ("dice", "iou")}
    seconds = clock.lap("segment")
    echo(f"mean over {len(per_label)} structures: dice {mean['dice']:.3f}  iou "
         f"{mean['iou']:.3f}  ({s.model}, {seconds:.1f} s)")
    report = {"model": s.model, "image": s.image, "labels": s.labels, "axis": s.axis,
              "mean": mean, "seconds": round(seconds, 2),
              "structures": {str(k): v for k, v in per_label.items()}}
    if s.out:
        io.save_volume(s.out, pred_map, image.affine)
    if s.json:
        atomic.write_text(s.json, json.dumps(report, indent=1) + "\n")
    clock.lap("write")
    return report
