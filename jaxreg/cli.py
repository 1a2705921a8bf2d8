"""The ``jaxreg`` command: one pair registered, its transform applied, inverted, used on points.

    jaxreg register FIXED MOVING -o OUT [--method=mind] [--affine=none|rigid|affine]
                    [--fixed-mask=F] [--moving-mask=M] [--fixed-points=P --moving-points=Q]
                    [--set solver.iterations=200 ...]
    jaxreg apply OUT/warp.nii.gz IMAGE -o WARPED [--labels]
    jaxreg invert OUT/warp.nii.gz -o INVERSE [--reference MOVING]
    jaxreg points OUT/warp.nii.gz FIXED_POINTS -o MOVING_POINTS
    jaxreg segment --image=IMAGE --box=i0,j0,k0,i1,j1,k1 --out=MASK [--model=litemedsam]
    jaxreg segment --image=IMAGE --labels=LABELS [--structures=21,40] [--json=SCORES]

Volumes are NIfTI, NRRD or DICOM series folders. ``register`` writes into OUT (made
whole in a staging folder, then renamed; an existing OUT is refused unless
``--overwrite``): ``warp.nii.gz`` (the transform, ITK displacement field),
``inverse_warp.nii.gz`` (on the moving grid), with an affine stage ``affine.mat`` and
``deformable_warp.nii.gz``, ``warped.nii.gz``, ``qc.png`` and ``metrics.json`` (Jacobian
statistics, Dice of the masks, TRE of the landmarks, inverse consistency), as the study
(``python -m experiments.breast``) writes a pair. ``antsApplyTransforms -d 3 -r FIXED -i
IMAGE -t OUT/warp.nii.gz -o WARPED`` does what ``jaxreg apply`` does. ``segment`` is
``python -m experiments.segment`` with the same flags (both call
:func:`jaxreg.segment.run.segment_files`).

Exit codes: 0 done; 1 the registration failed (it diverged); 2 a user error (a file, a
setting), printed as one line ``error: <file or setting>: <problem>``, nothing written.
(argparse, not absl: one command with sub-commands and positional files, as ANTs and
greedy users expect; the study's absl flags stay in experiments/.)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import NoReturn

from jaxreg.compilation import DEFAULT_CACHE

__all__ = ["main", "run", "override", "exit_now"]


def override(config, assignment: str):
    """``config`` (a frozen dataclass tree) with ``"a.b=value"`` set; the value is read as
    a Python literal (``200``, ``(0, 1, 2)``, ``True``), else taken as text.

    Raises:
      jaxreg.registration.ConfigError: an unknown field (the fields there are listed) or
        a value the settings refuse.
    """
    from jaxreg.registration import ConfigError

    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment}: expected FIELD=VALUE, e.g. solver.iterations=200")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text

    def put(node, path):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"--set {key}: {'.'.join(path[:-1]) or 'the settings'} has no "
                              f"fields (it is {node!r})")
        names = [f.name for f in dataclasses.fields(node)]
        if path[0] not in names:
            raise ConfigError(f"--set {key}: no field {path[0]!r} (fields: {', '.join(names)})")
        new = value if len(path) == 1 else put(getattr(node, path[0]), path[1:])
        if isinstance(new, list):
            new = tuple(new)
        try:
            return dataclasses.replace(node, **{path[0]: new})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--set {assignment}: {e}") from None

    return put(config, key.split("."))


def _parser() -> argparse.ArgumentParser:
    from jaxreg import registration

    parser = argparse.ArgumentParser(prog="jaxreg", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    reg = commands.add_parser("register", help="register MOVING to FIXED into folder OUT")
    reg.add_argument("fixed")
    reg.add_argument("moving")
    reg.add_argument("-o", "--out", required=True, help="output folder")
    reg.add_argument("--method", default="mind", choices=registration.METHODS, metavar="METHOD",
                     help="mind (default), an encoder, or <encoder>+mind")
    reg.add_argument("--affine", default="none", choices=registration.AFFINES)
    reg.add_argument("--weights", default="", help="encoder checkpoint; default: searched")
    reg.add_argument("--fixed-mask", help="restrict the similarity to this mask (fixed grid)")
    reg.add_argument("--moving-mask", help="... and to this one (moving image's grid)")
    reg.add_argument("--fixed-points", help="landmarks: ANTs CSV, Slicer .fcsv or .mrk.json")
    reg.add_argument("--moving-points", help="their counterparts in the moving image (TRE)")
    reg.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                     help="a setting of jaxreg.RegistrationConfig, e.g. solver.iterations=200")
    reg.add_argument("--no-qc", action="store_true", help="skip the QC picture")
    reg.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    reg.add_argument("--compilation-cache", "--compilation_cache", default=DEFAULT_CACHE,
                     help="XLA's compiled programs and jaxreg's exported ones, so that a "
                     "second run skips tracing and compiling ('' turns it off)")
    app = commands.add_parser("apply", help="resample a moving-space image onto the fixed grid")
    app.add_argument("transform")
    app.add_argument("image")
    app.add_argument("-o", "--out", required=True)
    app.add_argument("--labels", action="store_true", help="nearest neighbour, labels kept")
    inv = commands.add_parser("invert", help="the moving -> fixed transform")
    inv.add_argument("transform")
    inv.add_argument("-o", "--out", required=True)
    inv.add_argument("--reference", help="its grid (the moving image); default the fixed grid")
    inv.add_argument("--iterations", type=int, default=30)
    pts = commands.add_parser("points", help="map fixed-space landmarks to the moving space")
    pts.add_argument("transform")
    pts.add_argument("points")
    pts.add_argument("-o", "--out", required=True, help="same formats as the input")
    _segment_parser(commands)
    return parser


_SEGMENT_MODELS = ("litemedsam", "mobilesam", "sam", "medsam")  # jaxreg.segment.MODELS


def _segment_parser(commands) -> None:
    """``jaxreg segment``: the flags of ``python -m experiments.segment``, same names and
    defaults (``--multimask`` / ``--nomultimask`` as absl spells a boolean). Nothing of
    jaxreg.segment is imported here: the other commands never load flax."""
    seg = commands.add_parser("segment", help="promptable 3D segmentation from a box, or its "
                              "Dice against a label map (jaxreg.segment.run)")
    seg.add_argument("--image", help="input volume (.nii, .nii.gz, .nrrd, DICOM)")
    seg.add_argument("--box", help="i0,j0,k0,i1,j1,k1: voxel indices of the image array, "
                     "starts inclusive, ends exclusive")
    seg.add_argument("--out", help="output mask (uint8); with --labels the predicted label map")
    seg.add_argument("--model", default="litemedsam", choices=_SEGMENT_MODELS)
    seg.add_argument("--checkpoint", help="checkpoint file (needed for sam / medsam)")
    seg.add_argument("--axis", type=int, default=2, help="slicing axis (0, 1 or 2)")
    seg.add_argument("--margin", type=float, default=3.0,
                     help="widening of each propagated box, pixels at 256 px")
    seg.add_argument("--multimask", action="store_true", default=False,
                     help="keep the best of SAM's 3 masks per slice")
    seg.add_argument("--nomultimask", dest="multimask", action="store_false")
    seg.add_argument("--labels", help="label map on the image's grid: evaluation mode")
    seg.add_argument("--structures", type=lambda t: [v for v in t.split(",") if v],
                     help="label values to evaluate, comma-separated (default: the --largest)")
    seg.add_argument("--largest", type=int, default=12)
    seg.add_argument("--json", help="write the evaluation scores here (JSON)")
    seg.add_argument("--decoder", default="", help="a tuned mask decoder file "
                     "(jaxreg.finetune.segment); default: the pretrained heads")
    seg.add_argument("--compilation_cache", "--compilation-cache", default=DEFAULT_CACHE,
                     help="XLA's persistent compilation cache ('' turns it off)")


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False,
                disable=not sys.stderr.isatty())


def _one_mask(path, grid, fixed):
    """A mask file on its image's ``grid`` ``(shape, affine)`` as similarity weights on
    the fixed grid, or None."""
    import numpy as np

    from jaxreg import io, registration

    if not path:
        return None
    mask = io.load_labels(path)
    image = io.Volume(np.empty(grid[0], np.uint8), grid[1])  # a grid: no voxels are read
    if not io.same_grid(mask, image):
        raise io.InputError(f"{path}: the mask is not on its image's grid ({mask.shape} "
                            f"against {tuple(grid[0])})")
    return registration.similarity_weights(registration.on_grid(mask, fixed, order=0).data)


def _write_whole(out, loaded, transform, study, timings, extras, bar) -> dict:
    """The pair's outputs and the inverse, written into a staging folder renamed to
    ``out`` when complete (an old ``out`` is replaced only then); the metrics row."""
    from jaxreg import features
    from jaxreg.io import atomic
    from jaxreg.experiment import outputs
    from jaxreg.transform import inverse_consistency

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    try:
        work = os.path.join(staging, "out")
        row = outputs.write_pair(loaded, transform, work, config=study,
                                 fixed_features=extras["fixed_features"],
                                 seconds=sum(timings.values()), timings=timings,
                                 choices=extras["choices"])
        bar.update()
        inverse = transform.inverse(loaded.moving_grid)  # on the moving image's own grid
        inverse.save(os.path.join(work, "inverse_warp.nii.gz"))
        ic = inverse_consistency(transform, inverse,
                                 mask=features.foreground_mask(loaded.fixed.data))
        row.update({f"inverse_consistency_mm_{k}": round(v, 4) for k, v in ic.items()
                    if k != "inside"})
        atomic.write_text(os.path.join(work, "metrics.json"), json.dumps(row, indent=1))
        if os.path.exists(out):
            shutil.rmtree(out) if os.path.isdir(out) else os.unlink(out)
        os.replace(work, out)
        bar.update()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        bar.close()
    return row


def _register(args) -> int:
    from jaxreg import compilation, io, registration
    from jaxreg.experiment import pipeline, settings
    from jaxreg.experiment.pairs import Pair

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite and (not os.path.isdir(out) or os.listdir(out)):
        raise io.InputError(f"{out}: already exists; choose another -o or add --overwrite")
    if (args.fixed_points is None) != (args.moving_points is None):
        raise io.InputError("--fixed-points and --moving-points go together")
    compilation.use_caches(args.compilation_cache)
    config = registration.default_config(args.method, affine=args.affine, weights=args.weights)
    for assignment in args.set:
        config = override(config, assignment)
    study = settings.StudyConfig(registration=config, qc=not args.no_qc)
    bar = _progress(4, "register")
    labels = {}
    if args.fixed_mask and args.moving_mask:  # scored (Dice) as well as used
        labels["mask"] = (args.moving_mask, args.fixed_mask)
    points = (args.fixed_points, args.moving_points) if args.fixed_points else None
    name = os.path.basename(out.rstrip(os.sep)) or "pair"
    pair = Pair(name, os.path.abspath(args.moving), os.path.abspath(args.fixed), labels,
                points=points, source="command line")
    loaded = pipeline.load_pair(pair, config=config, similarity_mask="mask")
    similarity = loaded.similarity or (None, None)
    if not labels:  # at most one mask: read onto the fixed grid here
        similarity = [_one_mask(path, grid, loaded.fixed) for path, grid in (
            (args.fixed_mask, (loaded.fixed.shape, loaded.fixed.affine)),
            (args.moving_mask, loaded.moving_grid))]
    bar.update()
    timings, extras = {}, {}
    transform = registration.register(
        loaded.fixed, loaded.moving, config=config, pca_masks=loaded.masks,
        fixed_mask=similarity[0], moving_mask=similarity[1], timings=timings, extras=extras)
    bar.update()
    row = _write_whole(out, loaded, transform, study, timings, extras, bar)
    shown = {k: v for k, v in row.items() if not k.startswith(("seconds_", "std_"))}
    print(json.dumps(shown, indent=1))
    print(f"outputs in {out}; ANTs: antsApplyTransforms -d 3 -r {args.fixed} -i IMAGE "
          f"-t {os.path.join(out, 'warp.nii.gz')} -o WARPED")
    return 0


def _apply(args) -> int:
    from jaxreg import io
    from jaxreg.transform import Transform

    result = Transform.load(args.transform).apply(args.image, labels=args.labels)
    io.save_volume(args.out, result.data, result.affine)
    print(f"{args.out}: {args.image} on the grid of {args.transform}")
    return 0


def _invert(args) -> int:
    from jaxreg import io
    from jaxreg.transform import Transform, inverse_consistency

    bar = _progress(1, "invert")
    forward = Transform.load(args.transform)
    reference = io.load_volume(args.reference) if args.reference else None
    inverse = forward.inverse(reference, iterations=args.iterations)
    inverse.save(args.out)
    bar.update()
    bar.close()
    ic = inverse_consistency(forward, inverse)
    print(f"{args.out}: inverse consistency {ic['mean']:.3f} mm mean, {ic['p95']:.3f} mm 95th "
          f"percentile, {ic['max']:.3f} mm max (over the {100 * ic['inside']:.0f}% of the "
          f"fixed grid that maps inside its grid)")
    return 0


def _points(args) -> int:
    from jaxreg.io import points as points_lib
    from jaxreg.transform import Transform

    pts = points_lib.read_points(args.points)
    mapped = Transform.load(args.transform).map_points(pts.ras)
    points_lib.write_points(args.out, mapped, list(pts.labels))
    print(f"{args.out}: {len(mapped)} point(s) mapped into the moving space")
    return 0


def _segment(args) -> int:
    from jaxreg.io import InputError
    from jaxreg.segment import run

    run.prepare_process(args.compilation_cache)
    settings = run.SegmentSettings(**{f.name: getattr(args, f.name)  # the flags' names
                                      for f in dataclasses.fields(run.SegmentSettings)})
    try:
        run.segment_files(settings)
    except OSError as e:  # an output folder that cannot be written: the user's setting
        raise InputError(str(e)) from e
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``jaxreg`` (``argv`` without the program name); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from jaxreg.encoders.checkpoint import CheckpointError
    from jaxreg.io import InputError

    run = {"register": _register, "apply": _apply, "invert": _invert, "points": _points,
           "segment": _segment}
    try:
        return run[args.command](args)
    except (InputError, CheckpointError) as e:  # the user's files and settings
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a registration that diverged, a field that does not fit
        print(f"error: {e}", file=sys.stderr)
        return 1


def exit_now(code: int | str | None = 0) -> NoReturn:
    """Ends a command's process with ``code`` as ``sys.exit`` would (a string is printed
    to stderr, exit status 1), but without tearing down XLA's runtime: jax's exit handler
    clears its backends, 0.5-1.2 s of a process on the 2-core CPU (about a tenth of a
    warm one-pair run) spent after every file was written. JAX's pending effects are
    awaited and Python's logging and standard streams flushed first. For the commands'
    ``__main__`` only, never in a ``jax.distributed`` job (its shutdown must run)."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    if "jax" in sys.modules:
        sys.modules["jax"].effects_barrier()
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            pass
    os._exit(0 if code is None else int(code))


def run() -> NoReturn:
    """The ``jaxreg`` console command: :func:`main`, then :func:`exit_now`."""
    exit_now(main())


if __name__ == "__main__":
    run()
