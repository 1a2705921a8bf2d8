r"""Large motions on real anatomy: jaxreg with and without its affine stage, and peers.

    python -m benchmarks.bench_affine                           # full size, all methods
    python -m benchmarks.bench_affine --downsample=2 --run_methods=jaxreg,jaxreg_affine
    python -m benchmarks.bench_affine --downsample=2 --cases=hard \
        --run_methods=jaxreg_affine,jaxreg_cli,greedy,ants

Data: nilearn's MNI152 2009 T1 with its GM/WM maps, cropped to 192x224x184 and
block-averaged by ``--downsample`` (as ``benchmarks/bench_mni.py``). Each case moves the
anatomy by an affine ``A`` (rotations about the centre around two axes, a translation,
an isotropic scale; fixed voxel -> moving voxel) after a smooth random field ``s``
(:func:`benchmarks.common.smooth_field`, max ``--smooth_disp`` voxels): a fixed voxel
``x`` sits at ``A(x + s(x))`` in the moving image, so the true pull field is
``w(x) = A(x + s(x)) - x`` (:func:`jaxreg.solver.affine.compose`, exact), and the moving image
and GM/WM masks are the fixed ones pulled through the inverse map
(``A^-1`` then the fixed-point inverse of ``x + s(x)``). Translations are in voxels of
the benchmark grid.

Rows: before (zero field); convexadam 0.2.0 (``convex_adam_pt``, float32); ANTs
``ants.registration(fixed, moving, "SyN")`` (antspyx, its default affine + SyN stages);
greedy (below); jaxreg's ``register_mind`` alone; jaxreg's
:func:`jaxreg.solver.affine.register_affine` (default
:class:`~jaxreg.solver.affine.AffineConfig`: MIND-SSC, affine) then ``register_mind`` on the
moving image resampled by it, the total field composed; ``jaxreg_cli``: the CLI's whole
process, ``python -m experiments.breast --encoder=mind --config.affine=affine`` on the
case written as NIfTI with a pairs.csv (:func:`benchmarks.common.run_cli`), run twice on
the same fresh caches: cold (an empty XLA compilation cache, ``--compilation_cache``, and
kernel cache, ``JAXREG_CACHE_DIR``) and warm; its time is the process's wall clock, its
scores are recomputed here from its ``pairs/case/field_voxels.nii.gz`` (the total field).

greedy (``picsl-greedy``, ITK-SNAP's registration engine as a Python module) in its
affine + deformable mode, as its documentation runs it: an affine stage (``-a``, 12
degrees of freedom, its default) from matched image centres, then the deformable stage
on top of that matrix (``-it``), both NCC with a 2x2x2-voxel radius, three pyramid
levels of 100, 50 and 10 iterations and ``--threads`` threads, on the arrays handed over
in memory (SimpleITK images with identity direction, unit spacing and zero origin)::

    greedy -d 3 -a -i fixed.nii.gz moving.nii.gz -m NCC 2x2x2 -ia-image-centers \
        -n 100x50x10 -threads 2 -o affine.mat
    greedy -d 3 -i fixed.nii.gz moving.nii.gz -it affine.mat -m NCC 2x2x2 -n 100x50x10 \
        -threads 2 -wp 0 -o warp.nii.gz
    greedy -d 3 -rf fixed.nii.gz -rm moving.nii.gz resliced.nii.gz \
        -r warp.nii.gz affine.mat -rc total_warp.nii.gz

Timed: the two registration stages (the affine one's seconds printed beside). The last
command, not timed, composes the chain into one warp (``-rc``: a fixed point ``p`` goes
through the warp, then the matrix) and reslices the moving image; that warp (ITK
physical LPS displacements) becomes the voxel pull field scored here
(:func:`benchmarks.common.greedy_field`), checked against greedy's own reslicing (the
mean and largest difference in the brain are printed; float rounding when right).
``-wp 0`` stores the deformable warp unrounded (greedy's default rounds it to 0.1 voxel).
greedy's matrix itself, which the composed warp makes unnecessary here, is in RAS
physical space: in voxels of these images it is ``F @ M @ F``, ``F = diag(-1, -1, 1, 1)``.
The run prints the commands it ran.

Columns: GM and WM Dice (masks pulled by nearest neighbour), field error (mean voxel
distance to ``w`` inside the brain), folding, and seconds of the registration call
(jaxreg: a second call, after compilation; the first call's time is printed beside it;
jaxreg CLI: the process). A line per case gives greedy's seconds over each jaxreg row's.
All methods but the CLI run in this one process, one after the other, with ``--threads``
threads for torch, ITK and greedy (XLA: all cores).
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time

from absl import app, flags
import numpy as np

from benchmarks import common

_CASES = {  # name: (rotation degrees about axes 0, 1, 2; translation voxels; scale)
    "moderate": ((10.0, 0.0, -12.0), (12.0, -9.0, 6.0), 1.05),
    "hard": ((18.0, -17.0, 0.0), (20.0, 12.0, -10.0), 1.05),
    # No affine motion, only the smooth field: what the affine stage costs a pair that
    # does not need it (--cases=none).
    "none": ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 1.0),
}
_BENCH_METHODS = ("convexadam", "ants", "greedy", "jaxreg", "jaxreg_affine", "jaxreg_cli")
_GREEDY_AFFINE = "-m NCC 2x2x2 -ia-image-centers -n 100x50x10 -threads {threads}"
_GREEDY_DEFORMABLE = "-m NCC 2x2x2 -n 100x50x10 -threads {threads}"

_CASE = flags.DEFINE_list("cases", ["moderate", "hard"], f"cases to run, of {list(_CASES)}")
_RUN = flags.DEFINE_list("run_methods", list(_BENCH_METHODS),
                         f"methods to run, of {list(_BENCH_METHODS)}")
_SMOOTH = flags.DEFINE_float("smooth_disp", 4.0, "max |s| of the smooth field, voxels at 1 mm")
_SEED = flags.DEFINE_integer("field_seed", 0, "seed of the smooth field")
_DOWNSAMPLE = flags.DEFINE_integer("downsample", 1, "block-average factor after cropping")
_THREADS = flags.DEFINE_integer("threads", 2, "torch / ITK threads, greedy's -threads")
_CLI_RUNS = flags.DEFINE_integer("cli_runs", 2, "jaxreg_cli: processes on the same caches "
                                 "(the first cold, the others warm)")


def make_case(base, degrees, shift, scale, down):
    """The moved pair of one case: ``common.make_mni_pair``'s dict with moving, labels, truth."""
    from jaxreg.solver import affine
    from jaxreg import warping

    fixed = base["fixed"]
    shape = fixed.shape
    centre = (np.asarray(shape) - 1) / 2.0
    matrix = np.eye(4)
    matrix[:3, :3] = common.rotation(degrees) * scale
    matrix[:3, 3] = centre + np.asarray(shift) - matrix[:3, :3] @ centre
    s = common.smooth_field(shape, max_disp=_SMOOTH.value / down,
                            spacing=max(2.0, 40.0 / down), seed=_SEED.value)
    r, _ = warping.invert(s, iterations=20)  # r(z) = -s(z + r(z)): the inverse of x -> x + s(x)
    pull = warping.compose(r, affine.displacement(np.linalg.inv(matrix), shape))
    pair = dict(base, matrix=matrix, true=np.asarray(affine.compose(matrix, s)),
                moving=np.asarray(warping.warp(fixed, pull)))
    for t in common.TISSUES:
        pair[f"{t}_moving"] = np.asarray(warping.warp_labels(base[f"{t}_fixed"], pull))
    return pair


def _jaxreg(fixed, moving, with_affine):
    import jax
    from jaxreg import solver, warping
    from jaxreg.solver import affine

    def run():
        start = time.perf_counter()
        if not with_affine:
            return np.asarray(jax.block_until_ready(solver.register_mind(fixed, moving))), 0.0
        result = affine.register_affine(fixed, moving)
        affine_s = time.perf_counter() - start
        pre = warping.warp(moving, affine.displacement(result.matrix, fixed.shape))
        u = solver.register_mind(fixed, pre)
        return np.asarray(jax.block_until_ready(affine.compose(result.matrix, u))), affine_s

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    start = time.perf_counter()
    u, affine_s = run()
    return u, dict(time=time.perf_counter() - start, first_call=first, affine_s=affine_s)


def _method(name, pair, workdir):
    """``[(label, field, info)]`` of one method on the pair (jaxreg_cli: one per run)."""
    if name == "convexadam":
        u, info = common.run_convexadam(pair["fixed"], pair["moving"], _THREADS.value,
                                        "float32")
        return [(name, u, info)]
    if name == "ants":
        start = time.perf_counter()
        import ants  # antspyx, only in this benchmark
        f, m = ants.from_numpy(pair["fixed"]), ants.from_numpy(pair["moving"])
        reg = ants.registration(f, m, "SyN")
        elapsed = time.perf_counter() - start
        return [(name, _ants_field(ants, f, pair["moving"].shape, reg), dict(time=elapsed))]
    if name == "greedy":
        threads = _THREADS.value
        u, info, resliced = common.run_greedy(
            pair["fixed"], pair["moving"], _GREEDY_DEFORMABLE.format(threads=threads),
            affine=_GREEDY_AFFINE.format(threads=threads),
            log=os.path.join(workdir, "greedy.log"))
        info["reslice_check"] = common.reslice_check(u, pair["moving"], resliced,
                                                     pair["brain"])
        info["moving_max"] = float(pair["moving"].max())
        return [(name, u, info)]
    if name == "jaxreg_cli":
        runs = common.run_cli(pair, os.path.join(workdir, "cli"), _CLI_RUNS.value,
                              name="case", args=["--config.affine=affine"])
        return [(label, u, info) for label, info, u, _ in runs]
    u, info = _jaxreg(pair["fixed"], pair["moving"], name == "jaxreg_affine")
    return [(name, u, info)]


def _ants_field(ants, f, moving_shape, reg):
    """ANTs' forward transforms as a voxel pull field (unit spacing, zero origin)."""
    pad = 40
    shape = np.array(moving_shape) + 2 * pad
    idx = np.meshgrid(*[np.arange(s, dtype=np.float32) - pad for s in shape], indexing="ij")
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in f.shape], indexing="ij")
    u = np.empty(tuple(f.shape) + (3,), np.float32)
    for a in range(3):
        coord = ants.from_numpy(idx[a], origin=(-float(pad),) * 3, spacing=(1.0, 1.0, 1.0))
        mapped = ants.apply_transforms(f, coord, reg["fwdtransforms"], interpolator="linear")
        u[..., a] = mapped.numpy() - grid[a]
    return u


def _row(case, label, u, pair, info):
    s = common.scores(u, pair)
    t = "-" if info is None else f"{info['time']:.1f}"
    extra = []
    if info and "first_call" in info:
        extra.append(f"1st call {info['first_call']:.1f}")
    if info and info.get("affine_s"):
        extra.append(f"affine {info['affine_s']:.2f} s")
    extra = f" ({', '.join(extra)})" if extra else ""
    return (f"| {case} | {label} | {s['gm']:.4f} | {s['wm']:.4f} | {s['ferr']:.3f} | "
            f"{s['fold']:.3f} | {t}{extra} |")


def _speed_line(case, times):
    """greedy's seconds over each jaxreg row's, in one case."""
    if "greedy" not in times:
        return None
    ours = [(k, t) for k, t in times.items() if k.startswith("jaxreg")]
    if not ours:
        return None
    return (f"[{case}] speed, greedy's seconds / jaxreg's (above 1: jaxreg faster): greedy "
            f"{times['greedy']:.2f} s; " + "; ".join(
                f"over {k} {t:.2f} s: {times['greedy'] / t:.2f}x" for k, t in ours))


def _greedy_notes(case, info):
    mean, peak = info["reslice_check"]
    return ([f"[{case}] greedy ran: {c}" for c in info["commands"]]
            + [f"[{case}] greedy: {info['threads'] or 'threads: (not in its log)'}; "
               f"conversion check: |moving warped by the converted total field - greedy's "
               f"own reslice (-rf/-rm -r warp affine)| in brain: mean {mean:.1e}, max "
               f"{peak:.1e} (intensities 0..{info['moving_max']:.0f})"])


def main(argv):
    del argv
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(_THREADS.value))
    unknown = [m for m in _RUN.value if m not in _BENCH_METHODS]
    if unknown:
        raise app.UsageError(f"--run_methods: unknown {unknown}; choose from "
                             f"{list(_BENCH_METHODS)}")
    print("command: " + " ".join(["python -m benchmarks.bench_affine"]
                                 + [shlex.quote(a) for a in sys.argv[1:]]))
    print(common.machine_line())
    down = _DOWNSAMPLE.value
    base = common.make_mni_pair(common.MNI_CROP, down, 0.0, 40.0, 0)
    print(f"grid {base['fixed'].shape} (downsample {down}), smooth field max "
          f"{_SMOOTH.value / down:.1f} voxels, load avg {os.getloadavg()[0]:.1f}")
    print("| case | method | GM Dice | WM Dice | field error (voxels) | folding % | seconds |")
    print("|---|---|---|---|---|---|---|")
    notes = []
    for case in _CASE.value:
        degrees, shift, scale = _CASES[case]
        pair = make_case(base, degrees, shift, scale, down)
        print(_row(case, "before", np.zeros_like(pair["true"]), pair, None), flush=True)
        times = {}
        with tempfile.TemporaryDirectory(prefix="bench_affine_") as workdir:
            for name in _RUN.value:
                for label, u, info in _method(name, pair, workdir):
                    print(_row(case, label, np.asarray(u, np.float32), pair, info), flush=True)
                    times[label] = info["time"]
                    if name == "greedy":
                        notes += _greedy_notes(case, info)
        notes.append(_speed_line(case, times))
    print()
    for note in notes:
        if note:
            print(note)
    print("seconds: the registration call (jaxreg: a second call, after compiling; greedy: "
          "its affine and deformable stages, not the reslicing after them), except jaxreg "
          "CLI: the whole process (python -m experiments.breast --encoder=mind "
          "--config.affine=affine, one pair, outputs written)")
    print(f"load avg at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    app.run(main)
