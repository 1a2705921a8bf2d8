"""Pairs registered a batch at a time: buckets of one padded shape, ``vmap`` on each
device, the pair axis sharded over the devices (:mod:`jaxreg.solver.batching`)."""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxreg import registration
from jaxreg.experiment import outputs
from jaxreg.experiment import pipeline
from jaxreg.experiment import settings
from jaxreg.experiment.pairs import Pair
from jaxreg.features import sources
from jaxreg.solver import batching

__all__ = ["grid_shape", "run_batched"]

# What a pair's failure may be without being a bug: bad files, settings, a diverged field.
PAIR_ERRORS = (ValueError, OSError)


def grid_shape(path: str) -> tuple[int, ...]:
    """The voxel grid of an image file from its header (cheap), for bucketing."""
    try:
        from jaxreg.io import reading as _reading

        if _reading.is_dicom(path):
            from jaxreg.io import dicom as _dicom

            return tuple(_dicom.series_shape(path))  # headers only, no pixels
        if path.endswith((".nrrd", ".nhdr")):
            import nrrd

            return tuple(int(x) for x in nrrd.read_header(path)["sizes"][:3])
        import nibabel as nib

        return tuple(int(x) for x in nib.load(path).shape[:3])
    except Exception:  # unreadable: load_pair reports it properly later
        return (0, 0, 0)


def run_batched(todo: list[Pair], config: settings.StudyConfig, source: sources.FeatureSource,
                 devices: list[jax.Device], finish) -> None:
    """Buckets of one padded shape, registered a batch at a time over ``devices``."""
    solver_config = config.registration.solver
    mesh = jax.sharding.Mesh(np.array(devices), ("pairs",))
    multiple = math.lcm(solver_config.grid_sp, solver_config.grid_sp_adam)
    shapes = [grid_shape(p.fixed) for p in todo]
    for pair, shape in zip(todo, shapes):
        if 0 in shape:  # unreadable header: load_pair names the problem
            finish(pair, lambda out, pair=pair: pipeline.load_pair(
                pair, config=config.registration))
    todo = [p for p, shape in zip(todo, shapes) if 0 not in shape]
    buckets = batching.plan_buckets([s for s in shapes if 0 not in s], multiple=multiple)
    for bucket in buckets:
        members = [todo[i] for i in bucket.indices]
        try:
            per_device = batching.plan_batch(
                bucket.shape, config=solver_config, channels=source.channels,
                device_bytes=batching.device_memory_bytes(devices[0]),
                batch_per_device=config.batch_per_device)
        except ValueError as e:
            for pair in members:
                finish(pair, functools.partial(_raise, e))
            continue
        size = per_device * len(devices)
        logging.info("bucket %s: %d pair(s), %d per device on %d device(s)", bucket.shape,
                     len(members), per_device, len(devices))
        for start in range(0, len(members), size):
            _register_group(members[start:start + size], bucket.shape, config, source,
                            solver_config, mesh, finish)


def _register_group(group, shape, config, source, solver_config, mesh, finish):
    """One batch: each pair's features (one at a time), padded, then solved together."""
    loaded = []
    for pair in group:
        try:
            loaded.append(pipeline.load_pair(pair, config=config.registration))
        except PAIR_ERRORS as e:
            finish(pair, functools.partial(_raise, e))
    if not loaded:
        return
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    fixed, moving, unpadded, matrices, choices = [], [], [], [], []
    for lp in loaded:  # the stages of jaxreg.register, the solver's left for the batch
        moving_data, (moving_mask,), matrix = registration.prealign(
            lp.fixed, lp.moving, config=config.registration,
            moving_masks=(lp.masks[1] if lp.masks else None,), timings=timings)
        matrices.append(matrix)
        feats = source(lp.fixed.data, moving_data,
                       fixed_mask=lp.masks[0] if lp.masks else None,
                       moving_mask=moving_mask, timings=timings)
        fixed.append(batching.pad_to(feats.fixed, shape))
        moving.append(batching.pad_to(feats.moving, shape))
        unpadded.append(feats.fixed)
        choices.append(feats.choices)
    t1 = time.perf_counter()
    fields = np.asarray(batching.register_batch(
        jnp.stack(fixed), jnp.stack(moving), [lp.fixed.shape for lp in loaded],
        config=solver_config, mesh=mesh))
    timings["solving"] = time.perf_counter() - t1
    seconds = (time.perf_counter() - t0) / len(loaded)
    per_pair = {k: v / len(loaded) for k, v in timings.items()}
    for j, lp in enumerate(loaded):
        h, w, d = lp.fixed.shape
        field = np.ascontiguousarray(fields[j, :h, :w, :d])
        finish(lp.pair, functools.partial(
            _write, lp, field, matrices[j], config=config, seconds=seconds,
            timings=per_pair, fixed_features=unpadded[j], choices=choices[j]))


def _write(lp, field, matrix, out_dir, **kwargs):
    """A batch member's outputs: its field as a Transform (checked, jaxreg.register's)."""
    transform = registration.to_transform(field, lp.fixed.affine, matrix)
    return outputs.write_pair(lp, transform, out_dir, **kwargs)


def _raise(error: Exception, out_dir: str) -> None:
    raise error
