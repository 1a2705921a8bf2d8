"""Reading checkpoints from local files and assigning them to Flax NNX modules.

Every encoder converts a reference state dict (PyTorch or Hugging Face names) to a
flat ``{"path.to.param": array}`` dict in jaxreg's own names with a plain numpy
function, then calls :func:`assign_params`, which is strict: anything missing,
unexpected or mis-shaped raises :class:`CheckpointError` listing all of it.

torch is imported only to read ``.pth`` files; ``.safetensors`` files need no torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from jaxreg import atomic

__all__ = [
    "CheckpointError",
    "read_state_dict",
    "write_safetensors",
    "flat_params",
    "assign_params",
    "strip_prefix",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "teacher")


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors``, ``.pth``/``.pt``/``.bin`` file into numpy arrays.

    A state dict wrapped in a dict (``{"model": ...}``, ``{"state_dict": ...}``) is
    unwrapped; a ``module.`` prefix (DataParallel checkpoints) is removed.

    Args:
      path: the file.

    Returns:
      A flat dict from parameter name to numpy array.

    Raises:
      CheckpointError: the file is missing, truncated or not a state dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            sd = load_file(path)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    else:
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(
                f"{path}: reading a PyTorch checkpoint needs torch; convert it once to "
                "safetensors with `python -m jaxreg.convert` on a machine with torch"
            ) from e
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
        for _ in range(3):
            if isinstance(obj, Mapping):
                inner = [k for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)]
                if inner and not any(hasattr(v, "shape") for v in obj.values()):
                    obj = obj[inner[0]]
                    continue
            break
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
        sd = {k: _to_numpy(v) for k, v in obj.items() if hasattr(v, "shape")}
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors")
    if all(k.startswith("module.") for k in sd):
        sd = strip_prefix(sd, "module.")
    return sd


def strip_prefix(sd: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Keeps the entries whose name starts with ``prefix``, without it."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def write_safetensors(params: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes a flat dict of arrays as safetensors, atomically (temporary file, rename)."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with atomic.atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, tmp)


def _path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters (and batch statistics) as ``{"a.0.kernel": array}``."""
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    return {_path_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def assign_params(
    model: nnx.Module, params: Mapping[str, np.ndarray], *, source: str = "checkpoint"
) -> None:
    """Sets every parameter of ``model`` from ``params``, strictly.

    Args:
      model: an NNX module; its ``nnx.Param`` and ``nnx.BatchStat`` variables are set.
      params: flat dict in the model's own names (see :func:`flat_params`).
      source: the file name to quote in errors.

    Raises:
      CheckpointError: listing every missing, unexpected and mis-shaped parameter.
    """
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    flat = nnx.to_flat_state(state)
    names = {_path_name(p): (p, v) for p, v in flat}
    missing = sorted(set(names) - set(params))
    unexpected = sorted(set(params) - set(names))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(np.shape(params[k]))} vs model {tuple(v.get_value().shape)}"
        for k, (_, v) in names.items()
        if k in params and tuple(np.shape(params[k])) != tuple(v.get_value().shape)
    )
    if missing or unexpected or misshaped:
        lines = [f"{source} does not fit {type(model).__name__}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ", ".join(items[:50])
                             + (" ..." if len(items) > 50 else ""))
        raise CheckpointError("\n".join(lines))
    for k, (_, v) in names.items():
        v.set_value(np.asarray(params[k], dtype=v.get_value().dtype))
    nnx.update(model, state)
