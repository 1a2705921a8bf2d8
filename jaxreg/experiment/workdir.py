"""The study's output folder: one run at a time, complete pair folders, recorded settings.

Layout::

    workdir/
      .jaxreg.lock       held (flock) by the run using the workdir; names its pid and host
      .staging/          pair folders being written; anything here at start-up is a
                         leftover of a killed run and is removed
      config.json        the settings of the last run
      pairs/<name>/      one finished pair: outputs, metrics.json, settings.json

A pair folder is written under ``.staging/`` and renamed into ``pairs/`` when complete,
so ``pairs/`` only ever holds finished pairs. ``settings.json`` records the settings that
shape the pair's results and its input files; a rerun compares them (see
:func:`changed_pairs`).

Two processes on one workdir: the second fails at once with a message naming the first
(the lock is released by the kernel when its holder dies, even by ``kill -9``). With
several hosts (``jax.distributed``) host 0 holds the lock for all of them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from jaxreg import io
from jaxreg.io import atomic

__all__ = ["WorkdirError", "Workdir", "changed_pairs", "SETTINGS_FILE"]

SETTINGS_FILE = "settings.json"


class WorkdirError(io.InputError):
    """The workdir cannot be used: not a folder, not writable, or in use by another run."""


class Workdir:
    """A study's workdir, checked and (on host 0) locked; use as a context manager.

    Args:
      path: the folder (created if missing).
      lock: take the lock and clean leftovers (host 0 only on several hosts).
    """

    def __init__(self, path: str, *, lock: bool = True):
        self.path = os.path.abspath(path)
        self.pairs_dir = os.path.join(self.path, "pairs")
        self.staging_dir = os.path.join(self.path, ".staging")
        self._lock = lock
        self._fd: int | None = None

    def __enter__(self) -> Workdir:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise WorkdirError(f"{self.path}: workdir is a file, expected a folder")
        try:
            os.makedirs(self.pairs_dir, exist_ok=True)
            os.makedirs(self.staging_dir, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.path, prefix=".probe.")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise WorkdirError(f"{self.path}: workdir is not writable "
                               f"({e.strerror or e})") from e
        if self._lock:
            self._take_lock()
            self._remove_leftovers()
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def _take_lock(self) -> None:
        path = os.path.join(self.path, ".jaxreg.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(os.read(fd, 500).decode(errors="replace").strip())
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise WorkdirError(f"{self.path}: workdir is in use by another jaxreg run "
                                   f"({holder}); wait for it to finish or choose another "
                                   f"--workdir") from None
            raise WorkdirError(f"{self.path}: cannot lock the workdir ({e})") from e
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd

    def _remove_leftovers(self) -> None:
        """Staging folders of a run that was killed (we hold the lock: none is live)."""
        for entry in os.listdir(self.staging_dir):
            shutil.rmtree(os.path.join(self.staging_dir, entry), ignore_errors=True)
        # Earlier versions staged inside pairs/ as hidden folders.
        for entry in os.listdir(self.pairs_dir):
            if entry.startswith("."):
                shutil.rmtree(os.path.join(self.pairs_dir, entry), ignore_errors=True)

    def pair_dir(self, name: str) -> str:
        return os.path.join(self.pairs_dir, name)

    def is_done(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.pair_dir(name), "metrics.json"))

    def recorded(self, name: str) -> dict[str, Any] | None:
        """The settings a finished pair was made with, or None if not recorded."""
        try:
            with open(os.path.join(self.pair_dir(name), SETTINGS_FILE)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def write_pair(self, name: str, settings: Mapping[str, Any], work) -> None:
        """Runs ``work(out_dir)`` in a staging folder, then moves it to ``pairs/<name>``.

        ``settings`` are saved beside the outputs. An existing folder of that name (a
        pair redone with new settings) is replaced only once the new one is complete.
        """
        # Named, not created: ``work`` makes the folder when it has outputs to write, so a
        # pair that fails on its inputs costs no folder to make and remove (removing one
        # took 2.4 ms on an overlay file system, most of a failed pair's cost).
        tmp = os.path.join(self.staging_dir, f"{name}.{os.getpid()}.{secrets.token_hex(6)}")
        try:
            out = os.path.join(tmp, "out")
            work(out)
            atomic.write_text(os.path.join(out, SETTINGS_FILE), json.dumps(settings, indent=1))
            final = self.pair_dir(name)
            if os.path.exists(final):
                old = os.path.join(tmp, "old")
                os.replace(final, old)
            os.replace(out, final)
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)


def _holder(text: str) -> str:
    """The lock file's ``pid N on HOST since T``, unless it is stale (that pid is gone)."""
    parts = text.split()
    if len(parts) >= 4 and parts[0] == "pid" and parts[3] == socket.gethostname():
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            return "a process that is not a jaxreg run"
        except (ValueError, PermissionError):
            pass
    return text or "another process"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def differences(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs."""
    old, new = _flatten(recorded), _flatten(now)
    return [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def changed_pairs(workdir: Workdir, settings: Mapping[str, Mapping[str, Any]]
                  ) -> dict[str, list[str]]:
    """Finished pairs whose recorded settings differ from ``settings[name]``.

    Returns:
      name -> the differences (``["solver.iterations: 80 -> 20"]``; a pair without a
      record reports that).
    """
    changed = {}
    for name, now in settings.items():
        if not workdir.is_done(name):
            continue
        recorded = workdir.recorded(name)
        if recorded is None:
            changed[name] = [f"no {SETTINGS_FILE} (made by an older jaxreg)"]
        else:
            diff = differences(recorded, json.loads(json.dumps(now)))
            if diff:
                changed[name] = diff
    return changed
