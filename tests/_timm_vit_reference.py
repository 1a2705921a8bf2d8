"""A small PyTorch reference of timm's ``VisionTransformer`` forward, for tests only.

Written from timm's published definition of ``vit_base_patch16_224`` (the image tower of
BiomedCLIP inside open_clip): a biased stride-16 patch convolution, a class token, learned
position embeddings over the class token and the patch grid (resampled bicubically with
anti-aliasing when the grid differs, as timm's ``resample_abs_pos_embed`` does), no norm
before the blocks, pre-norm blocks (fused q|k|v attention, exact-GELU MLP), a final layer
norm over every token. Parameter names are timm's, so ``state_dict()`` behind the prefix
``visual.trunk.`` is open_clip's layout. Cross-checked once against timm 1.0.31's
``vit_base_patch16_224`` (max abs err < 1e-5 at 2 blocks); timm itself is not a test
dependency (it needs torchvision).
"""

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        y = attn.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x)


class TimmViT(nn.Module):
    """timm's ViT: ``forward(x)`` returns (final-normed tokens, [tokens after each block])."""

    def __init__(self, *, image_size=224, patch=16, dim=768, depth=12, heads=12,
                 mlp_ratio=4.0, eps=1e-6):
        super().__init__()
        self.grid = image_size // patch
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=eps)

    def _positions(self, h, w):
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if (h, w) != (self.grid, self.grid):
            c = grid.shape[-1]
            grid = grid.reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
            grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, c)
        return torch.cat([cls_pos, grid], dim=1)

    def forward(self, images):
        x = self.patch_embed(images)
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self._positions(h, w)
        hidden = []
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        return self.norm(x), hidden
