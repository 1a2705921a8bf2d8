"""Input audit of the breast experiment CLI: does it fail the way README.md says?

    python -m benchmarks.audit_inputs --workdir=/tmp/audit

Runs ``python -m experiments.breast`` once per case (a 40x32x24 phantom pair, 3 solver
iterations, no QC or HD95, one device) and checks README.md, "When something is wrong":

- user errors (bad settings, bad pairs CSVs, unsafe pair names, --pairs missing under
  --data_dir, a workdir that is a file or locked, changed settings without --overwrite):
  exit 2, exactly one ``error: `` line on stderr naming the file or setting, no
  traceback, nothing written outside the run's workdir or at /tmp/jaxreg_audit_escape;
- bad pair files in one CSV beside a good pair (missing, a folder, .nii.gz bytes flipped
  at 30/60/90 % and in the CRC, truncated, a header claiming 1000^3 voxels, spacing
  2e-23 mm, values 7e13, one voxel thick, a NaN voxel, constant, 4D): exit 1, a stderr
  line names the pair and its file, no traceback, the good pair finishes, no pairs/<bad>;
- what must work: a 5x5x5 pair registers (finite field); a CSV with a UTF-8 BOM keeps
  its name column; --pairs relative to --data_dir; a killed run's staging folder is
  removed and its pair redone; --overwrite redoes changed pairs; ``--encoder=litemedsam
  --config.solver.iterations=7`` keeps 7 iterations (real weights, ~1 min on CPU).

Prints one line per case, the elapsed time, then ``N passed, M failed``; exits 1 if a
case failed. Writes only under --workdir (data/, runs/, logs/ with each run's stderr,
cwd/ for the CLI); removes them at the end unless a case failed or --keep is given.
"""

from __future__ import annotations

import collections
import fcntl
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
from absl import app
from absl import flags

from jaxreg import experiment

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/jaxreg-audit", "Folder for the audit's files.")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the audit's files even when every case passes.")
_TIMEOUT = flags.DEFINE_integer("timeout", 600, "Seconds allowed per CLI run.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ESCAPE = "/tmp/jaxreg_audit_escape"
PARTS = ("data", "runs", "logs", "cwd")
Run = collections.namedtuple("Run", "code stderr workdir outside log")


def fast(iterations: int | None = 3) -> list[str]:
    """Flags of a quick run."""
    its = [] if iterations is None else [f"--config.solver.iterations={iterations}"]
    return its + ["--config.qc=False", "--config.metrics.hd95=False", "--devices=1"]


def _snapshot(root: str, workdir: str) -> dict:
    """Every file under ``root`` (size, mtime) and folder, but the workdir's contents."""
    seen = {ESCAPE: os.path.lexists(ESCAPE)}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) != workdir]
        seen.update((os.path.join(folder, d), "dir") for d in dirs)
        for f in files:
            st = os.lstat(os.path.join(folder, f))
            seen[os.path.join(folder, f)] = (st.st_size, st.st_mtime_ns)
    return seen


def _tail(stderr: str) -> str:
    lines = [l for l in stderr.splitlines() if l.strip() and not l.startswith("pairs:")]
    return lines[-1].strip() if lines else "(no stderr)"


def _flip(raw: bytes, offset: int) -> bytes:
    return raw[:offset] + bytes([raw[offset] ^ 0xFF]) + raw[offset + 1:]


def _json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write(path: str, content: str | bytes) -> str:
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    return path


class Audit:
    def __init__(self, root: str):
        self.root, self.data = root, os.path.join(root, "data")
        self.counts = {True: 0, False: 0}
        self.runs = 0

    def cli(self, run: str, *args: str) -> Run:
        """``python -m experiments.breast --workdir=runs/<run> ARGS`` from cwd/."""
        workdir = os.path.join(self.root, "runs", run)
        before = _snapshot(self.root, workdir)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
        command = [sys.executable, "-m", "experiments.breast", f"--workdir={workdir}", *args]
        try:
            proc = subprocess.run(command, cwd=os.path.join(self.root, "cwd"), env=env, text=True,
                                  capture_output=True, timeout=_TIMEOUT.value)
            code, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            code, stderr = "timeout", e.stderr or b""
            stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
        after = _snapshot(self.root, workdir)
        outside = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
        self.runs += 1
        log = os.path.join(self.root, "logs", f"{self.runs:02d}_{run}.txt")
        with open(log, "w") as f:
            f.write(f"$ {' '.join(command)}\nexit {code}\n{stderr}")
        return Run(code, stderr, workdir, outside, log)

    def check(self, case: str, problems: list[str], detail: str, run: Run) -> None:
        ok = not problems
        self.counts[ok] += 1
        text = detail if ok else f"{'; '.join(problems)} | CLI: {detail} (log {run.log})"
        print(f"{'PASS' if ok else 'FAIL'}  {case:<36} {text[:300]}", flush=True)


def common(run: Run, code: int) -> list[str]:
    problems = [] if run.code == code else [f"exit {run.code}, expected {code}"]
    if "Traceback" in run.stderr:
        problems.append("Traceback in stderr")
    if run.outside:
        problems.append(f"wrote outside its workdir: {', '.join(run.outside[:3])}")
    return problems


def user_error(run: Run, *names: str) -> tuple[list[str], str]:
    """Exit 2, one ``error: `` line containing every one of ``names``."""
    problems = common(run, 2)
    errors = [l for l in run.stderr.splitlines() if l.startswith("error: ")]
    if len(errors) != 1:
        problems.append(f"{len(errors)} stderr lines start with 'error: '")
    problems += [f"the error does not name {n!r}" for n in names
                 if errors and n not in errors[0]]
    return problems, errors[0] if errors else _tail(run.stderr)


def missing(run: Run, *paths: str) -> list[str]:
    """Problems for the files (relative to the run's workdir) that do not exist."""
    return [f"{p} missing" for p in paths if not os.path.exists(os.path.join(run.workdir, p))]


def make_data(data: str) -> dict[str, str]:
    """The phantom pair, a 5x5x5 pair and the bad moving files (pair name -> path)."""
    experiment.write_phantom_pairs(data, tasks=("date",), shape=(40, 32, 24))
    image = nib.load(os.path.join(data, "date_moving.nii.gz"))
    x, affine = np.asarray(image.dataobj, np.float32), image.affine
    bad_dir = os.path.join(data, "bad")
    os.makedirs(os.path.join(bad_dir, "folder.nii.gz"))
    with open(image.get_filename(), "rb") as f:
        raw = f.read()
    nib.save(nib.Nifti1Image(x, affine), os.path.join(bad_dir, "plain.nii"))
    with open(os.path.join(bad_dir, "plain.nii"), "rb") as f:
        header_lie = bytearray(f.read())
    struct.pack_into("<3h", header_lie, 42, 1000, 1000, 1000)  # dim[1:4] of NIfTI-1
    nan = x.copy()
    nan[20, 16, 12] = np.nan
    raws = {"damaged_30": _flip(raw, len(raw) * 30 // 100),
            "damaged_60": _flip(raw, len(raw) * 60 // 100),
            "damaged_90": _flip(raw, len(raw) * 90 // 100),
            "damaged_crc": _flip(raw, len(raw) - 6),  # in the gzip trailer's CRC-32
            "truncated": raw[:len(raw) // 2],
            "claims_1000cubed": gzip.compress(bytes(header_lie))}
    arrays = {"spacing_2e-23": (x, np.diag([2e-23] * 3 + [1.0])),
              "values_7e13": (x / x.max() * 7e13, affine),
              "one_voxel_thick": (np.ascontiguousarray(x[:, :, :1]), affine),
              "nan_voxel": (nan, affine),
              "constant": (np.full_like(x, 3.0), affine),
              "4d": (np.stack([x, x], -1), affine)}
    bad = {"missing": os.path.join(bad_dir, "missing.nii.gz"),
           "folder": os.path.join(bad_dir, "folder.nii.gz")}
    for name, content in raws.items():
        bad[name] = _write(os.path.join(bad_dir, f"{name}.nii.gz"), content)
    for name, (array, aff) in arrays.items():
        bad[name] = os.path.join(bad_dir, f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(array, aff), bad[name])
    grid = np.indices((5, 5, 5)).astype(np.float32)
    for name, centre in (("small_fixed", 2.0), ("small_moving", 2.4)):
        blob = np.exp(-((grid - centre) ** 2).sum(0) / 4.0).astype(np.float32)
        nib.save(nib.Nifti1Image(blob, np.diag([2.0, 2.0, 2.0, 1.0])),
                 os.path.join(data, f"{name}.nii.gz"))
    return bad


def audit(a: Audit, bad: dict[str, str]) -> None:
    d = a.data
    good = f"{d}/date_moving.nii.gz,{d}/date_fixed.nii.gz"

    def csv(name: str, text: str | bytes) -> str:
        return _write(os.path.join(d, name), text)

    good_csv = csv("good.csv", "name,mov_volume,fix_volume\n"
                               "good,date_moving.nii.gz,date_fixed.nii.gz\n")
    settings = [(["--config.solver.iterations=-1"], "iterations"),
                (["--config.solver.grid_sp=0"], "grid_sp"),
                (["--config.solver.disp_hw=-1"], "disp_hw"),
                (["--config.solver.learning_rate=nan"], "learning_rate"),
                (["--encoder=litemedsam", "--config.features.pyramid=jiont"], "pyramid"),
                (["--config.solver.nosuchfield=1"], "nosuchfield")]
    for i, (args, field) in enumerate(settings):
        run = a.cli(f"settings_{i}", f"--pairs={good_csv}", *fast(None), *args)
        a.check(" ".join(args).replace("--config.", ""), *user_error(run, field), run)

    head = "name,mov_volume,fix_volume\n"
    bad_csvs = [("not found", os.path.join(d, "none.csv")), ("a folder", os.path.join(d, "bad")),
                ("empty", csv("empty.csv", "")),
                ("not UTF-8", csv("latin1.csv", f"{head}d\xe9j\xe0,{good}\n".encode("latin-1"))),
                ("no fix_volume column", csv("nofix.csv", f"mov_volume\n{d}/date_moving.nii.gz\n")),
                ("label without partner", csv("unpaired.csv", f"mov_volume,fix_volume,mov_mask\n"
                                                              f"{good},m.nii.gz\n")),
                ("row without fix_volume", csv("nofixrow.csv", f"{head}x,{d}/a.nii.gz,\n")),
                ("duplicate name", csv("dup.csv", f"{head}x,{good}\nx,{good}\n"))]
    for i, (case, path) in enumerate(bad_csvs):
        run = a.cli(f"csv_{i}", f"--pairs={path}", *fast())
        a.check(f"csv {case}", *user_error(run, os.path.basename(path)), run)

    for i, name in enumerate(["/../../../tmp/jaxreg_audit_escape", "sub/dir", "../x"]):
        path = csv(f"name_{i}.csv", f"{head}{name},{good}\n")
        run = a.cli(f"name_{i}", f"--pairs={path}", *fast())
        problems, detail = user_error(run, os.path.basename(path), "not allowed")
        if os.path.lexists(ESCAPE):  # made now or before the audit: either way unchecked
            problems.append(f"{ESCAPE} exists")
        a.check(f"pair name {name}", problems, detail, run)

    _write(os.path.join(a.root, "runs", "afile"), "a file, not a folder\n")
    run = a.cli("afile", f"--pairs={good_csv}", *fast())
    a.check("workdir is a file", *user_error(run, run.workdir), run)

    run = a.cli("pairs_missing", f"--data_dir={d}", "--pairs=nope.csv", *fast())
    a.check("--pairs missing under --data_dir", *user_error(run, os.path.join(d, "nope.csv")), run)

    rows = [f"{name},{path},{d}/date_fixed.nii.gz" for name, path in bad.items()]
    bad_csv = csv("bad_files.csv", head + "\n".join([*rows, f"good,{good}"]) + "\n")
    run = a.cli("bad_files", f"--pairs={bad_csv}", *fast())
    good_missing = missing(run, "pairs/good/metrics.json")
    for name, path in bad.items():
        problems = common(run, 1) + good_missing
        lines = [l for l in run.stderr.splitlines() if f"{name}:" in l and path in l]
        if not lines:
            problems.append("no stderr line names the pair and its file")
        if os.path.lexists(os.path.join(run.workdir, "pairs", name)):
            problems.append(f"pairs/{name} exists")
        detail = lines[0].split(path, 1)[1].lstrip(": ") if lines else _tail(run.stderr)
        a.check(f"bad file {name}", problems, detail, run)

    small_csv = csv("small.csv", f"{head}small,small_moving.nii.gz,small_fixed.nii.gz\n")
    run = a.cli("small", f"--pairs={small_csv}", *fast())
    field_path = os.path.join(run.workdir, "pairs", "small", "field_voxels.nii.gz")
    problems = common(run, 0) + missing(run, "pairs/small/field_voxels.nii.gz")
    detail = _tail(run.stderr)
    if not problems:
        field = np.asarray(nib.load(field_path).dataobj)
        detail = f"field {field.shape}, max |u| {np.abs(field).max():.3g} voxels"
        if field.shape[:3] != (5, 5, 5) or not np.all(np.isfinite(field)):
            problems.append(f"field is {field.shape} or not finite")
    a.check("5x5x5 pair registers", problems, detail, run)

    bom_csv = csv("bom.csv", f"\ufeff{head}bom_name,{good}\n")
    run = a.cli("bom", f"--pairs={bom_csv}", *fast())
    folders = sorted(os.listdir(os.path.join(run.workdir, "pairs"))) if run.code == 0 else []
    problems = common(run, 0) + ([] if folders == ["bom_name"] else [f"pairs/ holds {folders}"])
    a.check("CSV with UTF-8 BOM keeps name", problems, f"pairs/ holds {folders}", run)

    run = a.cli("rerun", f"--data_dir={d}", "--pairs=good.csv", *fast())
    pair = os.path.join(run.workdir, "pairs", "good")
    a.check("--pairs relative to --data_dir", common(run, 0) +
            missing(run, "pairs/good/metrics.json"), "exit 0, pairs/good finished", run)

    staged = os.path.join(run.workdir, ".staging", "good.killed")
    if os.path.isdir(pair):
        os.replace(pair, staged)
        os.remove(os.path.join(staged, "metrics.json"))
    run = a.cli("rerun", f"--data_dir={d}", "--pairs=good.csv", *fast())
    left = os.listdir(os.path.join(run.workdir, ".staging"))
    problems = common(run, 0) + missing(run, "pairs/good/metrics.json")
    problems += [f".staging holds {left}"] if left else []
    a.check("crash recovery", problems, "staging emptied, pair redone", run)

    run = a.cli("rerun", f"--data_dir={d}", "--pairs=good.csv", *fast(4))
    a.check("changed settings refused", *user_error(run, "--overwrite"), run)
    run = a.cli("rerun", f"--data_dir={d}", "--pairs=good.csv", *fast(4), "--overwrite")
    problems = common(run, 0)
    its = _json(f"{pair}/settings.json").get("settings", {}).get("solver", {}).get("iterations")
    problems += [] if its == 4 else [f"settings.json has iterations {its}, expected 4"]
    a.check("changed settings --overwrite", problems, f"redone with iterations {its}", run)

    fd = os.open(os.path.join(run.workdir, ".jaxreg.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        run = a.cli("rerun", f"--data_dir={d}", "--pairs=good.csv", *fast())
    finally:
        os.close(fd)
    a.check("workdir locked by another process",
            *user_error(run, run.workdir, "in use by another jaxreg run"), run)

    run = a.cli("litemedsam", "--encoder=litemedsam", f"--pairs={good_csv}", *fast(7))
    problems, config = common(run, 0), _json(os.path.join(run.workdir, "config.json"))
    registration = config.get("registration", {})
    found = (registration.get("encoder"), registration.get("solver", {}).get("iterations"))
    problems += [] if found == ("litemedsam", 7) else [f"config.json: {found}"]
    a.check("litemedsam iterations=7", problems,
            f"config.json: encoder {found[0]}, solver.iterations {found[1]}", run)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.perf_counter()
    root = os.path.abspath(_WORKDIR.value)
    for part in PARTS:
        shutil.rmtree(os.path.join(root, part), ignore_errors=True)
        os.makedirs(os.path.join(root, part))
    a = Audit(root)
    audit(a, make_data(a.data))
    failed = a.counts[False]
    if failed or _KEEP.value:
        print(f"files kept in {root} (stderr of each run in logs/)")
    else:
        for part in PARTS:
            shutil.rmtree(os.path.join(root, part), ignore_errors=True)
        if not os.listdir(root):
            os.rmdir(root)
    print(f"elapsed {time.perf_counter() - start:.0f} s, {a.runs} CLI runs")
    print(f"{a.counts[True]} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    app.run(main)
