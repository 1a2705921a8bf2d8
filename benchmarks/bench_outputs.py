r"""What scoring and writing one registered pair costs, component by component.

    python -m benchmarks.bench_outputs
    python -m benchmarks.bench_outputs --repeats=5 --downsample=1

The pair is ``benchmarks.bench_mni``'s (``common.make_mni_pair``: MNI152 T1 192x224x184,
its GM label map, a smooth 6-voxel field, block-averaged by ``--downsample``); the true field stands in for a registration's result (what these steps
cost barely depends on which field they get; the labels scored are the moving GM pulled
through it, aligned as after a registration). Each component of
``jaxreg.experiment.outputs.write_pair`` runs once to compile (or fill caches) and then
``--repeats`` times, alone, in this process; the minimum and median wall times are
printed. ``write_pair`` runs some of them in two background threads, so the sum is its
CPU work, not its wall time.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from absl import app, flags
import numpy as np

from benchmarks import common

_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per component")
_DOWNSAMPLE = flags.DEFINE_integer("downsample", 1, "block-average factor of the MNI pair")


def _components(pair, folder):
    from jaxreg import io, metrics, qc, warping

    fixed, moving, field = pair["fixed"], pair["moving"], pair["true"]
    label_f, label_m = (pair["gm_fixed"].astype(np.uint8), pair["gm_moving"].astype(np.uint8))
    warped = np.asarray(warping.warp(moving, field))
    aligned = np.asarray(warping.warp_labels(label_m, field))  # as scored after registration
    mask = label_f > 0
    path = lambda name: os.path.join(folder, name)
    return {
        "warp (image)": lambda: np.asarray(warping.warp(moving, field)),
        "warp_labels (one map)": lambda: np.asarray(warping.warp_labels(label_m, field)),
        "dice (one map, one label)": lambda: metrics.dice(label_f, aligned),
        "hd95 (one map, one label)": lambda: metrics.hd95(label_f, aligned, spacing=(1, 1, 1)),
        "jacobian_summary": lambda: metrics.jacobian_summary(field),
        "field_error (masked)": lambda: metrics.field_error(field, 0 * field, mask=mask,
                                                            spacing=(1, 1, 1)),
        "save field (.nii.gz, level 0)": lambda: io.save_volume(
            path("field.nii.gz"), field, np.eye(4), compresslevel=0),
        "save image (.nii.gz)": lambda: io.save_volume(path("warped.nii.gz"), warped, np.eye(4)),
        "load field (.nii.gz, level 0)": lambda: io.load_field(path("field.nii.gz")),
        "QC picture": lambda: qc.save_qc_png(path("qc.png"), fixed=fixed, moving=moving,
                                             warped=warped, field=field),
    }


def main(argv):
    del argv
    print(common.machine_line())
    pair = common.make_mni_pair(common.MNI_CROP, _DOWNSAMPLE.value, 6.0, 24, 0)
    print(f"grid {pair['fixed'].shape}, repeats {_REPEATS.value}")
    with tempfile.TemporaryDirectory() as folder:
        components = _components(pair, folder)
        components["save field (.nii.gz, level 0)"]()  # the file the loader reads
        print(f"{'component':32s} {'min ms':>9s} {'median ms':>10s}")
        for name, fn in components.items():
            fn()
            times = []
            for _ in range(_REPEATS.value):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            print(f"{name:32s} {1e3 * min(times):9.1f} {1e3 * statistics.median(times):10.1f}")


if __name__ == "__main__":
    app.run(main)
