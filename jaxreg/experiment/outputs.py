"""A registered pair's files and scores, and the study's summary table."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxreg import io
from jaxreg import metrics
from jaxreg import solver
from jaxreg import warping as warp_lib
from jaxreg.experiment import settings
from jaxreg.experiment.pipeline import LoadedPair
from jaxreg import atomic

__all__ = ["write_pair", "write_summary", "format_summary"]


def _label_scores(prefix: str, fixed: np.ndarray, moving: np.ndarray,
                  spacing: np.ndarray, *, hd: bool) -> dict[str, float]:
    row = {}
    for label, value in metrics.dice(fixed, moving).items():
        row[f"{prefix}_dice_{label}"] = round(float(value), 4)
    if hd:
        for label, value in metrics.hd95(fixed, moving, spacing=spacing).items():
            row[f"{prefix}_hd95_{label}"] = round(float(value), 3)
    return row


def write_pair(loaded: LoadedPair, field: np.ndarray, out_dir: str, *,
               config: settings.StudyConfig,
               fixed_features: np.ndarray | None = None, seconds: float = 0.0,
               timings: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Writes a registered pair's outputs into ``out_dir`` (created here) and scores it.

    Returns:
      The metrics row (also saved as ``metrics.json``).

    Raises:
      ValueError: the field is not finite (the registration diverged); nothing written.
    """
    pair, fixed, moving, labels = loaded.pair, loaded.fixed, loaded.moving, loaded.labels
    solver.check_field(field, name=f"pair {pair.name}: field")
    timings = timings or {}
    os.makedirs(out_dir)
    affine = fixed.affine
    io.save_volume(os.path.join(out_dir, "field_voxels.nii.gz"), field, affine)
    io.save_volume(os.path.join(out_dir, "field_mm.nii.gz"), io.field_to_mm(field, affine), affine)
    warped = np.asarray(warp_lib.warp(moving.data, field))
    io.save_volume(os.path.join(out_dir, "warped.nii.gz"), warped, affine)

    if config.qc:
        from jaxreg import qc

        qc.save_qc_png(os.path.join(out_dir, "qc.png"), fixed=fixed.data, moving=moving.data,
                       warped=warped, field=field, features=fixed_features,
                       spacing=tuple(float(s) for s in fixed.spacing),
                       title=f"{pair.name} ({config.registration.encoder})")

    row: dict[str, Any] = {"pair": pair.name, "seconds": round(seconds, 3)}
    row.update({f"seconds_{k}": round(v, 3) for k, v in timings.items()})
    spacing = fixed.spacing
    for name, (mov_lab, fix_lab) in labels.items():
        warped_lab = np.asarray(warp_lib.warp_labels(mov_lab, field))
        io.save_volume(os.path.join(out_dir, f"warped_{name}.nii.gz"), warped_lab, affine)
        row.update(_label_scores(f"{name}_before", fix_lab, mov_lab, spacing, hd=False))
        row.update(_label_scores(f"{name}_after", fix_lab, warped_lab, spacing,
                                 hd=config.hd95))
    row.update({k: round(float(v), 4) for k, v in metrics.jacobian_stats(field).items()})
    if pair.true_field:
        true = io.load_field(pair.true_field)
        if true.shape != field.shape:
            raise io.InputError(f"{pair.true_field}: true field {true.shape} does not match "
                                f"the fixed grid {field.shape}")
        # Scored where the anatomy is (the union of the fixed label maps), since the
        # field is unconstrained in the air around the body.
        mask = None
        if labels:
            mask = np.any([fix_lab > 0 for _, fix_lab in labels.values()], axis=0)
        for key, estimate in (("field_error_mm_before", np.zeros_like(true)),
                              ("field_error_mm", field)):
            row[key] = round(float(metrics.field_error(estimate, true, mask=mask,
                                                       spacing=spacing)), 4)
    atomic.write_text(os.path.join(out_dir, "metrics.json"), json.dumps(row, indent=1))
    return row


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
