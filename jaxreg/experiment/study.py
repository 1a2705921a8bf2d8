"""The study: every pair registered, one at a time or in batches over devices and hosts."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import traceback
from typing import Any

import jax
from absl import logging

from jaxreg import features as feat_lib
from jaxreg import registration
from jaxreg.experiment import batched as batched_lib
from jaxreg.experiment import outputs
from jaxreg.experiment import pairs as pairs_lib
from jaxreg.experiment import pipeline
from jaxreg.experiment import settings
from jaxreg.experiment import workdir as workdir_lib
from jaxreg.experiment.pairs import Pair
from jaxreg.features import sources
from jaxreg.io import atomic

__all__ = ["run_study", "run_pair", "select_devices"]


def run_pair(pair: Pair, out_dir: str, *, config: settings.StudyConfig,
             source: sources.FeatureSource) -> dict[str, Any]:
    """Registers one pair and writes its outputs into ``out_dir`` (created here).

    Returns:
      The metrics row (also saved as ``metrics.json``), with the seconds per stage.
    """
    loaded = pipeline.load_pair(pair, config=config.registration,
                                similarity_mask=config.similarity_mask)
    timings: dict[str, float] = {}
    extras: dict = {}
    fixed_mask, moving_mask = loaded.similarity or (None, None)
    start = time.perf_counter()
    transform = registration.register(
        loaded.fixed, loaded.moving, config=config.registration, source=source,
        pca_masks=loaded.masks, fixed_mask=fixed_mask, moving_mask=moving_mask,
        timings=timings, extras=extras)
    seconds = time.perf_counter() - start
    return outputs.write_pair(loaded, transform, out_dir, config=config,
                              fixed_features=extras["fixed_features"], seconds=seconds,
                              timings=timings, choices=extras["choices"])


def select_devices(spec: str = "") -> list[jax.Device]:
    """This host's devices to use: ``""`` all, ``"4"`` the first four, ``"0,2"`` those ids.

    Raises:
      settings.ConfigError: an id that is not a local device, or a count above the local
        count.
    """
    local = jax.local_devices()
    spec = str(spec).strip()
    if not spec:
        return local
    try:
        parts = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise settings.ConfigError(f"--devices={spec}: expected a count or ids like 0,2") from None
    if len(parts) == 1 and "," not in spec:
        if not 1 <= parts[0] <= len(local):
            raise settings.ConfigError(f"--devices={spec}: this host has {len(local)} device(s)")
        return local[: parts[0]]
    by_id = {d.id: d for d in local}
    missing = [i for i in parts if i not in by_id]
    if missing:
        raise settings.ConfigError(f"--devices={spec}: no local device with id {missing}; "
                                   f"local ids {sorted(by_id)}")
    return [by_id[i] for i in parts]


def _csv_pairs(config: settings.StudyConfig) -> list[Pair] | None:
    """The pairs of ``--pairs``/``--data_dir``, or None for the phantom."""
    if config.pairs or config.data_dir:
        csv_path = pairs_lib.find_pairs_csv(config.pairs, config.data_dir)
        return pairs_lib.read_pairs(csv_path, data_dir=config.data_dir or None)
    return None


def _phantom_pairs(config: settings.StudyConfig, workdir: str) -> list[Pair]:
    phantom_dir = os.path.join(workdir, "phantom")
    if jax.process_index() == 0:
        pairs_lib.write_phantom_pairs(phantom_dir, tasks=config.phantom.tasks,
                                      shape=config.phantom.shape, seed=config.phantom.seed)
    _sync("phantom written")
    return pairs_lib.read_pairs(os.path.join(phantom_dir, "pairs.csv"))


def _sync(name: str) -> None:
    """A barrier of all hosts (nothing on one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class _Progress:
    """A bar over every pair of the study, shown by host 0 only.

    On one host it counts the pairs done before the run and those finished since. With
    several hosts it counts the pairs' finished folders in the (shared) workdir, at most
    every ``recount_s`` seconds: a recount reads one folder per pair, which for thousands
    of pairs would cost more than the pairs that fail early.
    """

    def __init__(self, pairs: list[Pair], work: workdir_lib.Workdir, enabled: bool,
                 done: int, recount_s: float = 2.0):
        self.pairs, self.work, self.bar = pairs, work, None
        self.done, self.finished, self.recount_s, self.last = done, 0, recount_s, 0.0
        if enabled and jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=len(pairs), desc="pairs", unit="pair")
            self.update()

    def update(self, failed: int = 0, finished: int = 0) -> None:
        """``finished``: pairs this host has ended since the last call (done or failed)."""
        self.finished += finished
        if self.bar is None:
            return
        if jax.process_count() == 1:
            self.bar.update(min(self.done + self.finished, len(self.pairs)) - self.bar.n)
        elif time.monotonic() - self.last >= self.recount_s:  # tqdm throttles the drawing
            self.last = time.monotonic()
            done = sum(self.work.is_done(p.name) for p in self.pairs)
            self.bar.update(min(done + failed, len(self.pairs)) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _pair_settings(config: settings.StudyConfig, pair: Pair,
                   common: dict[str, Any]) -> dict[str, Any]:
    """What is recorded beside a pair: ``common`` (the study's result settings) and the
    pair's own (its similarity mask, its input files)."""
    recorded = dict(common)
    if config.similarity_mask in pair.labels:  # absent otherwise: earlier results stay valid
        recorded["similarity_mask"] = config.similarity_mask
    return {"settings": recorded, "inputs": pair.files()}


def _refuse_changed(work: workdir_lib.Workdir, changed: dict[str, list[str]]) -> None:
    if changed:
        name, diff = next(iter(changed.items()))
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise settings.ConfigError(
            f"{work.path}: {len(changed)} finished pair(s) were made with other settings or "
            f"inputs (e.g. {name}: {'; '.join(diff[:3])}{more}); rerun with --overwrite to "
            f"redo them, or use another --workdir")


def run_study(config: settings.StudyConfig | Any, workdir: str, *, progress: bool = True,
              overwrite: bool = False) -> tuple[list[dict], list[str]]:
    """Registers every pair of the study; see :mod:`jaxreg.experiment`.

    Args:
      config: a :class:`settings.StudyConfig`, or the ``ml_collections.ConfigDict`` of
        ``experiments/configs/breast.py`` (checked and converted here, once).
      workdir: output folder (created; shared by all hosts; one run at a time).
      progress: show a progress bar over pairs (host 0).
      overwrite: redo finished pairs whose recorded settings or inputs differ from now;
        without it such a workdir is refused before anything runs.

    Returns:
      ``(rows, failures)``: the metrics rows of all pairs done (now or by an earlier run;
      on several hosts, host 0 returns every host's rows), and one message per pair that
      failed on this host.

    Raises:
      io.InputError (or its subclasses settings.ConfigError, workdir.WorkdirError): bad
        settings, a bad pairs CSV, an unusable or busy workdir, or changed settings.
      CheckpointError: the encoder's weights are missing or do not fit.
    """
    config = settings.from_configdict(config)
    devices = select_devices(config.devices)
    pairs = _csv_pairs(config)  # a bad CSV is refused before the workdir is touched
    with workdir_lib.Workdir(workdir, lock=jax.process_index() == 0) as work:
        _sync("workdir ready")
        pairs = pairs or _phantom_pairs(config, work.path)
        # Every host compares every pair, so that all reach the same decision.
        common = settings.result_settings(config)
        recorded = {p.name: _pair_settings(config, p, common) for p in pairs}
        changed = workdir_lib.changed_pairs(work, recorded)
        if not overwrite:
            _refuse_changed(work, changed)
        if jax.process_index() == 0:
            atomic.write_text(os.path.join(work.path, "config.json"),
                              json.dumps(dataclasses.asdict(config), indent=1))
        cache = None
        if config.registration.cache and config.registration.model is not None:
            cache = feat_lib.FeatureCache(os.path.join(work.path, "feature_cache"))
        source = registration.make_source(config.registration, devices=devices, cache=cache)
        failures = _register_all(config, work, pairs, recorded, changed, source, devices,
                                 progress)
        _sync("study done")
        rows = []
        mine = pairs[jax.process_index()::jax.process_count()]
        for pair in pairs if jax.process_index() == 0 else mine:
            if work.is_done(pair.name):
                with open(os.path.join(work.pair_dir(pair.name), "metrics.json")) as f:
                    rows.append(json.load(f))
        if jax.process_index() == 0:
            outputs.write_summary(os.path.join(work.path, "summary.csv"), rows)
    return rows, failures


def _register_all(config, work, pairs, recorded, changed, source, devices, progress
                  ) -> list[str]:
    """This host's share of the pairs not done yet, or done with other settings (only
    left in ``changed`` with ``overwrite``); returns the failures."""
    mine = pairs[jax.process_index()::jax.process_count()]
    done = {p.name for p in pairs if work.is_done(p.name)}
    todo = [p for p in mine if p.name not in done or p.name in changed]
    for p in mine:
        if p.name in done and p.name not in changed:
            logging.info("%s: done earlier with the same settings, skipped", p.name)
        elif p.name in changed:
            logging.warning("%s: redone (%s)", p.name, "; ".join(changed[p.name]))
    bar = _Progress(pairs, work, progress, done=len(done - set(changed)))
    failures: list[str] = []

    def finish(pair, job):
        """Runs ``job(out_dir)`` into a staging folder moved into place when complete."""
        try:
            work.write_pair(pair.name, recorded[pair.name], job)
        except batched_lib.PAIR_ERRORS as e:  # io.InputError is a ValueError
            failures.append(f"{pair.name}: {e}")
            logging.error("pair %s failed: %s", pair.name, e)
        except Exception as e:  # a bug: keep its traceback, but let the other pairs run
            failures.append(f"{pair.name}: internal error {type(e).__name__}: {e} "
                            f"(a bug: please report it with the traceback in the log)")
            logging.error("pair %s failed with an internal error:\n%s", pair.name,
                          traceback.format_exc())
        bar.update(len(failures), finished=1)

    batched = len(devices) * config.batch_per_device > 1
    if batched and config.registration.pyramid == "coarse_to_fine":
        # Each pair's coarse stage picks its own fine features: no common batch program.
        # The encoder still shards its slice chunks over ``devices``.
        if config.batch_per_device > 1:
            logging.warning("features.pyramid=coarse_to_fine registers one pair at a time; "
                            "batch_per_device=%d is ignored", config.batch_per_device)
        batched = False
    if batched:
        # A masked similarity is another program than the batch's: such pairs (those with
        # the similarity-mask label maps) are registered one at a time.
        masked = [p for p in todo if config.similarity_mask in p.labels]
        if masked:
            logging.info("%d pair(s) with similarity masks registered one at a time",
                         len(masked))
        batched_lib.run_batched([p for p in todo if p not in masked], config, source,
                                devices, finish)
        todo = masked
    for pair in todo:
        finish(pair, functools.partial(run_pair, pair, config=config, source=source))
    bar.close()
    return failures
