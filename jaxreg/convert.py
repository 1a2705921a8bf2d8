"""Converts a reference checkpoint once to jaxreg-layout safetensors, so runs need no torch.

    python -m jaxreg.convert --encoder sam_vitb --input sam_vit_b_01ec64.pth \\
        --output ~/weights/sam_vitb.safetensors
    python -m jaxreg.convert --encoder litemedsam --input lite_medsam.pth \\
        --output ~/weights/litemedsam.safetensors

The parameters are checked strictly against the named variant before anything is
written: every missing, unexpected or mis-shaped tensor is reported and nothing is saved.

    python -m jaxreg.convert --encoder dinov2_vitl14_reg \\
        --input dinov2_vitl14_reg4_pretrain.pth --output dinov2_vitl14_reg.safetensors

``--input`` may be a file, a Hugging Face model folder or an offline Hugging Face cache
folder (``models--org--name``).

An encoder family is one row of :data:`FAMILIES`: its module must expose ``VARIANTS``
(variant name -> ``EncoderSpec``) and ``create(name, *, dtype, rngs)``, and the row names
the module's converter, ``state dict -> flat jaxreg params`` or, where the layout depends
on the variant, ``(state dict, variant name) -> params``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = ["FAMILIES", "convert", "main"]

# family -> (module, name of its converter function, whether it takes the variant name)
FAMILIES: dict[str, tuple[str, str, bool]] = {
    "sam": ("jaxreg.encoders.sam", "convert_sam_state_dict", False),
    "tinyvit": ("jaxreg.encoders.tinyvit", "convert_tinyvit_state_dict", False),
    "dinov2": ("jaxreg.encoders.dinov2", "convert_state_dict", True),
    "dinov3": ("jaxreg.encoders.dinov3", "convert_state_dict", True),
    "clip": ("jaxreg.encoders.clip", "convert_state_dict", True),
}


def _family_of(encoder: str):
    """(module, converter) of the family whose ``VARIANTS`` holds ``encoder``."""
    known = []
    for module_name, fn_name, takes_name in FAMILIES.values():
        module = importlib.import_module(module_name)
        if encoder in module.VARIANTS:
            fn = getattr(module, fn_name)
            return module, (lambda sd: fn(sd, encoder)) if takes_name else fn
        known.extend(module.VARIANTS)
    raise ValueError(f"unknown encoder {encoder!r}; known: {', '.join(sorted(known))}")


def convert(encoder: str, input_path: str | os.PathLike,
            output_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads ``input_path``, converts and checks it for ``encoder``, writes ``output_path``.

    Args:
      encoder: a variant name of one of the families in :data:`FAMILIES`.
      input_path: reference checkpoint (``.pth`` needs torch, or ``.safetensors``).
      output_path: safetensors file to write (atomically).

    Returns:
      The converted parameters.

    Raises:
      ValueError: unknown encoder.
      CheckpointError: unreadable checkpoint or one that does not fit the variant.
    """
    from flax import nnx

    from jaxreg.encoders import _checkpoint
    from jaxreg.encoders import vit

    module, converter = _family_of(encoder)
    converter: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
    state_dict, source = vit.read_checkpoint(input_path)
    params = converter(state_dict)
    model = nnx.eval_shape(lambda: module.create(encoder, rngs=nnx.Rngs(0)))
    _checkpoint.assign_params(model, params, source=source)  # strict check
    _checkpoint.write_safetensors(params, output_path)
    return params


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxreg.convert",
        description="Convert an encoder checkpoint to jaxreg-layout safetensors.")
    parser.add_argument("--encoder", required=True, help="variant name, e.g. sam_vitb, litemedsam")
    parser.add_argument("--input", required=True, help="reference checkpoint (.pth/.safetensors)")
    parser.add_argument("--output", required=True, help="safetensors file to write")
    args = parser.parse_args(argv)
    from jaxreg.encoders._checkpoint import CheckpointError

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
