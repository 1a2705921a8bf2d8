"""Converts a reference checkpoint once to jaxreg-layout safetensors, so runs need no torch.

    python -m jaxreg.encoders.convert --encoder sam_vitb --input sam_vit_b_01ec64.pth \\
        --output ~/weights/sam_vitb.safetensors
    python -m jaxreg.encoders.convert --encoder litemedsam --input lite_medsam.pth \\
        --output ~/weights/litemedsam.safetensors

The parameters are checked strictly against the named variant before anything is
written: every missing, unexpected or mis-shaped tensor is reported and nothing is saved.

    python -m jaxreg.encoders.convert --encoder dinov2_vitl14_reg \\
        --input dinov2_vitl14_reg4_pretrain.pth --output dinov2_vitl14_reg.safetensors

``--input`` may be a file, a Hugging Face model folder or an offline Hugging Face cache
folder (``models--org--name``); ``--encoder`` a variant name of any family
(``sam_vitl``) or an encoder name of the registry (``medclip``: its variant).

The families are those of :func:`jaxreg.encoders.registry.families`; each module's
``VARIANTS``, ``create`` and ``convert`` are used (the protocol is listed in
:mod:`jaxreg.encoders.registry`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

import numpy as np

__all__ = ["family_of", "convert", "main"]


def family_of(encoder: str):
    """(family module, variant name) for a variant name or a registry encoder name."""
    from jaxreg.encoders import registry

    if encoder in registry.ENCODERS:
        entry = registry.ENCODERS[encoder]
        return entry.module, entry.variant
    known = []
    for family in registry.families():
        module = importlib.import_module(f"jaxreg.encoders.{family}")
        if encoder in module.VARIANTS:
            return module, encoder
        known.extend(module.VARIANTS)
    raise ValueError(f"unknown encoder {encoder!r}; known: {', '.join(sorted(known))} "
                     f"or {', '.join(sorted(registry.ENCODERS))}")


def convert(encoder: str, input_path: str | os.PathLike,
            output_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads ``input_path``, converts and checks it for ``encoder``, writes ``output_path``.

    Args:
      encoder: a variant name of a family, or an encoder name of the registry.
      input_path: reference checkpoint (``.pth`` needs torch, or ``.safetensors``).
      output_path: safetensors file to write (atomically).

    Returns:
      The converted parameters.

    Raises:
      ValueError: unknown encoder.
      CheckpointError: unreadable checkpoint or one that does not fit the variant.
    """
    from jaxreg.encoders import checkpoint as _checkpoint

    module, variant = family_of(encoder)
    # The family's own load sequence: a folder's config.json is checked against the
    # variant, the checkpoint's layout picks the variant where it decides (medclip), and
    # every parameter is assigned strictly.
    params = _checkpoint.flat_params(module.load(variant, input_path))
    _checkpoint.write_safetensors(params, output_path)
    return params


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxreg.encoders.convert",
        description="Convert an encoder checkpoint to jaxreg-layout safetensors.")
    parser.add_argument("--encoder", required=True,
                        help="variant (sam_vitl, dinov2_vits14) or encoder name (medclip)")
    parser.add_argument("--input", required=True, help="reference checkpoint (.pth/.safetensors)")
    parser.add_argument("--output", required=True, help="safetensors file to write")
    args = parser.parse_args(argv)
    from jaxreg.encoders.checkpoint import CheckpointError

    try:
        params = convert(args.encoder, args.input, args.output)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(int(np.prod(v.shape)) for v in params.values())
    print(f"wrote {args.output}: {len(params)} tensors, {n / 1e6:.2f} M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
