"""What the SAM image encoder and LiteMedSAM's TinyViT share: SAM's neck, window partitioning,
and the renames of their ``segment_anything``-style checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreg.encoders import _torch_names as tn
from jaxreg.encoders import checkpoint as _checkpoint

__all__ = ["Neck", "window_partition", "window_unpartition", "NECK_RENAMES",
           "strip_image_encoder", "convert_image_encoder"]

# segment_anything's nn.Sequential neck (conv, LayerNorm2d, conv, LayerNorm2d) -> Neck.
NECK_RENAMES = (("neck.0.", "neck.conv1."), ("neck.1.", "neck.norm1."),
                ("neck.2.", "neck.conv2."), ("neck.3.", "neck.norm2."))


class Neck(nnx.Module):
    """SAM's neck: 1x1 conv, channel LayerNorm, 3x3 conv, channel LayerNorm (no conv biases)."""

    def __init__(self, dim: int, out: int, *, eps: float = 1e-6, dtype, rngs: nnx.Rngs):
        """Args:
          dim: input channels.
          out: output channels.
          eps: epsilon of both LayerNorms.
          dtype: compute dtype.
          rngs: random keys for initialisation.
        """
        self.conv1 = nnx.Conv(dim, out, (1, 1), use_bias=False, dtype=dtype, rngs=rngs)
        self.norm1 = nnx.LayerNorm(out, epsilon=eps, dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(out, out, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                              dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(out, epsilon=eps, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm2(self.conv2(self.norm1(self.conv1(x))))


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
    """Zero-pads ``(B, H, W, C)`` bottom/right to whole windows and cuts it into them.

    Returns:
      ``(B * windows, window, window, C)`` and the padded size ``(Hp, Wp)``.
    """
    b, h, w, c = x.shape
    ph, pw = -h % window, -w % window
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(x: jax.Array, window: int, padded: tuple[int, int],
                       size: tuple[int, int]) -> jax.Array:
    """Inverse of :func:`window_partition`, padding removed: ``(B, size[0], size[1], C)``."""
    hp, wp = padded
    b = x.shape[0] // ((hp // window) * (wp // window))
    x = x.reshape(b, hp // window, wp // window, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, : size[0], : size[1]]


def convert_image_encoder(enc: Mapping[str, np.ndarray],
                          renames: Sequence[tuple[str, str]] = ()) -> dict[str, np.ndarray]:
    """An image-encoder state dict (names relative to the encoder) to jaxreg's params.

    Applies ``renames`` and :data:`NECK_RENAMES`, then the layout rules of
    :func:`jaxreg.encoders._torch_names.torch_to_nnx`.
    """
    return tn.torch_to_nnx(tn.rename_prefixes(enc, tuple(renames) + NECK_RENAMES))


def strip_image_encoder(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The ``image_encoder.*`` part of a whole-model checkpoint (prompt encoder and mask
    decoder dropped), or None when there is none."""
    if any(k.startswith("image_encoder.") for k in sd):
        return _checkpoint.strip_prefix(sd, "image_encoder.")
    return None
