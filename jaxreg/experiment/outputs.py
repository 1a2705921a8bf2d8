"""A registered pair's files and scores, and the study's summary table."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxreg import io
from jaxreg import metrics
from jaxreg import solver
from jaxreg import warping as warp_lib
from jaxreg.experiment import settings
from jaxreg.experiment.pipeline import LoadedPair
from jaxreg.io import atomic
from jaxreg.solver import affine as affine_lib
from jaxreg.transform import Transform

__all__ = ["write_pair", "landmark_errors", "write_summary", "format_summary"]


def _dice_row(prefix: str, fixed: np.ndarray, moving: np.ndarray) -> dict[str, float]:
    return {f"{prefix}_dice_{label}": round(float(value), 4)
            for label, value in metrics.dice(fixed, moving).items()}


class _Background:
    """Work handed to two threads (file compression, the QC picture, HD95: zlib, numpy and
    scipy release the GIL) while the caller goes on. :meth:`wait` re-raises the first
    error; :meth:`close` (always) waits for what runs and drops what has not started."""

    def __init__(self):
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        self.futures: list[concurrent.futures.Future] = []

    def submit(self, fn, *args, **kwargs) -> concurrent.futures.Future:
        future = self.pool.submit(fn, *args, **kwargs)
        self.futures.append(future)
        return future

    def wait(self) -> None:
        for future in self.futures:
            future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclasses.dataclass(frozen=True)
class _Pending:
    """A metrics value computed in the background: ``future.result()[label]``."""

    future: concurrent.futures.Future
    label: int


def write_pair(loaded: LoadedPair, transform: Transform, out_dir: str, *,
               config: settings.StudyConfig,
               fixed_features: np.ndarray | None = None, seconds: float = 0.0,
               timings: Mapping[str, float] | None = None, choices: Mapping | None = None
               ) -> dict[str, Any]:
    """Writes a registered pair's outputs into ``out_dir`` (created here) and scores it.

    The transform is written for ANTs, ITK and Slicer (:meth:`Transform.export`:
    ``warp.nii.gz``, and with an affine stage ``affine.mat`` and
    ``deformable_warp.nii.gz``), and as jaxreg's voxel field (``field_voxels.nii.gz``,
    the total field) and its RAS millimetres (``field_mm.nii.gz``). With landmarks
    (``fix_points``/``mov_points``), TRE is scored. ``choices`` go into the row.

    Files, the QC picture and HD95 are made in background threads, done on return.

    Returns:
      The metrics row (also saved as ``metrics.json``).

    Raises:
      ValueError: the field is not finite (the registration diverged); nothing written.
    """
    pair, fixed, moving = loaded.pair, loaded.fixed, loaded.moving
    field = transform.field
    solver.check_field(field, name=f"pair {pair.name}: field")
    os.makedirs(out_dir)
    if transform.prealignment is not None:
        affine_lib.save_itk(os.path.join(out_dir, "affine.mat"), transform.prealignment)
    affine = fixed.affine
    background = _Background()
    try:
        true = background.submit(io.load_field, pair.true_field) if pair.true_field else None
        save = lambda name, data, **kw: background.submit(
            io.save_volume, os.path.join(out_dir, name), data, affine, **kw)
        # Float fields shrink ~8 % under zlib at ~3 s each: stored uncompressed (still .gz).
        save("field_voxels.nii.gz", field, compresslevel=0)
        save("field_mm.nii.gz", io.field_to_mm(field, affine), compresslevel=0)
        background.submit(transform.save, os.path.join(out_dir, "warp.nii.gz"))
        if transform.prealignment is not None:
            background.submit(transform.save, os.path.join(out_dir, "deformable_warp.nii.gz"),
                              deformable=True)
        on_device = jnp.asarray(field)  # once: each use would copy it (0.23 s at MNI size)
        warped = np.asarray(warp_lib.warp(moving.data, on_device))
        save("warped.nii.gz", warped)
        jacobian, jacobian_stats = metrics.jacobian_summary(on_device)  # for the row and QC
        if config.qc:
            background.submit(_save_qc, os.path.join(out_dir, "qc.png"), loaded, warped,
                              field, jacobian, fixed_features, config)
        row: dict[str, Any] = {"pair": pair.name, "seconds": round(seconds, 3), **(choices or {})}
        row.update({f"seconds_{k}": round(v, 3) for k, v in (timings or {}).items()})
        row.update(_label_rows(loaded, on_device, save, background, hd=config.hd95))
        row.update({k: round(float(v), 4) for k, v in jacobian_stats.items()})
        row.update(_field_errors(loaded, on_device, true))
        if loaded.points is not None:
            row.update(landmark_errors(transform, *loaded.points))
        background.wait()
    finally:
        background.close()
    row = _resolve(row)
    atomic.write_text(os.path.join(out_dir, "metrics.json"), json.dumps(row, indent=1))
    return row


def landmark_errors(transform: Transform, fixed_points: np.ndarray,
                    moving_points: np.ndarray) -> dict[str, float]:
    """Target registration error (mm): fixed landmarks mapped into the moving space, as
    Learn2Reg scores, against their moving counterparts; before is without mapping."""
    before = np.linalg.norm(fixed_points - moving_points, axis=-1)
    after = np.linalg.norm(transform.map_points(fixed_points) - moving_points, axis=-1)
    return {"tre_mm_before": round(float(before.mean()), 4),
            "tre_mm": round(float(after.mean()), 4),
            "tre_mm_max": round(float(after.max()), 4)}


def _save_qc(path: str, loaded: LoadedPair, warped: np.ndarray, field: np.ndarray,
             jacobian: np.ndarray, fixed_features: np.ndarray | None,
             config: settings.StudyConfig) -> None:
    from jaxreg import qc  # matplotlib: imported only when a picture is drawn

    qc.save_qc_png(path, fixed=loaded.fixed.data, moving=loaded.moving.data, warped=warped,
                   field=field, jacobian=jacobian, features=fixed_features,
                   spacing=tuple(float(s) for s in loaded.fixed.spacing),
                   title=f"{loaded.pair.name} ({config.registration.encoder})")


def _label_rows(loaded: LoadedPair, field: np.ndarray, save, background: _Background, *,
                hd: bool) -> dict[str, Any]:
    """Per label map: the warped map saved, Dice before and after, then (``hd``) HD95
    after, as placeholders computed in the background."""
    row: dict[str, Any] = {}
    for name, (mov_lab, fix_lab) in loaded.labels.items():
        warped_lab = np.asarray(warp_lib.warp_labels(mov_lab, field))
        save(f"warped_{name}.nii.gz", warped_lab)
        hd95 = (background.submit(metrics.hd95, fix_lab, warped_lab, spacing=loaded.fixed.spacing)
                if hd else None)
        row.update(_dice_row(f"{name}_before", fix_lab, mov_lab))
        after = _dice_row(f"{name}_after", fix_lab, warped_lab)
        row.update(after)
        if hd:  # the labels Dice scored, in its order (HD95 scores the same ones)
            labels = [k[len(f"{name}_after_dice_"):] for k in after]
            row.update({f"{name}_after_hd95_{x}": _Pending(hd95, int(x)) for x in labels})
    return row


def _resolve(row: dict[str, Any]) -> dict[str, Any]:
    """The row with each placeholder replaced by its (HD95) value."""
    return {k: (round(float(v.future.result()[v.label]), 3) if isinstance(v, _Pending) else v)
            for k, v in row.items()}


def _field_errors(loaded: LoadedPair, field: np.ndarray,
                  true: concurrent.futures.Future | None) -> dict[str, float]:
    """Field error (mm) before and after against the pair's true field (read in the
    background), if it has one.

    Scored where the anatomy is (the union of the fixed label maps), since the field is
    unconstrained in the air around the body."""
    if true is None:
        return {}
    pair, labels = loaded.pair, loaded.labels
    true = true.result()
    if true.shape != field.shape:
        raise io.InputError(f"{pair.true_field}: true field {true.shape} does not match "
                            f"the fixed grid {field.shape}")
    mask = None
    if labels:
        mask = np.logical_or.reduce([fix_lab > 0 for _, fix_lab in labels.values()])
    spacing = loaded.fixed.spacing
    true = jnp.asarray(true, jnp.float32)  # on the device once, for both scores
    return {key: round(float(metrics.field_error(estimate, true, mask=mask, spacing=spacing)), 4)
            for key, estimate in (("field_error_mm_before", jnp.zeros_like(true)),
                                  ("field_error_mm", field))}


def write_summary(path: str, rows: list[dict]) -> None:
    """The metrics rows as one CSV (columns in order of first appearance)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = [",".join(columns)]
    lines += [",".join(str(r.get(c, "")) for c in columns) for r in rows]
    atomic.write_text(path, "\n".join(lines) + "\n")


def format_summary(rows: list[dict]) -> str:
    """A plain-text table of the metrics rows (Dice before/after, folding, time)."""
    if not rows:
        return "no pairs registered"
    columns = list(dict.fromkeys(k for r in rows for k in r if "hd95" not in k
                                 and not k.startswith(("std_", "seconds_"))))
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*columns)] + [fmt.format(*x) for x in cells])
