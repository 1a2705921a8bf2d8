"""PyTorch parameter names and layouts to Flax NNX ones, shared by the SAM-family converters.

The jaxreg modules of the SAM family name their submodules like the original PyTorch
code, so one rule per tensor kind converts a state dict:

* ``*.weight`` with 4 dims (``nn.Conv2d``, ``(O, I/groups, kh, kw)``) becomes ``*.kernel``
  ``(kh, kw, I/groups, O)``;
* ``*.weight`` with 2 dims (``nn.Linear``, ``(out, in)``) becomes ``*.kernel`` ``(in, out)``;
* ``*.weight`` with 1 dim (``LayerNorm``, ``BatchNorm``) becomes ``*.scale``;
* ``*.running_mean`` / ``*.running_var`` become ``*.mean`` / ``*.var``; batch-norm
  ``num_batches_tracked`` counters are dropped;
* anything else keeps its name and layout (biases, position embeddings, attention biases),
  so a tensor the model does not have is reported as unexpected by ``assign_params``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["torch_to_nnx", "is_nnx_layout"]


def torch_to_nnx(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Converts PyTorch names and layouts to NNX ones by the rules of the module docstring.

    Args:
      sd: flat state dict, numpy arrays, names already relative to the encoder.

    Returns:
      Flat ``{"a.b.kernel": array}`` dict.
    """
    out = {}
    for name, value in sd.items():
        value = np.asarray(value)
        stem, _, leaf = name.rpartition(".")
        prefix = stem + "." if stem else ""
        if leaf == "num_batches_tracked":
            continue
        if leaf == "weight" and value.ndim == 4:
            out[prefix + "kernel"] = value.transpose(2, 3, 1, 0)
        elif leaf == "weight" and value.ndim == 2:
            out[prefix + "kernel"] = value.T
        elif leaf == "weight" and value.ndim == 1:
            out[prefix + "scale"] = value
        elif leaf == "running_mean":
            out[prefix + "mean"] = value
        elif leaf == "running_var":
            out[prefix + "var"] = value
        else:
            out[name] = value
    return out


def is_nnx_layout(sd: Mapping[str, np.ndarray]) -> bool:
    """Whether ``sd`` already holds jaxreg (NNX) names, e.g. a file written by ``jaxreg.convert``."""
    return any(k.endswith((".kernel", ".scale")) for k in sd) and not any(
        k.endswith((".weight", ".running_mean")) for k in sd
    )
