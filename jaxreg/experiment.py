"""A registration study over a list of subject pairs: the library behind the CLIs.

``run_study(config, workdir)`` reads the pairs (a CSV, or the built-in breast phantom),
registers each, writes per pair the field (voxels and millimetres), the warped moving
image and warped label maps, and a metrics row, then a summary table. It is what
``python -m experiments.breast`` calls; it can be called from Python the same way.

Pairs CSV: columns ``mov_volume`` and ``fix_volume`` (paths, relative to the CSV's folder
or ``data_dir``), optional ``name``, optional ``true_field`` (a voxel field on the fixed
grid, for the mean field error), and any number of label maps as ``mov_<x>``/``fix_<x>``
column pairs (``mov_mask``/``fix_mask``, ``mov_fgt``/``fix_fgt``, ``.seg.nrrd`` too):
each is warped with nearest neighbour and scored with Dice and HD95 per label.

Outputs of a pair go to ``workdir/pairs/<name>/`` (written into a temporary folder that
is renamed when complete, so a crash leaves nothing half-written); a rerun skips pairs
whose folder exists. A pair whose inputs are bad is reported and skipped; the others go
on.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxreg import features as feat_lib
from jaxreg import io
from jaxreg import metrics
from jaxreg import phantom
from jaxreg import solver
from jaxreg import warping as warp_lib
from jaxreg.encoders import registry

__all__ = ["ENCODERS", "Pair", "LoadedPair", "read_pairs", "write_phantom_pairs",
           "make_encoder", "register_volumes", "load_pair", "write_pair", "run_pair",
           "select_devices", "run_study", "format_summary"]

ENCODERS = ("mind",) + tuple(registry.ENCODERS)


@dataclasses.dataclass(frozen=True)
class Pair:
    """One moving/fixed pair and its optional label maps (name -> (moving, fixed))."""

    name: str
    moving: str
    fixed: str
    labels: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    true_field: str | None = None


def read_pairs(csv_path: str, *, data_dir: str | None = None) -> list[Pair]:
    """Reads and checks a pairs CSV.

    Raises:
      io.InputError: the CSV is missing, lacks ``mov_volume``/``fix_volume``, has an
        unpaired ``mov_x`` column, or names a file that does not exist (row and file
        named in the message).
    """
    if not os.path.isfile(csv_path):
        raise io.InputError(f"{csv_path}: pairs CSV not found")
    base = data_dir or os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = list(reader)
    missing = [c for c in ("mov_volume", "fix_volume") if c not in columns]
    if missing:
        raise io.InputError(f"{csv_path}: missing column(s) {', '.join(missing)}; "
                            f"found {columns}")
    label_names = sorted(c[4:] for c in columns if c.startswith("mov_") and c != "mov_volume")
    unpaired = [n for n in label_names if f"fix_{n}" not in columns]
    unpaired += [c[4:] for c in columns if c.startswith("fix_") and c != "fix_volume"
                 and f"mov_{c[4:]}" not in columns]
    if unpaired:
        raise io.InputError(f"{csv_path}: label column(s) without their pair: "
                            f"{', '.join(sorted(set(unpaired)))} (need mov_x and fix_x)")
    pairs, names = [], set()
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}

        def path(column):
            value = row.get(column, "")
            if not value:
                return None
            full = value if os.path.isabs(value) else os.path.join(base, value)
            if not os.path.exists(full):
                raise io.InputError(f"{csv_path} line {i}: {column} file {full} does not exist")
            return full

        moving, fixed = path("mov_volume"), path("fix_volume")
        if moving is None or fixed is None:
            raise io.InputError(f"{csv_path} line {i}: mov_volume and fix_volume must be set")
        labels = {}
        for n in label_names:
            m, f_ = path(f"mov_{n}"), path(f"fix_{n}")
            if m and f_:
                labels[n] = (m, f_)
        name = row.get("name") or f"{i - 1:04d}_" + _stem(moving)
        if name in names:
            raise io.InputError(f"{csv_path} line {i}: duplicate pair name {name}")
        names.add(name)
        pairs.append(Pair(name, moving, fixed, labels, path("true_field")))
    if not pairs:
        raise io.InputError(f"{csv_path}: no pairs")
    return pairs


def _stem(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return os.path.splitext(base)[0]


def write_phantom_pairs(directory: str, *, tasks: Sequence[str] = phantom.TASKS,
                        shape: Sequence[int] = (112, 80, 48), seed: int = 0) -> str:
    """Writes the built-in breast phantom pairs as NIfTI files and a pairs CSV.

    Returns:
      The CSV's path; reuses it when already written with the same settings.
    """
    os.makedirs(directory, exist_ok=True)
    csv_path = os.path.join(directory, "pairs.csv")
    stamp = json.dumps({"tasks": list(tasks), "shape": list(shape), "seed": seed})
    stamp_path = os.path.join(directory, "phantom.json")
    if os.path.isfile(csv_path) and os.path.isfile(stamp_path):
        with open(stamp_path) as f:
            if f.read() == stamp:
                return csv_path
    header = ["name", "mov_volume", "fix_volume", "mov_breast", "fix_breast",
              "mov_fgt", "fix_fgt", "true_field"]
    rows = []
    for task in tasks:
        p = phantom.breast_pair(task, shape=tuple(shape), seed=seed)
        files = {}
        for key in ("moving", "fixed", "moving_breast", "fixed_breast", "moving_fgt",
                    "fixed_fgt", "true_field"):
            files[key] = f"{task}_{key}.nii.gz"
            io.save_volume(os.path.join(directory, files[key]), p[key], p["affine"])
        rows.append([f"{seed:02d}_{task}", files["moving"], files["fixed"],
                     files["moving_breast"], files["fixed_breast"], files["moving_fgt"],
                     files["fixed_fgt"], files["true_field"]])
    _atomic_text(csv_path, "\n".join(",".join(r) for r in [header] + rows) + "\n")
    _atomic_text(stamp_path, stamp)
    return csv_path


def _atomic_text(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _solver_config(config: Any) -> solver.ConvexAdamConfig:
    values = dict(config.solver)
    if "coupling" in values:
        values["coupling"] = tuple(values["coupling"])
    return solver.ConvexAdamConfig(**values)


def feature_config(config: Any, encoder: str | None = None) -> feat_lib.FeatureConfig:
    """The static :class:`~jaxreg.features.FeatureConfig` of an experiment config."""
    f = config.features
    entry = registry.ENCODERS[encoder or config.encoder]
    layers = ("features",) if f.pyramid == "none" else entry.pyramid
    return feat_lib.FeatureConfig(
        axes=tuple(f.axes), fusion=f.fusion, gap=f.gap, layers=layers,
        pca_dims=f.pca_dims or entry.pca_dims, image_size=f.image_size, chunk=f.chunk,
        percentiles=tuple(f.percentiles))


def make_encoder(config: Any, *, devices: Sequence[jax.Device] | None = None
                 ) -> feat_lib.SliceEncoder | None:
    """Loads the experiment's encoder once (None for ``mind``).

    Args:
      config: the experiment config.
      devices: when several, the encoder's slice chunks are sharded over them.

    Raises:
      registry.WeightsNotFoundError: no weights where they were looked for.
    """
    if config.encoder == "mind":
        return None
    if config.encoder not in registry.ENCODERS:
        raise ValueError(f"encoder {config.encoder!r} is not available; choose from {ENCODERS}")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.features.dtype)
    if dtype is None:  # "auto": bfloat16 on accelerators, float32 on CPU
        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    weights = config.weights or None
    model, spec = registry.load_encoder(config.encoder, weights, dtype=dtype)
    fc = feature_config(config)
    return feat_lib.SliceEncoder(model, spec, layers=fc.layers, image_size=fc.image_size,
                                 chunk=fc.chunk, devices=devices,
                                 name=f"{config.encoder}:{registry.find_weights(config.encoder, weights)}")


def register_volumes(fixed: io.Volume, moving: io.Volume, *, config: Any,
                     encoder: feat_lib.SliceEncoder | None = None,
                     masks: tuple[np.ndarray, np.ndarray] | None = None,
                     cache: feat_lib.FeatureCache | None = None,
                     timings: dict[str, float] | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """The displacement field (voxels of the fixed grid) aligning ``moving`` to ``fixed``.

    ``moving`` must already be on the fixed grid (see :func:`io.resample_to`).

    Args:
      config: the experiment config (``encoder``, ``features``, ``solver``, ``mind``).
      encoder: from :func:`make_encoder`; None for MIND-SSC.
      masks: ``(fixed, moving)`` foreground masks restricting the PCA fit.
      cache: encoded-token cache.
      timings: seconds per stage are added to it (slicing, encoding, pca, resizing, solving).

    Returns:
      ``(field, fixed_features)``: the ``(H, W, D, 3)`` field, and the fixed image's
      features used by the fine stage (None for MIND), for QC pictures.
    """
    timings = {} if timings is None else timings
    solver_config = _solver_config(config)
    if config.encoder == "mind":
        start = time.perf_counter()
        norm = functools.partial(feat_lib.normalise_intensity, percentiles=(0.5, 99.5))
        field = solver.register_mind(norm(fixed.data), norm(moving.data), config=solver_config,
                                     radius=config.mind.radius, dilation=config.mind.dilation)
        field = np.asarray(jax.block_until_ready(field))
        timings["solving"] = timings.get("solving", 0.0) + time.perf_counter() - start
        return field, None
    if encoder is None:
        raise ValueError(f"encoder {config.encoder!r} needs a SliceEncoder (make_encoder)")
    fc = feature_config(config)
    fixed_mask, moving_mask = masks if masks is not None else (None, None)
    layers = feat_lib.pair_features(fixed.data, moving.data, encoder, config=fc,
                                    fixed_mask=fixed_mask, moving_mask=moving_mask,
                                    cache=cache, timings=timings)
    start = time.perf_counter()
    f = jnp.concatenate([layers[k][0] for k in fc.layers], axis=-1)
    m = jnp.concatenate([layers[k][1] for k in fc.layers], axis=-1)
    coarse = {}
    if config.features.pyramid == "coarse_to_fine":
        coarse = dict(coarse_fixed=layers[fc.layers[-1]][0], coarse_moving=layers[fc.layers[-1]][1])
    field = solver.convex_adam(f, m, config=solver_config, **coarse)
    field = np.asarray(jax.block_until_ready(field))
    timings["solving"] = timings.get("solving", 0.0) + time.perf_counter() - start
    return field, np.asarray(f)


def _load_field(path: str) -> np.ndarray:
    """A (H, W, D, 3) voxel field saved as NIfTI, checked."""
    import nibabel as nib

    try:
        data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises several types for bad files
        raise io.InputError(f"{path}: not a readable NIfTI field ({e})") from e
    data = data.reshape(data.shape[:3] + (-1,))
    if data.shape[-1] != 3 or not np.all(np.isfinite(data)):
        raise io.InputError(f"{path}: a field must be (H, W, D, 3) and finite, got {data.shape}")
    return data


def _on_fixed_grid(volume: io.Volume, fixed: io.Volume, *, order: int) -> io.Volume:
    if io.same_grid(volume, fixed):
        return volume
    return io.resample_to(volume, fixed.shape, fixed.affine, order=order)


def _label_scores(prefix: str, fixed: np.ndarray, moving: np.ndarray,
                  spacing: np.ndarray, *, hd: bool) -> dict[str, float]:
    row = {}
    for label, value in metrics.dice(fixed, moving).items():
        row[f"{prefix}_dice_{label}"] = round(float(value), 4)
    if hd:
        for label, value in metrics.hd95(fixed, moving, spacing=spacing).items():
            row[f"{prefix}_hd95_{label}"] = round(float(value), 3)
    return row


@dataclasses.dataclass
class LoadedPair:
    """A pair read and put on the fixed grid: volumes, label maps, PCA masks."""

    pair: Pair
    fixed: io.Volume
    moving: io.Volume
    labels: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (moving, fixed)
    masks: tuple[np.ndarray, np.ndarray] | None  # (fixed, moving) foreground for the PCA


def load_pair(pair: Pair, *, config: Any) -> LoadedPair:
    """Reads a pair, resamples the moving image and labels onto the fixed grid.

    Raises:
      io.InputError: a file is unreadable or invalid, or the PCA mask is not in the pair.
    """
    fixed = io.load_volume(pair.fixed)
    moving = _on_fixed_grid(io.load_volume(pair.moving), fixed, order=1)
    labels = {}
    for name, (mov_path, fix_path) in pair.labels.items():
        fix_lab = _on_fixed_grid(io.load_labels(fix_path), fixed, order=0)
        mov_lab = _on_fixed_grid(io.load_labels(mov_path), fixed, order=0)
        labels[name] = (mov_lab.data, fix_lab.data)

    masks = None
    mask_name = config.features.mask if config.encoder != "mind" else ""
    if mask_name == "auto":
        masks = (feat_lib.foreground_mask(fixed.data), feat_lib.foreground_mask(moving.data))
    elif mask_name:
        if mask_name not in labels:
            raise io.InputError(f"pair {pair.name}: features.mask={mask_name!r} but the pair "
                                f"has no mov_{mask_name}/fix_{mask_name} columns "
                                f"(it has {sorted(labels)})")
        masks = (labels[mask_name][1] > 0, labels[mask_name][0] > 0)

    return LoadedPair(pair, fixed, moving, labels, masks)


def write_pair(loaded: LoadedPair, field: np.ndarray, out_dir: str, *, config: Any,
               fixed_features: np.ndarray | None = None, seconds: float = 0.0,
               timings: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Writes a registered pair's outputs into ``out_dir`` (created here) and scores it.

    Returns:
      The metrics row (also saved as ``metrics.json``).
    """
    pair, fixed, moving, labels = loaded.pair, loaded.fixed, loaded.moving, loaded.labels
    timings = timings or {}
    os.makedirs(out_dir)
    affine = fixed.affine
    io.save_volume(os.path.join(out_dir, "field_voxels.nii.gz"), field, affine)
    io.save_volume(os.path.join(out_dir, "field_mm.nii.gz"), io.field_to_mm(field, affine), affine)
    warped = np.asarray(warp_lib.warp(moving.data, field))
    io.save_volume(os.path.join(out_dir, "warped.nii.gz"), warped, affine)

    if config.qc:
        from jaxreg import qc

        qc.save_qc_png(os.path.join(out_dir, "qc.png"), fixed=fixed.data, moving=moving.data,
                       warped=warped, field=field, features=fixed_features,
                       spacing=tuple(float(s) for s in fixed.spacing),
                       title=f"{pair.name} ({config.encoder})")

    row: dict[str, Any] = {"pair": pair.name, "seconds": round(seconds, 3)}
    row.update({f"seconds_{k}": round(v, 3) for k, v in timings.items()})
    spacing = fixed.spacing
    for name, (mov_lab, fix_lab) in labels.items():
        warped_lab = np.asarray(warp_lib.warp_labels(mov_lab, field))
        io.save_volume(os.path.join(out_dir, f"warped_{name}.nii.gz"), warped_lab, affine)
        row.update(_label_scores(f"{name}_before", fix_lab, mov_lab, spacing, hd=False))
        row.update(_label_scores(f"{name}_after", fix_lab, warped_lab, spacing,
                                 hd=config.metrics.hd95))
    row.update({k: round(float(v), 4) for k, v in metrics.jacobian_stats(field).items()})
    if pair.true_field:
        true = _load_field(pair.true_field)
        if true.shape != field.shape:
            raise io.InputError(f"{pair.true_field}: true field {true.shape} does not match "
                                f"the fixed grid {field.shape}")
        # Scored where the anatomy is (the union of the fixed label maps), since the
        # field is unconstrained in the air around the body.
        mask = None
        if labels:
            mask = np.any([fix_lab > 0 for _, fix_lab in labels.values()], axis=0)
        for key, estimate in (("field_error_mm_before", np.zeros_like(true)),
                              ("field_error_mm", field)):
            row[key] = round(float(metrics.field_error(estimate, true, mask=mask,
                                                       spacing=spacing)), 4)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(row, f, indent=1)
    return row



def run_pair(pair: Pair, out_dir: str, *, config: Any,
             encoder: feat_lib.SliceEncoder | None = None,
             cache: feat_lib.FeatureCache | None = None) -> dict[str, Any]:
    """Registers one pair and writes its outputs into ``out_dir`` (created here).

    Args:
      pair: the pair.
      out_dir: output folder, must not exist.
      config: the experiment config.
      encoder: the loaded encoder (:func:`make_encoder`); None for ``mind``.
      cache: encoded-token cache.

    Returns:
      The metrics row (also saved as ``metrics.json``), with the seconds per stage.
    """
    loaded = load_pair(pair, config=config)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    field, fixed_features = register_volumes(loaded.fixed, loaded.moving, config=config,
                                             encoder=encoder, masks=loaded.masks, cache=cache,
                                             timings=timings)
    seconds = time.perf_counter() - start
    return write_pair(loaded, field, out_dir, config=config, fixed_features=fixed_features,
                      seconds=seconds, timings=timings)


def select_devices(spec: str = "") -> list[jax.Device]:
    """This host's devices to use: ``""`` all, ``"4"`` the first four, ``"0,2"`` those ids.

    Raises:
      ValueError: an id that is not a local device, or a count above the local count.
    """
    local = jax.local_devices()
    spec = str(spec).strip()
    if not spec:
        return local
    parts = [int(x) for x in spec.split(",") if x.strip()]
    if len(parts) == 1 and "," not in spec:
        if not 1 <= parts[0] <= len(local):
            raise ValueError(f"--devices={spec}: this host has {len(local)} device(s)")
        return local[: parts[0]]
    by_id = {d.id: d for d in local}
    missing = [i for i in parts if i not in by_id]
    if missing:
        raise ValueError(f"--devices={spec}: no local device with id {missing}; "
                         f"local ids {sorted(by_id)}")
    return [by_id[i] for i in parts]


def _grid_shape(path: str) -> tuple[int, ...]:
    """The voxel grid of an image file from its header (cheap), for bucketing."""
    try:
        if path.endswith(".nrrd"):
            import nrrd

            return tuple(int(x) for x in nrrd.read_header(path)["sizes"][:3])
        import nibabel as nib

        return tuple(int(x) for x in nib.load(path).shape[:3])
    except Exception:  # unreadable: load_pair reports it properly later
        return (0, 0, 0)


def _study_pairs(config: Any, workdir: str) -> list[Pair]:
    if config.pairs:
        return read_pairs(config.pairs, data_dir=config.data_dir or None)
    if config.data_dir:
        return read_pairs(os.path.join(config.data_dir, "pairs.csv"), data_dir=config.data_dir)
    phantom_dir = os.path.join(workdir, "phantom")
    if jax.process_index() == 0:
        write_phantom_pairs(phantom_dir, tasks=tuple(config.phantom.tasks),
                            shape=tuple(config.phantom.shape), seed=config.phantom.seed)
    _sync("phantom written")
    return read_pairs(os.path.join(phantom_dir, "pairs.csv"))


def _sync(name: str) -> None:
    """A barrier of all hosts (nothing on one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class _Progress:
    """A bar over every pair of the study, shown by host 0 only. It counts the pairs'
    finished folders in the (shared) workdir, so it stays right with several hosts."""

    def __init__(self, pairs: list[Pair], pairs_dir: str, enabled: bool):
        self.pairs, self.pairs_dir, self.bar = pairs, pairs_dir, None
        if enabled and jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=len(pairs), desc="pairs", unit="pair")
            self.update()

    def update(self, failed: int = 0) -> None:
        if self.bar is not None:
            done = sum(os.path.isfile(os.path.join(self.pairs_dir, p.name, "metrics.json"))
                       for p in self.pairs)
            self.bar.n = min(done + failed, len(self.pairs))
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_study(config: Any, workdir: str, *, progress: bool = True) -> tuple[list[dict], list[str]]:
    """Registers every pair of the study; see the module docstring.

    With ``config.batch.batch_per_device * len(devices) > 1`` pairs are grouped into
    buckets of one padded shape (:mod:`jaxreg.batching`) and registered a batch at a time,
    ``vmap`` on each device and the pair axis sharded over the devices; the batch per
    device is capped by the memory plan. On several hosts (after
    ``jax.distributed.initialize()``) each host takes every ``process_count``-th pair,
    writes only those, and host 0 writes the summary once all are done.

    Args:
      config: an ``ml_collections.ConfigDict`` as built by ``experiments/configs/breast.py``.
      workdir: output folder (created; shared by all hosts).
      progress: show a progress bar over pairs (host 0).

    Returns:
      ``(rows, failures)``: the metrics rows of all pairs done (now or by an earlier run;
      on several hosts, host 0 returns every host's rows), and one message per pair that
      failed on this host.
    """
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        _atomic_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=1))
    pairs = _study_pairs(config, workdir)
    devices = select_devices(config.batch.devices)
    encoder = make_encoder(config, devices=devices)
    cache = None
    if encoder is not None and config.features.cache:
        cache = feat_lib.FeatureCache(os.path.join(workdir, "feature_cache"))

    pairs_dir = os.path.join(workdir, "pairs")
    os.makedirs(pairs_dir, exist_ok=True)
    mine = pairs[jax.process_index()::jax.process_count()]
    todo = [p for p in mine if not os.path.isfile(os.path.join(pairs_dir, p.name, "metrics.json"))]
    for p in mine:
        if p not in todo:
            logging.info("%s: done earlier, skipped", p.name)
    bar = _Progress(pairs, pairs_dir, progress)
    failures: list[str] = []

    def finish(pair, work):
        """Runs ``work(out_dir)`` into a temporary folder renamed when complete."""
        tmp = tempfile.mkdtemp(dir=pairs_dir, prefix=f".{pair.name}.")
        try:
            work(os.path.join(tmp, "out"))
            os.replace(os.path.join(tmp, "out"), os.path.join(pairs_dir, pair.name))
        except (ValueError, OSError) as e:  # io.InputError is a ValueError
            failures.append(f"{pair.name}: {e}")
            logging.error("pair %s failed: %s", pair.name, e)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        bar.update(len(failures))

    batched = len(devices) * config.batch.batch_per_device > 1
    if batched and encoder is not None and config.features.pyramid == "coarse_to_fine":
        # Each pair's coarse stage picks its own fine features: no common batch program.
        # The encoder still shards its slice chunks over ``devices``.
        if config.batch.batch_per_device > 1:
            logging.warning("features.pyramid=coarse_to_fine registers one pair at a time; "
                            "batch_per_device=%d is ignored", config.batch.batch_per_device)
        batched = False
    if batched:
        _run_batched(todo, config, encoder, cache, devices, finish, failures)
    else:
        for pair in todo:
            finish(pair, lambda out: run_pair(pair, out, config=config, encoder=encoder,
                                              cache=cache))
    bar.close()
    _sync("study done")
    rows = []
    for pair in pairs if jax.process_index() == 0 else mine:
        done = os.path.join(pairs_dir, pair.name, "metrics.json")
        if os.path.isfile(done):
            with open(done) as f:
                rows.append(json.load(f))
    if jax.process_index() == 0:
        _write_summary(os.path.join(workdir, "summary.csv"), rows)
    return rows, failures


def _run_batched(todo: list[Pair], config: Any, encoder: feat_lib.SliceEncoder | None,
                 cache: feat_lib.FeatureCache | None, devices: list[jax.Device],
                 finish, failures: list[str]) -> None:
    """Buckets of one padded shape, registered a batch at a time over ``devices``."""
    from jaxreg import batching

    solver_config = _solver_config(config)
    mesh = jax.sharding.Mesh(np.array(devices), ("pairs",))
    multiple = math.lcm(solver_config.grid_sp, solver_config.grid_sp_adam)
    shapes = [_grid_shape(p.fixed) for p in todo]
    for pair, shape in zip(todo, shapes):
        if 0 in shape:  # unreadable header: load_pair names the problem
            finish(pair, lambda out, pair=pair: load_pair(pair, config=config))
    todo = [p for p, shape in zip(todo, shapes) if 0 not in shape]
    buckets = batching.plan_buckets([s for s in shapes if 0 not in s], multiple=multiple)
    fc = feature_config(config) if encoder is not None else None
    channels = 12 if encoder is None else len(fc.layers) * fc.pca_dims * (
        len(fc.axes) if fc.fusion == "concat" else 1)
    for bucket in buckets:
        members = [todo[i] for i in bucket.indices]
        try:
            per_device = batching.plan_batch(
                bucket.shape, config=solver_config, channels=channels,
                device_bytes=batching.device_memory_bytes(devices[0]),
                batch_per_device=config.batch.batch_per_device)
        except ValueError as e:
            for pair in members:
                finish(pair, functools.partial(_raise, e))
            continue
        size = per_device * len(devices)
        logging.info("bucket %s: %d pair(s), %d per device on %d device(s)", bucket.shape,
                     len(members), per_device, len(devices))
        for start in range(0, len(members), size):
            group, loaded = members[start:start + size], []
            for pair in group:
                try:
                    loaded.append(load_pair(pair, config=config))
                except (ValueError, OSError) as e:
                    finish(pair, functools.partial(_raise, e))
            if not loaded:
                continue
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            fixed, moving, masks, feats = [], [], [], []
            for lp in loaded:
                if encoder is None:
                    norm = functools.partial(feat_lib.normalise_intensity, percentiles=(0.5, 99.5))
                    f, m = norm(lp.fixed.data), norm(lp.moving.data)
                else:
                    layers = feat_lib.pair_features(
                        lp.fixed.data, lp.moving.data, encoder, config=fc,
                        fixed_mask=lp.masks[0] if lp.masks else None,
                        moving_mask=lp.masks[1] if lp.masks else None,
                        cache=cache, timings=timings)
                    f = np.concatenate([np.asarray(layers[k][0]) for k in fc.layers], -1)
                    m = np.concatenate([np.asarray(layers[k][1]) for k in fc.layers], -1)
                    feats.append(f)
                fixed.append(_pad(f, bucket.shape))
                moving.append(_pad(m, bucket.shape))
                masks.append(batching.pad_to(np.zeros(lp.fixed.shape, np.float32),
                                             bucket.shape)[1])
            t1 = time.perf_counter()
            fields = np.asarray(batching.register_batch(
                np.stack(fixed), np.stack(moving), np.stack(masks), config=solver_config,
                mesh=mesh, radius=config.mind.radius, dilation=config.mind.dilation,
                features=encoder is not None))
            timings["solving"] = time.perf_counter() - t1
            seconds = (time.perf_counter() - t0) / len(loaded)
            per_pair = {k: v / len(loaded) for k, v in timings.items()}
            for j, lp in enumerate(loaded):
                h, w, d = lp.fixed.shape
                field = np.ascontiguousarray(fields[j, :h, :w, :d])
                finish(lp.pair, functools.partial(
                    write_pair, lp, field, config=config, seconds=seconds, timings=per_pair,
                    fixed_features=feats[j] if feats else None))


def _pad(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    pad = [(0, t - s) for s, t in zip(x.shape[:3], shape)] + [(0, 0)] * (x.ndim - 3)
    return np.pad(x, pad)


def _raise(error: Exception, out_dir: str) -> None:
    raise error


def _write_summary(path: str, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = [",".join(columns)]
    lines += [",".join(str(r.get(c, "")) for c in columns) for r in rows]
    _atomic_text(path, "\n".join(lines) + "\n")


def format_summary(rows: list[dict]) -> str:
    """A plain-text table of the metrics rows (Dice before/after, folding, time)."""
    if not rows:
        return "no pairs registered"
    columns = list(dict.fromkeys(k for r in rows for k in r if "hd95" not in k
                                 and not k.startswith(("std_", "seconds_"))))
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*columns)] + [fmt.format(*x) for x in cells])
