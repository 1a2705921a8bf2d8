"""Reading and writing landmark (point) files: ANTs/ITK CSV, 3D Slicer FCSV and JSON.

Points are world millimetres in RAS+ (jaxreg's and nibabel's convention: x grows to the
patient's Right, y Anterior, z Superior). ITK, ANTs and current 3D Slicer store LPS (x
and y negated); readers and writers convert. The file name's suffix gives the format:

* ``.csv``: ANTs/ITK (``antsApplyTransformsToPoints``), LPS, header ``x,y,z,t``.
* ``.fcsv``: 3D Slicer fiducial list, LPS or RAS as its ``CoordinateSystem`` line says.
* ``.mrk.json`` or ``.json``: 3D Slicer markups JSON, LPS or RAS per markup.

Anything wrong with a file raises :class:`jaxreg.io.InputError`, whose one-line message
starts with the path, e.g. ``/x/pts.csv line 3: expected 3 coordinates, got 2``. Writes
are atomic and use ``repr`` precision, so a write/read round trip is exact.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from jaxreg.io import atomic
from jaxreg.io.reading import InputError

__all__ = ["Points", "read_points", "write_points", "lps_to_ras", "ras_to_lps"]

_SUFFIXES = {".fcsv": "fcsv", ".csv": "ants", ".mrk.json": "json", ".json": "json"}
_FCSV_COLUMNS = "id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID".split(",")
_FCSV_SYSTEMS = {"RAS": "RAS", "0": "RAS", "LPS": "LPS", "1": "LPS"}
_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
           "Markups/Resources/Schema/markups-schema-v1.0.3.json#")
_SKIPPED_STATUS = ("undefined", "missing")  # Slicer points not placed (or skipped)
_LPS_ORIENTATION = [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0]  # identity in RAS


@dataclasses.dataclass(frozen=True, eq=False)
class Points:
    """Landmarks in world millimetres, RAS+ (jaxreg's convention).

    Attributes:
      ras: (N, 3) float64, read-only, finite; N >= 1.
      labels: N names ("" where the file has none).
      path: the file they came from, or None.

    Raises:
      ValueError: ``ras`` is not a finite (N, 3) array with N >= 1, or ``labels`` are
        not N strings.
    """

    ras: np.ndarray
    labels: tuple[str, ...]
    path: str | None = None

    def __post_init__(self):
        ras = np.array(self.ras, dtype=np.float64)  # a copy: callers keep theirs
        if ras.ndim != 2 or ras.shape[1] != 3:
            raise ValueError(f"points must be an (N, 3) array, got shape {ras.shape}")
        if len(ras) == 0:
            raise ValueError("points must hold at least one point, got none")
        if not np.isfinite(ras).all():
            raise ValueError("points hold non-finite coordinates (NaN or infinity)")
        labels = tuple(self.labels)
        if len(labels) != len(ras):
            raise ValueError(f"got {len(labels)} labels for {len(ras)} points")
        if not all(isinstance(s, str) for s in labels):
            raise ValueError("labels must be strings")
        ras.setflags(write=False)
        object.__setattr__(self, "ras", ras)
        object.__setattr__(self, "labels", labels)


def lps_to_ras(xyz: ArrayLike) -> np.ndarray:
    """Converts (..., 3) coordinates between LPS and RAS (negates x and y; its own inverse).

    Args:
      xyz: coordinates, last axis of length 3.

    Returns:
      A new float64 array.

    Raises:
      ValueError: the last axis is not of length 3.
    """
    out = np.array(xyz, dtype=np.float64)
    if out.shape[-1:] != (3,):
        raise ValueError(f"coordinates must have a last axis of 3, got shape {out.shape}")
    out[..., :2] *= -1.0
    return out


ras_to_lps = lps_to_ras


def _format(path: str) -> str:
    name = os.path.basename(path).lower()
    for suffix, kind in _SUFFIXES.items():  # ".fcsv" before ".csv"
        if name.endswith(suffix):
            return kind
    raise InputError(f"{path}: unknown point file suffix (supported: {', '.join(_SUFFIXES)})")


def _coords(path: str, where: str, values: Sequence[object]) -> list[float]:
    """Three finite floats from strings or JSON numbers, else an InputError at ``where``."""
    if len(values) != 3:
        raise InputError(f"{path}{where}: expected 3 coordinates, got {len(values)}")
    out = []
    for v in values:
        try:
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise ValueError
            out.append(float(v))
        except ValueError:
            raise InputError(f"{path}{where}: coordinate {v!r} is not a number") from None
    if not all(map(math.isfinite, out)):
        raise InputError(f"{path}{where}: non-finite coordinates {values}")
    return out


def _expect(path: str, where: str, ok: bool, problem: str) -> None:
    if not ok:
        raise InputError(f"{path}{where}: {problem}")


def _row(line: str) -> list[str]:
    return next(csv.reader([line]), [])


def _add_row(path: str, n: int, line: str, columns: list[str], xyz: list, labels: list):
    """Parses table row ``line`` (line ``n``) into ``xyz`` and ``labels`` by ``columns``."""
    row = _row(line)
    if len(row) > len(columns):
        raise InputError(f"{path} line {n}: {len(row)} fields, header has {len(columns)}")
    at = {c: i for i, c in enumerate(columns[:len(row)])}
    xyz.append(_coords(path, f" line {n}", [row[at[c]] for c in "xyz" if c in at]))
    labels.append(row[at["label"]] if "label" in at else "")


def _read_ants(path: str, text: str) -> tuple[list, list]:
    lines = [(n, s) for n, s in enumerate(text.split("\n"), 1) if s.strip()]
    if not lines:
        return [], []
    header = [s.strip().lower() for s in _row(lines[0][1])]
    missing = [c for c in "xyz" if c not in header]
    if missing:
        raise InputError(f"{path} line {lines[0][0]}: header {lines[0][1].strip()!r} "
                         f"has no column {', '.join(missing)} (expected x,y,z,t)")
    xyz, labels = [], []
    for n, line in lines[1:]:
        _add_row(path, n, line, header, xyz, labels)
    return lps_to_ras(xyz) if xyz else xyz, labels


def _read_fcsv(path: str, text: str) -> tuple[list, list]:
    system, columns, xyz, labels = "RAS", _FCSV_COLUMNS, [], []
    for n, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("#"):
            key, _, value = line.lstrip()[1:].partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "coordinatesystem":
                if value.upper() not in _FCSV_SYSTEMS:
                    raise InputError(f"{path}: unknown CoordinateSystem {value!r} "
                                     "(expected RAS, LPS, 0 or 1)")
                system = _FCSV_SYSTEMS[value.upper()]
            elif key == "columns":
                columns = [c.strip().lower() for c in _row(value)]
                if not {"x", "y", "z"} <= set(columns):
                    raise InputError(f"{path} line {n}: columns {value!r} lack x, y or z")
        elif line.strip():
            _add_row(path, n, line, columns, xyz, labels)
    return lps_to_ras(xyz) if xyz and system == "LPS" else xyz, labels


def _read_json(path: str, text: str) -> tuple[list, list]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: bad JSON ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("markups"), list):
        raise InputError(f"{path}: not a Slicer markups file (no 'markups' list)")
    xyz, labels = [], []
    for m, markup in enumerate(doc["markups"], 1):
        where = f" markup {m}"
        _expect(path, where, isinstance(markup, dict), "not an object")
        system = markup.get("coordinateSystem", "LPS")
        _expect(path, where, system in ("LPS", "RAS"), f"unknown coordinateSystem {system!r}")
        units = markup.get("coordinateUnits", "mm")
        _expect(path, where, units == "mm", f"unsupported coordinateUnits {units!r}")
        points = markup.get("controlPoints", [])
        _expect(path, where, isinstance(points, list), "'controlPoints' is not a list")
        for p, point in enumerate(points, 1):
            at = f"{where} control point {p}"
            _expect(path, at, isinstance(point, dict), "not an object")
            if point.get("positionStatus") in _SKIPPED_STATUS:
                continue
            position, label = point.get("position"), point.get("label", "")
            _expect(path, at, isinstance(position, list), "no position (3 numbers)")
            _expect(path, at, isinstance(label, str), f"label {label!r} is not a string")
            coords = _coords(path, at, position)
            xyz.append(lps_to_ras(coords) if system == "LPS" else coords)
            labels.append(label)
    return xyz, labels


def read_points(path: str | os.PathLike) -> Points:
    """Reads landmarks from an ANTs CSV, Slicer ``.fcsv`` or Slicer markups JSON file.

    JSON control points whose ``positionStatus`` is ``"undefined"`` or ``"missing"``
    (not placed in Slicer) are skipped; the control points of every markup are read.

    Args:
      path: the file; its suffix (``.csv``, ``.fcsv``, ``.mrk.json``, ``.json``) names
        the format.

    Returns:
      The points in RAS+ millimetres, their labels and ``path``.

    Raises:
      InputError: unknown suffix, the file is missing or not UTF-8, holds no points, or
        any malformed line, header, coordinate system or coordinate.
    """
    path = os.fspath(path)
    kind = _format(path)
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")  # tolerates a byte order mark
    except FileNotFoundError:
        raise InputError(f"{path}: point file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read file ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start})") from None
    # Lines end at \n, \r\n or \r only: str.splitlines would also split at \f, \x1c, ...
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    reader = {"ants": _read_ants, "fcsv": _read_fcsv, "json": _read_json}[kind]
    xyz, labels = reader(path, text)
    if len(xyz) == 0:
        raise InputError(f"{path}: no points")
    return Points(np.asarray(xyz, dtype=np.float64), tuple(labels), path)


def write_points(path: str | os.PathLike, points: Points | ArrayLike,
                 labels: Sequence[str] | None = None) -> None:
    """Writes landmarks atomically; the format follows the suffix (see :func:`read_points`).

    ANTs CSV gets ``x,y,z,t,label`` (LPS, t = 0), ``.fcsv`` Slicer 4.11's layout with
    ``CoordinateSystem = LPS``, JSON one Fiducial markup in LPS.

    Args:
      path: the file to write; an existing file is replaced only on success.
      points: a :class:`Points`, or an (N, 3) array of RAS+ millimetres.
      labels: N names; default the Points' labels, or ``P-1, P-2, ...`` for an array.

    Raises:
      ValueError: points not a finite (N, 3) array with N >= 1, labels not N strings,
        or (CSV formats) labels with line breaks.
      InputError: ``path`` has an unknown suffix.
    """
    path = os.fspath(path)
    kind = _format(path)
    if not isinstance(points, Points):
        ras = np.asarray(points, dtype=np.float64)
        points = Points(ras, [f"P-{i + 1}" for i in range(len(ras) if ras.ndim == 2 else 0)])
    pts = points if labels is None else Points(points.ras, tuple(labels))
    if kind != "json" and any("\n" in s or "\r" in s for s in pts.labels):
        raise ValueError(f"{path}: labels with line breaks cannot be written to CSV")
    lps = ras_to_lps(pts.ras).tolist()
    out = io.StringIO()
    rows = csv.writer(out, lineterminator="\n")
    if kind == "ants":
        rows.writerow(["x", "y", "z", "t", "label"])
        rows.writerows([*map(repr, p), "0", s] for p, s in zip(lps, pts.labels))
    elif kind == "fcsv":
        out.write("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
                  f"# columns = {','.join(_FCSV_COLUMNS)}\n")
        rows.writerows([f"vtkMRMLMarkupsFiducialNode_{i}", *map(repr, p),
                        0, 0, 0, 1, 1, 1, 0, s, "", ""]
                       for i, (p, s) in enumerate(zip(lps, pts.labels)))
    else:
        control = [{"id": str(i), "label": s, "description": "", "associatedNodeID": "",
                    "position": p, "orientation": _LPS_ORIENTATION, "selected": True,
                    "locked": False, "visibility": True, "positionStatus": "defined"}
                   for i, (p, s) in enumerate(zip(lps, pts.labels), 1)]
        markup = {"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm",
                  "controlPoints": control}
        out.write(json.dumps({"@schema": _SCHEMA, "markups": [markup]}, indent=4) + "\n")
    atomic.write_text(path, out.getvalue())
