"""PyTorch / Hugging Face parameter names and layouts to jaxreg's Flax NNX ones (plain numpy).

Two ways to write a family's ``convert``:

* by layout rule (:func:`torch_to_nnx`), for modules named like the original PyTorch code
  (SAM, TinyViT): after :func:`rename_prefixes` has fixed the few names that differ,

  - ``*.weight`` with 4 dims (``nn.Conv2d``, ``(O, I/groups, kh, kw)``) becomes ``*.kernel``
    ``(kh, kw, I/groups, O)``;
  - ``*.weight`` with 2 dims (``nn.Linear``, ``(out, in)``) becomes ``*.kernel`` ``(in, out)``;
  - ``*.weight`` with 1 dim (``LayerNorm``, ``BatchNorm``) becomes ``*.scale``;
  - ``*.running_mean`` / ``*.running_var`` become ``*.mean`` / ``*.var``; batch-norm
    ``num_batches_tracked`` counters are dropped;
  - anything else keeps its name and layout (biases, position embeddings, attention biases);

* by regular expression (:func:`convert_by_rules` with :func:`rename`,
  :func:`linear_rules`, :func:`norm_rules`, :func:`conv_rules`, :func:`split_rule`), for
  Hugging Face layouts whose names differ throughout (DINOv2, DINOv3, CLIP).

Either way a tensor the model does not have keeps its name, so the strict assignment
reports it as unexpected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = ["torch_to_nnx", "rename_prefixes", "rename", "linear_rules", "norm_rules",
           "conv_rules", "split_rule", "convert_by_rules"]

Rule = tuple[str, Callable]


def torch_to_nnx(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Converts PyTorch names and layouts to NNX ones by the layout rules above.

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


def rename_prefixes(sd: Mapping[str, np.ndarray],
                    renames: Sequence[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Replaces name prefixes: each ``(old, new)`` applies, in order, to names starting with ``old``."""
    out = {}
    for k, v in sd.items():
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = v
    return out


_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda v: v,
    "linear": lambda v: v.T,
    "conv": lambda v: v.transpose(2, 3, 1, 0),
    "vector": lambda v: v.reshape(-1),
    "rows": lambda v: v.reshape(-1, v.shape[-1]),
}


def rename(pattern: str, dst: str, kind: str = "copy") -> Rule:
    """A rule: entries matching ``pattern`` go to ``dst`` (``\\1`` groups allowed).

    ``kind``: ``"copy"``; ``"linear"`` (transpose a torch (out, in) weight);
    ``"conv"`` (torch (O, I, kh, kw) to (kh, kw, I, O)); ``"vector"`` ((1, 1, C) to
    (C,)); ``"rows"`` ((1, N, C) to (N, C)).
    """
    transform = _TRANSFORMS[kind]

    def fn(m, value, out):
        out[m.expand(dst)] = transform(value)

    return pattern, fn


def linear_rules(src: str, dst: str) -> list[Rule]:
    """Rules for a torch Linear at regex ``src`` going to NNX Linear ``dst``."""
    return [rename(src + r"\.weight", dst + ".kernel", "linear"),
            rename(src + r"\.bias", dst + ".bias")]


def norm_rules(src: str, dst: str) -> list[Rule]:
    """Rules for a torch LayerNorm at regex ``src`` going to NNX LayerNorm ``dst``."""
    return [rename(src + r"\.weight", dst + ".scale"), rename(src + r"\.bias", dst + ".bias")]


def conv_rules(src: str, dst: str) -> list[Rule]:
    """Rules for a torch Conv2d at regex ``src`` going to NNX Conv ``dst``."""
    return [rename(src + r"\.weight", dst + ".kernel", "conv"),
            rename(src + r"\.bias", dst + ".bias")]


def split_rule(pattern: str, dsts: Sequence[str], kind: str = "linear") -> Rule:
    """A rule splitting a fused torch weight (q|k|v, gate|up) along its output axis."""
    def fn(m, value, out):
        for d, part in zip(dsts, np.split(value, len(dsts), axis=0)):
            out[m.expand(d)] = part.T if kind == "linear" else part

    return pattern, fn


def convert_by_rules(sd: Mapping[str, np.ndarray], rules: Sequence[Rule],
                     ignore: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Applies ``rules`` (regex, fn(match, value, out)) to every entry of ``sd``.

    The first rule whose regex matches the whole name applies. An entry no rule matches
    and ``ignore`` does not name keeps its own name.
    """
    out: dict[str, np.ndarray] = {}
    compiled = [(re.compile(p), fn) for p, fn in rules]
    ignored = [re.compile(p) for p in ignore]
    for key, value in sd.items():
        for pattern, fn in compiled:
            m = pattern.fullmatch(key)
            if m:
                fn(m, np.asarray(value), out)
                break
        else:
            if not any(p.fullmatch(key) for p in ignored):
                out[key] = np.asarray(value)
    return out
