r"""Solver settings side by side on the MNI pair: time ratios and scores, one process.

    python -m benchmarks.bench_fine                                   # kernel vs XLA path
    python -m benchmarks.bench_fine --variants="default;cpu_kernel=False;stop_tolerance=0.013"

The pair is ``benchmarks.bench_mni``'s (``common.make_mni_pair``: MNI152 T1 192x224x184
pulled by a smooth 6-voxel field, block-averaged by ``--downsample``). Every variant (``ConvexAdamConfig`` fields, ``;``-separated; ``default`` is the
defaults) runs ``register_mind`` once (compilation) and is scored with bench_mni's code (``common.scores``)
(GM/WM Dice, folding, field error in voxels in the brain), then the variants run
``--repeats`` more times *interleaved* (A, B, A, B, ...) and the median times are
compared as ratios to the first variant: on a shared machine only ratios taken this way
mean anything. ``max |u - first|`` is the largest difference of the fields, in voxels.
"""

from __future__ import annotations

import os
import time

from absl import app, flags
import numpy as np

from benchmarks import common

_VARIANTS = flags.DEFINE_string("variants", "cpu_kernel=False;default",
                                "';'-separated ConvexAdamConfig overrides, e.g. "
                                "'cpu_kernel=False;default;stop_tolerance=0.013'")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per variant, interleaved")
_DOWNSAMPLE = flags.DEFINE_integer("downsample", 1, "block-average factor of the MNI pair")


def _config(spec: str):
    import ast

    from jaxreg import solver

    spec = spec.strip()
    if spec in ("", "default"):
        return solver.ConvexAdamConfig()
    kwargs = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        kwargs[key.strip()] = ast.literal_eval(value.strip())
    return solver.ConvexAdamConfig(**kwargs)


def main(argv):
    del argv
    import jax

    from jaxreg import solver

    specs = [v.strip() for v in _VARIANTS.value.split(";") if v.strip()]
    configs = {spec: _config(spec) for spec in specs}
    print(common.machine_line())
    pair = common.make_mni_pair(common.MNI_CROP, _DOWNSAMPLE.value, 6.0, 24, 0)
    fields, times = {}, {spec: [] for spec in specs}
    for spec, config in configs.items():
        t = time.perf_counter()
        fields[spec] = np.asarray(solver.register_mind(pair["fixed"], pair["moving"],
                                                       config=config))
        first = time.perf_counter() - t
        s = common.scores(fields[spec], pair)
        diff = np.abs(fields[spec] - fields[specs[0]]).max()
        print(f"{spec:32s} 1st call {first:6.1f} s  GM Dice {s['gm']:.5f}  WM Dice "
              f"{s['wm']:.5f}  folding {s['fold']:.3f} %  field error {s['ferr']:.5f} vx  "
              f"max |u - first| {diff:.4f} vx", flush=True)
    for _ in range(_REPEATS.value):
        for spec, config in configs.items():
            t = time.perf_counter()
            jax.block_until_ready(solver.register_mind(pair["fixed"], pair["moving"],
                                                       config=config))
            times[spec].append(time.perf_counter() - t)
    base = np.median(times[specs[0]])
    for spec in specs:
        med = np.median(times[spec])
        print(f"{spec:32s} median {med:6.2f} s  runs {[round(x, 1) for x in times[spec]]}  "
              f"speed-up over '{specs[0]}' {base / med:.2f}x")
    print(f"load avg at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    app.run(main)
