"""The pairs of a study: read from a pairs CSV, or the built-in breast phantom.

Pairs CSV: columns ``mov_volume`` and ``fix_volume`` (paths, relative to ``data_dir``
when given, else to the CSV's folder; NIfTI, NRRD, or a DICOM series folder), optional
``name``, optional ``true_field`` (a voxel field on the fixed grid, for the mean field
error), optional ``fix_points``/``mov_points`` (corresponding landmarks: ANTs CSV,
Slicer ``.fcsv`` or ``.mrk.json``, :mod:`jaxreg.io.points`, for TRE), and any number of
label maps as ``mov_<x>``/``fix_<x>`` column pairs (``.seg.nrrd`` too);
``mov_mask``/``fix_mask`` also restrict the similarity (the study's
``similarity_mask``). A UTF-8 byte-order mark (Excel's "CSV UTF-8") is accepted.

A pair's name is the name of its output folder inside the workdir, so it must be one
safe path component: 1 to 128 letters, digits, ``.``, ``_`` or ``-``, starting with a
letter or digit. A ``name`` given in the CSV that breaks this rule is refused (the CSV is
reported, nothing runs); a name made from the moving file's name (when the column is
absent or empty) is sanitised instead: every other character becomes ``_``.

Whether the files exist is not checked here: a pair whose file is missing or bad fails
alone when it is loaded, and the other pairs go on.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence

from jaxreg import io
from jaxreg import phantom
from jaxreg.io import atomic


__all__ = ["Pair", "read_pairs", "check_name", "write_phantom_pairs", "find_pairs_csv"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclasses.dataclass(frozen=True)
class Pair:
    """One moving/fixed pair and its optional label maps (name -> (moving, fixed)).

    ``source`` says where the pair was defined (``pairs.csv line 3``), for messages.
    """

    name: str
    moving: str
    fixed: str
    labels: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    true_field: str | None = None
    source: str = ""
    points: tuple[str, str] | None = None  # (fixed, moving) landmark files

    def files(self) -> dict[str, str]:
        """Every input file by its column name."""
        out = {"mov_volume": self.moving, "fix_volume": self.fixed}
        for label, (mov, fix) in self.labels.items():
            out[f"mov_{label}"], out[f"fix_{label}"] = mov, fix
        if self.true_field:
            out["true_field"] = self.true_field
        if self.points:
            out["fix_points"], out["mov_points"] = self.points
        return out


def check_name(name: str, where: str) -> str:
    """Returns ``name`` if it is a safe folder name (see module docstring).

    Raises:
      io.InputError: naming ``where`` and the rule.
    """
    if not _NAME.fullmatch(name):
        raise io.InputError(
            f"{where}: pair name {name!r} is not allowed: it names a folder inside the "
            f"workdir, so use 1-128 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit")
    return name


def _sanitise(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:128]
    return name if _NAME.fullmatch(name) else ("p" + name)[:128]


def _stem(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".nhdr", ".dcm"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return os.path.splitext(base)[0]


def _read_rows(csv_path: str) -> tuple[list[str], list[dict[str, str]]]:
    if os.path.isdir(csv_path):
        raise io.InputError(f"{csv_path}: is a folder, expected a pairs CSV file")
    if not os.path.isfile(csv_path):
        raise io.InputError(f"{csv_path}: pairs CSV not found")
    try:
        # utf-8-sig drops the byte-order mark that would otherwise hide the first column.
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            table = [row for row in reader]
    except UnicodeDecodeError as e:
        raise io.InputError(f"{csv_path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except (OSError, csv.Error) as e:
        raise io.InputError(f"{csv_path}: cannot read the CSV ({e})") from e
    if not table or not any(cell.strip() for cell in table[0]):
        raise io.InputError(f"{csv_path}: the CSV is empty; expected a header line with at "
                            f"least mov_volume,fix_volume")
    columns = [c.strip() for c in table[0]]
    duplicated = sorted({c for c in columns if c and columns.count(c) > 1})
    if duplicated:
        raise io.InputError(f"{csv_path}: column(s) {', '.join(duplicated)} appear twice")
    rows = []
    for line, cells in enumerate(table[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue  # blank line
        if len(cells) > len(columns):
            raise io.InputError(f"{csv_path} line {line}: {len(cells)} cells but the header "
                                f"has {len(columns)} columns")
        row = {c: v.strip() for c, v in zip(columns, cells) if c}
        row["__line__"] = str(line)
        rows.append(row)
    return columns, rows


def read_pairs(csv_path: str, *, data_dir: str | None = None) -> list[Pair]:
    """Reads and checks a pairs CSV (see the module docstring).

    Args:
      csv_path: the CSV file.
      data_dir: folder that relative paths in the CSV start from; default the CSV's.

    Returns:
      The pairs in file order, with absolute paths.

    Raises:
      io.InputError: the CSV is missing, empty, not UTF-8, lacks ``mov_volume`` or
        ``fix_volume``, has an unpaired ``mov_x`` column, a row without both volumes, a
        name that is not a safe folder name, or a name twice (line and problem named).
    """
    columns, rows = _read_rows(csv_path)
    missing = [c for c in ("mov_volume", "fix_volume") if c not in columns]
    if missing:
        raise io.InputError(f"{csv_path}: missing column(s) {', '.join(missing)}; "
                            f"found {[c for c in columns if c]}")
    special = ("volume", "points")  # not label maps
    label_names = sorted(c[4:] for c in columns if c.startswith("mov_") and c[4:] not in special)
    unpaired = [n for n in label_names if f"fix_{n}" not in columns]
    unpaired += [c[4:] for c in columns if c.startswith("fix_") and c[4:] not in special
                 and f"mov_{c[4:]}" not in columns]
    unpaired += [n for n in ("points",) if (f"mov_{n}" in columns) != (f"fix_{n}" in columns)]
    if unpaired:
        raise io.InputError(f"{csv_path}: label column(s) without their pair: "
                            f"{', '.join(sorted(set(unpaired)))} (need mov_x and fix_x)")
    base = os.path.abspath(data_dir or os.path.dirname(os.path.abspath(csv_path)))
    pairs, seen = [], {}
    for row in rows:
        where = f"{csv_path} line {row['__line__']}"

        def path(column):
            value = row.get(column, "")
            return os.path.normpath(os.path.join(base, value)) if value else None

        moving, fixed = path("mov_volume"), path("fix_volume")
        if moving is None or fixed is None:
            raise io.InputError(f"{where}: mov_volume and fix_volume must both be set")
        labels = {}
        for n in label_names:
            m, f_ = path(f"mov_{n}"), path(f"fix_{n}")
            if (m is None) != (f_ is None):
                raise io.InputError(f"{where}: mov_{n} and fix_{n} must be set together")
            if m and f_:
                labels[n] = (m, f_)
        if row.get("name"):
            name = check_name(row["name"], where)
        else:
            name = _sanitise(f"{len(pairs) + 1:04d}_" + _stem(moving))
        if name.lower() in seen:  # folders may be case-insensitive
            raise io.InputError(f"{where}: pair name {name!r} is already used on line "
                                f"{seen[name.lower()]}")
        seen[name.lower()] = row["__line__"]
        points = path("fix_points"), path("mov_points")
        if (points[0] is None) != (points[1] is None):
            raise io.InputError(f"{where}: fix_points and mov_points must be set together")
        pairs.append(Pair(name, moving, fixed, labels, path("true_field"),
                          source=f"{os.path.basename(csv_path)} line {row['__line__']}",
                          points=points if points[0] else None))
    if not pairs:
        raise io.InputError(f"{csv_path}: the CSV has a header but no pairs")
    return pairs


def find_pairs_csv(pairs: str, data_dir: str) -> str:
    """The pairs CSV that ``--pairs`` and ``--data_dir`` name, checked to exist.

    A relative ``pairs`` is resolved against ``data_dir`` when given, else against the
    current folder; without ``pairs`` it is ``data_dir/pairs.csv``.

    Raises:
      io.InputError: saying where it looked.
    """
    if data_dir and not os.path.isdir(data_dir):
        what = "is a file" if os.path.exists(data_dir) else "does not exist"
        raise io.InputError(f"{data_dir}: data_dir {what}; expected a folder")
    if pairs:
        if os.path.isabs(pairs):
            path, how = pairs, ""
        elif data_dir:
            path, how = os.path.join(data_dir, pairs), f" (pairs={pairs} resolved against data_dir)"
        else:
            path, how = os.path.abspath(pairs), f" (pairs={pairs} resolved against the current folder)"
    else:
        path, how = os.path.join(data_dir, "pairs.csv"), " (data_dir without pairs: its pairs.csv)"
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        what = "is a folder, not a CSV" if os.path.isdir(path) else "not found"
        raise io.InputError(f"{path}: pairs CSV {what}{how}")
    return path


def write_phantom_pairs(directory: str, *, tasks: Sequence[str] = phantom.TASKS,
                        shape: Sequence[int] = (112, 80, 48), seed: int = 0) -> str:
    """Writes the built-in breast phantom pairs as NIfTI files and a pairs CSV.

    Returns:
      The CSV's path; reuses it when already written with the same settings.
    """
    os.makedirs(directory, exist_ok=True)
    csv_path = os.path.join(directory, "pairs.csv")
    stamp = json.dumps({"tasks": list(tasks), "shape": list(shape), "seed": seed})
    stamp_path = os.path.join(directory, "phantom.json")
    if os.path.isfile(csv_path) and os.path.isfile(stamp_path):
        with open(stamp_path) as f:
            if f.read() == stamp:
                return csv_path
    header = ["name", "mov_volume", "fix_volume", "mov_breast", "fix_breast",
              "mov_fgt", "fix_fgt", "true_field"]
    rows = []
    for task in tasks:
        p = phantom.breast_pair(task, shape=tuple(shape), seed=seed)
        files = {}
        for key in ("moving", "fixed", "moving_breast", "fixed_breast", "moving_fgt",
                    "fixed_fgt", "true_field"):
            files[key] = f"{task}_{key}.nii.gz"
            io.save_volume(os.path.join(directory, files[key]), p[key], p["affine"])
        rows.append([f"{seed:02d}_{task}", files["moving"], files["fixed"],
                     files["moving_breast"], files["fixed_breast"], files["moving_fgt"],
                     files["fixed_fgt"], files["true_field"]])
    atomic.write_text(csv_path, "\n".join(",".join(r) for r in [header] + rows) + "\n")
    atomic.write_text(stamp_path, stamp)
    return csv_path
