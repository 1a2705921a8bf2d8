"""Reading checkpoints from local files and folders, and assigning them to Flax NNX modules.

:func:`read_checkpoint` reads a file, a Hugging Face model folder or an offline Hugging
Face cache folder into one flat state dict; a family's ``convert`` maps it to jaxreg's
names (unless :func:`is_converted` says it already has them); :func:`assign_params` is
strict: anything missing, unexpected or mis-shaped raises :class:`CheckpointError`
listing all of it. :func:`jaxreg.encoders._base.load_checkpoint` chains the three.

torch is imported only to read ``.pth`` files; ``.safetensors`` files need no torch.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxreg.io import atomic

if TYPE_CHECKING:  # the annotations only: MIND-SSC runs never load flax
    from flax import nnx

__all__ = [
    "CheckpointError",
    "read_state_dict",
    "resolve_checkpoint",
    "read_checkpoint",
    "is_converted",
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
                "safetensors with `python -m jaxreg.encoders.convert` on a machine with torch"
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


# The weight files of a model folder, in the order they are looked for.
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                 "open_clip_pytorch_model.bin")


def resolve_checkpoint(path: str | os.PathLike) -> list[str]:
    """The weight file(s) behind ``path``.

    Args:
      path: a weight file (``.safetensors``, ``.pth``, ``.bin``); a Hugging Face model
        folder (``config.json`` + ``model.safetensors``, sharded or not, or
        ``pytorch_model.bin``); an open_clip model folder (``open_clip_config.json`` +
        ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``, as
        BiomedCLIP's); or an offline Hugging Face cache folder ``models--org--name`` (its
        newest ``snapshots/*/``).

    Returns:
      The files to read, in order.

    Raises:
      CheckpointError: nothing loadable at ``path``.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    snapshots = sorted(glob.glob(os.path.join(path, "snapshots", "*")), key=os.path.getmtime)
    for folder in [path] + snapshots[::-1]:
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, s) for s in shards]
        for name in _FOLDER_FILES:
            if os.path.isfile(os.path.join(folder, name)):
                return [os.path.join(folder, name)]
    raise CheckpointError(
        f"{path}: a folder without model.safetensors.index.json or any of "
        f"{', '.join(_FOLDER_FILES)} (nor a Hugging Face cache folder with snapshots/*/ "
        "holding one)")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """Reads every file :func:`resolve_checkpoint` finds into one state dict.

    Returns:
      (state dict, the path to quote in errors).
    """
    files = resolve_checkpoint(path)
    sd: dict[str, np.ndarray] = {}
    for f in files:
        sd.update(read_state_dict(f))
    return sd, files[0] if len(files) == 1 else os.fspath(path)


def is_converted(sd: Mapping[str, np.ndarray]) -> bool:
    """Whether ``sd`` already holds jaxreg's names, as ``python -m jaxreg.encoders.convert`` writes
    them (Flax ``kernel``/``scale``, never PyTorch's ``weight``/``running_mean``)."""
    return any(k.endswith((".kernel", ".scale")) for k in sd) and not any(
        k.endswith((".weight", ".running_mean")) for k in sd)


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
    from flax import nnx  # with the encoders only: MIND-SSC runs never load flax
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
    from flax import nnx  # with the encoders only: MIND-SSC runs never load flax
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
