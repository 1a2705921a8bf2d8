r"""jaxreg beside its peers on real anatomy: MNI152 T1 with a known smooth deformation.

    python -m benchmarks.bench_mni                      # full size, all methods
    python -m benchmarks.bench_mni --downsample=4 --methods=jaxreg   # quick
    python -m benchmarks.bench_mni --methods=jaxreg,convexadam --peer_dtypes=float32
    python -m benchmarks.bench_mni --methods=jaxreg_cli      # the CLI's whole process

Fair comparison: convexadam 0.2.0's ``convex_adam_pt`` defaults to ``dtype=torch.float16``,
which a CPU only emulates (its slowest setting there). The peer runs at float32 (its
fastest on CPU) and, beside it, at its float16 default (``--peer_dtypes``; drop float16
to skip the slow run); each row names its dtype.

``jaxreg_cli`` times jaxreg as a user runs it: the same pair written as NIfTI (T1s, GM/WM
labels, true field) and registered by ``python -m experiments.breast --encoder=mind`` in
a fresh process (start-up, imports, loading, features, compilation or the persistent
compilation cache, registration, writing the outputs, QC picture, Dice/HD95/field error).
It runs twice: cold (empty XLA compilation cache and kernel cache, as on a new machine)
and warm (the second run on the same caches). The time is the process's wall time; the
scores are recomputed here from its ``field_voxels.nii.gz``.

Data: nilearn's MNI ICBM152 2009 (sym) T1 with its GM/WM probability maps, centre-cropped
to ``--crop`` and block-averaged by ``--downsample``. The fixed image is the T1; the
moving image is the T1 pulled through a seeded smooth random field ``v`` (max |v| =
``--max_disp`` voxels of the benchmark grid, no folding): ``moving(y) = fixed(y + v(y))``.
GM/WM masks (probability > 0.5) pulled by ``v`` with nearest neighbour are the moving
labels. The field that aligns moving back to fixed in the pull convention,
``moving(x + w(x)) = fixed(x)``, is the inverse of ``v``: ``w(x) = -v(x + w(x))``, solved
by fixed-point iteration; that ``w`` is the ground truth of the field error.

Each method runs in its own subprocess (this script re-invoked with ``--_single``), so
its peak resident memory is the child's own peak (``/proc/self/status`` VmHWM), read
right after registration (before any post-processing); it includes the interpreter, the
method's imports and the two input volumes. Metrics are computed in the parent on the
returned field, with the same code for every method.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import numpy as np

from benchmarks import common

_METHODS = flags.DEFINE_list("methods", "jaxreg,jaxreg_cli,convexadam,ants",
                             "methods to run: jaxreg (the registration call), jaxreg_cli "
                             "(the CLI's whole process, cold and warm), convexadam, ants")
_PEER_DTYPES = flags.DEFINE_list("peer_dtypes", "float32,float16",
                                 "convexadam dtypes: float32 (its fastest on CPU), float16 "
                                 "(its default, emulated on CPU: slow)")
_CLI_RUNS = flags.DEFINE_integer("cli_runs", 2, "jaxreg_cli: processes on the same caches "
                                 "(the first cold, the others warm)")
_CLI_DATA = flags.DEFINE_string("cli_data", "", "jaxreg_cli: also keep the pair's NIfTI files "
                                "and pairs.csv in this (new) folder, to time other versions "
                                "of the CLI on the same data")
_CROP = flags.DEFINE_list("crop", ",".join(map(str, common.MNI_CROP)),
                          "centre crop of the 197x233x189 MNI grid")
_DOWNSAMPLE = flags.DEFINE_integer("downsample", 1, "block-average factor after cropping")
_MAX_DISP = flags.DEFINE_float("max_disp", common.MNI_MAX_DISP, "largest synthetic "
                               "displacement, in voxels of the full 1 mm grid (divided by "
                               "--downsample)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the synthetic field")
_CP_SPACING = flags.DEFINE_integer("cp_spacing", common.MNI_CP_SPACING, "control-point "
                                   "spacing of the field (voxels at full size)")
_THREADS = flags.DEFINE_integer("threads", 2, "torch / ITK threads")
_ANTS_TRANSFORM = flags.DEFINE_string("ants_transform", "SyN", "ants.registration type_of_transform")
_ANTS_ITERS = flags.DEFINE_list("ants_reg_iterations", "40,20,0", "SyN reg_iterations (ANTs default 40,20,0)")
_SINGLE = flags.DEFINE_string("_single", "", "internal: run one method in this process")
_WORKDIR = flags.DEFINE_string("_workdir", "", "internal: folder shared with the parent")

_TISSUES = common.TISSUES


# ----------------------------------------------------------------------------- methods
# Each runs inside its own child process; returns (field, timings dict).

def run_jaxreg(fixed, moving, threads):
    import jax
    from jaxreg import solver

    t = time.perf_counter()
    u = jax.block_until_ready(solver.register_mind(fixed, moving))
    first = time.perf_counter() - t
    t = time.perf_counter()
    u = jax.block_until_ready(solver.register_mind(fixed, moving))
    second = time.perf_counter() - t
    rss = common.maxrss_mb()
    return np.asarray(u, np.float32), dict(time=second, first_call=first, rss_mb=rss)


def run_ants(fixed, moving, threads, transform="SyN", reg_iterations=(40, 20, 0)):
    import ants

    f = ants.from_numpy(fixed)
    m = ants.from_numpy(moving)
    t = time.perf_counter()
    reg = ants.registration(f, m, transform, reg_iterations=tuple(reg_iterations))
    elapsed = time.perf_counter() - t
    rss = common.maxrss_mb()
    # Displacement field: push the moving grid's physical coordinates through the forward
    # transforms onto the fixed grid (identity direction, unit spacing, zero origin, so
    # physical = voxel index). The coordinate images are padded so that points mapped just
    # outside the volume still read their true coordinate.
    pad = 16
    shape = np.array(moving.shape) + 2 * pad
    idx = np.meshgrid(*[np.arange(s, dtype=np.float32) - pad for s in shape], indexing="ij")
    u = np.empty(fixed.shape + (3,), np.float32)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in fixed.shape], indexing="ij")
    for a in range(3):
        coord = ants.from_numpy(idx[a], origin=(-float(pad),) * 3, spacing=(1.0, 1.0, 1.0))
        mapped = ants.apply_transforms(f, coord, reg["fwdtransforms"], interpolator="linear")
        u[..., a] = mapped.numpy() - grid[a]
    return u, dict(time=elapsed, rss_mb=rss)


def single(method, workdir):
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(_THREADS.value))
    data = np.load(os.path.join(workdir, "pair.npz"))
    fixed, moving = data["fixed"], data["moving"]
    load_avg = os.getloadavg()[0]
    if method == "jaxreg":
        u, info = run_jaxreg(fixed, moving, _THREADS.value)
    elif method.startswith("convexadam:"):
        u, info = common.run_convexadam(fixed, moving, _THREADS.value, method.split(":", 1)[1])
    elif method == "ants":
        u, info = run_ants(fixed, moving, _THREADS.value, _ANTS_TRANSFORM.value,
                           [int(i) for i in _ANTS_ITERS.value])
    else:
        raise ValueError(f"unknown method {method!r}")
    info["load_before"] = load_avg
    info["load_after"] = os.getloadavg()[0]
    name = method.replace(":", "_")
    np.save(os.path.join(workdir, f"{name}_field.npy"), u)
    with open(os.path.join(workdir, f"{name}.json"), "w") as fh:
        json.dump(info, fh)


# ----------------------------------------------------------------------------- parent

def _convention_check(u, pair):
    """Intensity MSE (brain) of the moving image warped by u and by two wrong readings."""
    from jaxreg import warping as warp_lib
    mask = pair["brain"]
    res = {}
    for name, cand in (("as-is", u), ("negated", -u), ("axes-reversed", u[..., ::-1])):
        w = np.asarray(warp_lib.warp(pair["moving"], np.ascontiguousarray(cand), mode="edge"))
        res[name] = float(np.mean((w - pair["fixed"])[mask] ** 2))
    return res


def _describe(pair, crop, downsample, max_disp, cp_spacing, seed, built_s):
    shape = pair["fixed"].shape
    print(f"data: nilearn MNI152 2009 sym T1 + GM/WM maps, crop {tuple(crop)}, downsample "
          f"{downsample} -> grid {shape}; moving = T1 pulled by a seeded smooth random field v "
          f"(seed {seed}, control points every {cp_spacing / downsample:.0f} voxels, cubic, "
          f"max |v| = {pair['v_max']:.2f} voxels of this grid (asked {max_disp} at 1 mm), "
          f"min det J(v) = {pair['v_det_min']:.3f})")
    print(f"truth: aligning field w = inverse of v by 20 fixed-point iterations "
          f"w(x) = -v(x + w(x)) (max residual {pair['inv_residual']:.2e} voxels); "
          f"field error = mean |u - w| in voxels over the brain mask "
          f"({int(pair['brain'].sum())} voxels, T1 > 1% of max); pair built in {built_s:.1f} s")
    print(f"memory: peak RSS = each method's own child process VmHWM (/proc/self/status; "
          f"ru_maxrss would include the parent's peak, inherited across fork+exec) right after "
          f"registration (includes interpreter, imports, inputs); jaxreg_cli: the whole "
          f"process's peak (wait4); threads: torch/ITK {_THREADS.value}, XLA default (all "
          f"{os.cpu_count()} cores)")
    print("peer dtype: convexadam 0.2.0's convex_adam_pt defaults to torch.float16, which a CPU "
          "only emulates; float32 is its fastest setting on CPU, the fair comparison")
    sys.stdout.flush()


def _runs(methods):
    """The child runs of ``methods``: convexadam once per --peer_dtypes entry."""
    runs = []
    for method in methods:
        if method == "convexadam":
            runs += [f"convexadam:{d.strip()}" for d in _PEER_DTYPES.value if d.strip()]
        elif method in ("jaxreg", "ants", "jaxreg_cli"):
            runs.append(method)
        else:
            raise app.UsageError(f"--methods: unknown method {method!r}")
    return runs


def _label(run):
    if run == "ants":
        return f"ants {_ANTS_TRANSFORM.value} it={'x'.join(_ANTS_ITERS.value)}"
    if run.startswith("convexadam:"):
        dtype = run.split(":", 1)[1]
        return f"convexadam {dtype}" + (" (default)" if dtype == "float16" else "")
    return run


def _child(run, workdir):
    """One method in its own process; returns ``(info, field, process seconds)`` or None."""
    passthrough = [f"--threads={_THREADS.value}", f"--ants_transform={_ANTS_TRANSFORM.value}",
                   f"--ants_reg_iterations={','.join(_ANTS_ITERS.value)}"]
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(_THREADS.value),
               OMP_NUM_THREADS=str(_THREADS.value))
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_mni", f"--_single={run}",
         f"--_workdir={workdir}", *passthrough],
        cwd=_REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        print(f"[{run}] FAILED (rc {proc.returncode}) after {wall:.0f} s:\n{proc.stderr[-3000:]}")
        return None
    name = run.replace(":", "_")
    with open(os.path.join(workdir, f"{name}.json")) as fh:
        info = json.load(fh)
    return info, np.load(os.path.join(workdir, f"{name}_field.npy")), wall


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_cli_data(pair, folder):
    """The pair as the CLI reads it: NIfTI volumes (1 mm, identity affine) and a CSV."""
    from jaxreg import io

    os.makedirs(folder)
    files = {"fix_volume": ("fixed.nii.gz", pair["fixed"]),
             "mov_volume": ("moving.nii.gz", pair["moving"]),
             "true_field": ("true_field.nii.gz", pair["true"])}
    for t in _TISSUES:
        files[f"fix_{t}"] = (f"fix_{t}.nii.gz", pair[f"{t}_fixed"])
        files[f"mov_{t}"] = (f"mov_{t}.nii.gz", pair[f"{t}_moving"])
    for name, data in files.values():
        io.save_volume(os.path.join(folder, name), data, np.eye(4))
    with open(os.path.join(folder, "pairs.csv"), "w") as fh:
        fh.write(",".join(["name"] + list(files)) + "\n")
        fh.write(",".join(["mni"] + [f for f, _ in files.values()]) + "\n")


def _cli_runs(pair, workdir, runs):
    """``python -m experiments.breast`` on the pair, ``runs`` times on the same (fresh)
    caches; returns ``(label, info, field, metrics row)`` per run."""
    from jaxreg import io

    data = os.path.join(workdir, "cli_data")
    _write_cli_data(pair, data)
    if _CLI_DATA.value:
        import shutil

        shutil.copytree(data, _CLI_DATA.value)
    env = dict(os.environ, JAXREG_CACHE_DIR=os.path.join(workdir, "cli_cache"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = []
    for i in range(runs):
        work = os.path.join(workdir, f"cli_run{i}")
        cmd = [sys.executable, "-m", "experiments.breast", "--encoder=mind",
               f"--data_dir={data}", f"--workdir={work}",
               f"--compilation_cache={os.path.join(workdir, 'cli_cache', 'xla')}"]
        load = os.getloadavg()[0]
        with open(os.path.join(workdir, f"cli_run{i}.log"), "w") as log:
            t = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=_REPO, env=env, stdout=log, stderr=log)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t
        if status != 0:
            with open(os.path.join(workdir, f"cli_run{i}.log")) as log:
                print(f"[jaxreg_cli] run {i + 1} FAILED (status {status}):\n{log.read()[-3000:]}")
            break
        with open(os.path.join(work, "pairs", "mni", "metrics.json")) as fh:
            row = json.load(fh)
        field = io.load_field(os.path.join(work, "pairs", "mni", "field_voxels.nii.gz"))
        info = dict(time=wall, rss_mb=usage.ru_maxrss / 1024.0, load_before=load,
                    load_after=os.getloadavg()[0])
        label = f"jaxreg CLI, {'cold' if i == 0 else 'warm'} caches"
        out.append((label, info, field, row))
        print(f"[jaxreg_cli] run {i + 1}: {wall:.1f} s (pair {row['seconds']:.1f} s: "
              + ", ".join(f"{k[8:]} {v:.1f}" for k, v in row.items() if k.startswith("seconds_"))
              + ")", flush=True)
    return out


def _note(label, u, pair, info, wall):
    check = _convention_check(u, pair)
    best = min(check, key=check.get)
    return (f"[{label}] convention check, intensity MSE in brain after warping moving by the "
            f"field read " + ", ".join(f"{k}: {v:.2f}" for k, v in check.items())
            + ("" if best == "as-is" else f"  <-- MISMATCH: {best} fits better")
            + f"; load avg {info['load_before']:.2f} -> {info['load_after']:.2f}"
            + (f"; child process total {wall:.0f} s" if wall else ""))


def _print_table(rows, notes):
    base = rows[0][2]
    print()
    header = (f"{'method':<30}{'time s':>9}{'1st call s':>11}{'GM Dice':>16}{'WM Dice':>16}"
              f"{'fold %':>8}{'field err vx':>13}{'peak RSS MB':>12}")
    print(header)
    print("-" * len(header))
    for name, info, s in rows:
        first = info.get("first_call")
        print(f"{name:<30}{info['time']:>9.1f}{(f'{first:.1f}' if first else '-'):>11}"
              f"{base['gm']:>7.4f}->{s['gm']:.4f}{base['wm']:>7.4f}->{s['wm']:.4f}"
              f"{s['fold']:>8.3f}{s['ferr']:>13.3f}{info['rss_mb']:>12.0f}")
    print()
    print("time s = registration only (jaxreg: second call on the same shape; 1st call "
          "includes compilation), except jaxreg CLI: the whole process (python -m "
          "experiments.breast, one pair, outputs written); ANTs field = its forward "
          "transforms (affine + SyN warp) sampled on the fixed grid.")
    for n in notes:
        print(n)
    print(f"end: load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def benchmark(methods, crop, downsample, max_disp, cp_spacing, seed):
    cmd = " ".join(["python -m benchmarks.bench_mni"] + [shlex.quote(a) for a in sys.argv[1:]])
    print(f"command: {cmd}")
    print(common.machine_line())
    runs = _runs(methods)
    t = time.perf_counter()
    pair = common.make_mni_pair(crop, downsample, max_disp, cp_spacing, seed)
    _describe(pair, crop, downsample, max_disp, cp_spacing, seed, time.perf_counter() - t)
    shape = pair["fixed"].shape
    rows = [("identity (before)", dict(time=float("nan"), rss_mb=float("nan")),
             common.scores(np.zeros(shape + (3,), np.float32), pair))]
    notes = []
    with tempfile.TemporaryDirectory(prefix="bench_mni_") as workdir:
        np.savez(os.path.join(workdir, "pair.npz"), fixed=pair["fixed"], moving=pair["moving"])
        for run in runs:
            if run == "jaxreg_cli":
                for label, info, u, row in _cli_runs(pair, workdir, _CLI_RUNS.value):
                    rows.append((label, info, common.scores(u, pair)))
                    notes.append(_note(label, u, pair, info, None) + "; its metrics.json: "
                                 + ", ".join(f"{k} {v}" for k, v in row.items()
                                             if "dice" in k or "field_error" in k))
                continue
            result = _child(run, workdir)
            if result is None:
                continue
            info, u, wall = result
            rows.append((_label(run), info, common.scores(u, pair)))
            notes.append(_note(_label(run), u, pair, info, wall))
            print(f"[{_label(run)}] done in {info['time']:.1f} s", flush=True)
    _print_table(rows, notes)


def main(argv):
    del argv
    if _SINGLE.value:
        single(_SINGLE.value, _WORKDIR.value)
        return
    benchmark([m.strip() for m in _METHODS.value if m.strip()],
              [int(c) for c in _CROP.value], _DOWNSAMPLE.value, _MAX_DISP.value,
              _CP_SPACING.value, _SEED.value)


if __name__ == "__main__":
    app.run(main)
