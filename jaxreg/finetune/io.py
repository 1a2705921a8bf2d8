"""The adapter file: trained parameters as safetensors, with what they were trained for.

One format serves every fine-tuned part of jaxreg (a feature adapter over an encoder's
tokens, :mod:`jaxreg.finetune.features`; a tuned mask decoder, :mod:`jaxreg.finetune.segment`)
and their training checkpoints:

* tensors: the leaves of a pytree of arrays, each named by its path (``"w1"``,
  ``"params/layers/0/kernel"``, ``"opt/0/mu/w1"``), float32 or integer;
* metadata (safetensors' ``__metadata__``, strings only): ``jaxreg_kind`` (what the file
  is: ``"feature_adapter"``, ``"mask_decoder"``, ``"checkpoint"``), ``jaxreg_version``
  (this format's version), and ``jaxreg_info``: a JSON object the trainer chose (the
  encoder, the layer, the training settings, the step).

Files are written whole or not at all (:func:`jaxreg.io.atomic.atomic_path`); a file that
cannot be read, or is of another kind or encoder, is refused with a message naming it.

>>> import os, tempfile, numpy as np
>>> path = os.path.join(tempfile.mkdtemp(), "a.safetensors")
>>> save(path, {"w": np.eye(2, dtype=np.float32)}, kind="feature_adapter",
...      info={"encoder": "litemedsam"})
>>> tree, info = load(path, kind="feature_adapter")
>>> tree["w"].shape, info["encoder"]
((2, 2), 'litemedsam')
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxreg.io import atomic

__all__ = ["FORMAT_VERSION", "KINDS", "flatten", "unflatten", "save", "load", "read_info"]

FORMAT_VERSION = "1"
KINDS = ("feature_adapter", "mask_decoder", "checkpoint")
_SEP = "/"


def _key_name(entry) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flatten(tree: Any) -> dict[str, np.ndarray]:
    """A pytree's leaves as ``{path: numpy array}``, paths joined by ``/``."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = _SEP.join(_key_name(p) for p in path) or "_"
        if name in flat:
            raise ValueError(f"two leaves named {name!r}")
        flat[name] = np.ascontiguousarray(np.asarray(leaf))
    return flat


def unflatten(flat: Mapping[str, np.ndarray], like: Any = None) -> Any:
    """The inverse of :func:`flatten`: into the structure of ``like`` (a pytree of the same
    paths, e.g. a freshly initialised optimiser state), or, without it, nested dicts."""
    if like is not None:
        paths = jax.tree_util.tree_flatten_with_path(like)
        names = [_SEP.join(_key_name(p) for p in path) or "_" for path, _ in paths[0]]
        missing = sorted(set(names) - set(flat))
        extra = sorted(set(flat) - set(names))
        if missing or extra:
            raise ValueError(f"tensors do not match the expected structure: missing "
                             f"{missing[:5]}, unexpected {extra[:5]}")
        # safetensors stores a 0-d array as 1-d: each leaf gets its template's shape back
        leaves = [np.reshape(flat[n], np.shape(leaf)) if np.size(flat[n]) == np.size(leaf)
                  else flat[n] for n, (_, leaf) in zip(names, paths[0])]
        return jax.tree_util.tree_unflatten(paths[1], leaves)
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(_SEP)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save(path: str | os.PathLike, tree: Any, *, kind: str, info: Mapping | None = None
         ) -> None:
    """Writes ``tree``'s arrays and ``info`` (JSON-able) to ``path``, atomically."""
    from safetensors.numpy import save_file

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {', '.join(KINDS)}")
    metadata = {"jaxreg_kind": kind, "jaxreg_version": FORMAT_VERSION,
                "jaxreg_info": json.dumps(dict(info or {}), sort_keys=True)}
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(folder, exist_ok=True)
    with atomic.atomic_path(path, suffix=".safetensors") as tmp:
        save_file(flatten(tree), tmp, metadata=metadata)


def _metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such adapter file")
    try:
        with safe_open(path, framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def read_info(path: str | os.PathLike, *, kind: str | None = None) -> dict:
    """The ``info`` a file was saved with (its kind checked when ``kind`` is given)."""
    path = os.fspath(path)
    meta = _metadata(path)
    if "jaxreg_kind" not in meta:
        raise ValueError(f"{path}: a safetensors file, but not one jaxreg wrote (no "
                         "jaxreg_kind in its metadata)")
    if kind is not None and meta["jaxreg_kind"] != kind:
        raise ValueError(f"{path}: holds a {meta['jaxreg_kind']}, not a {kind}")
    if meta.get("jaxreg_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {meta.get('jaxreg_version')!r}; this "
                         f"jaxreg reads version {FORMAT_VERSION}")
    try:
        return json.loads(meta.get("jaxreg_info", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its jaxreg_info metadata is not JSON ({e})") from e


def load(path: str | os.PathLike, *, kind: str | None = None, like: Any = None
         ) -> tuple[Any, dict]:
    """``(tree, info)`` from a file :func:`save` wrote; ``like`` as in :func:`unflatten`.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a jaxreg file, another kind or version, or other tensors than
        ``like`` has; each message starts with the path.
    """
    from safetensors.numpy import load_file

    path = os.fspath(path)
    info = read_info(path, kind=kind)
    try:
        flat = load_file(path)
    except Exception as e:
        raise ValueError(f"{path}: tensors unreadable ({e})") from e
    try:
        return unflatten(flat, like), info
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
