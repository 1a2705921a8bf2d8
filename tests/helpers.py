"""Helpers shared by several test files, one copy each (tests/ is on sys.path under pytest).

* :func:`jit_apply`, :func:`apply`: run an ``nnx`` model jitted, its state an argument.
* :func:`random_images`: seeded standard-normal RGB batches for the encoder parity tests.
* :func:`perturb_`, :func:`randomise_`, :func:`numpy_state_dict`, :func:`from_torch`:
  random-weight PyTorch (transformers) references, their weights as numpy, and the jaxreg
  model holding them.
* :func:`hf_vit_errors`: a jaxreg ViT's maps against its transformers twin, as relative
  errors with their float32 bound (tests/_parity.py).
* :func:`assert_close`: the ``TOL * max(1, max |reference|)`` check of the TinyViT / SAM
  head parity tests.
* :func:`isolate_weights`: an environment in which the encoder registry finds weights only
  in its package source or a given cache folder.
* :class:`PatchEncoder`, :func:`patch_encoder`: a linear patch-embedding encoder small
  enough to check the feature pipeline against numpy.

torch is imported only by the functions that need it: files without torch import this
module too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PATCH = 4  # PatchEncoder's patch size


# Running models --------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _merged_call(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def jit_apply(model: nnx.Module):
    """``model``'s call, jitted with its state as an argument: compiled once per
    architecture and input shape, whatever the weights."""
    graphdef, state = nnx.split(model)
    return lambda x: _merged_call(graphdef, state, x)


def apply(model: nnx.Module, x) -> dict:
    """``model(x)`` jitted (:func:`jit_apply`), its outputs on the host."""
    return jax.device_get(jit_apply(model)(jnp.asarray(x)))


def random_images(h: int, w: int, batch: int = 1, seed: int = 0) -> np.ndarray:
    """``(batch, h, w, 3)`` float32 standard-normal images (``numpy.random.RandomState``)."""
    return np.random.RandomState(seed).randn(batch, h, w, 3).astype(np.float32)


# PyTorch references ----------------------------------------------------------------------

def perturb_(model, scale: float = 0.05, seed: int | None = None):
    """Adds ``scale`` x N(0, 1) to every parameter of a torch model (from torch's global
    generator, seeded with ``seed`` first if given), so that every parameter matters;
    returns it in eval mode."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def randomise_(model, scale: float):
    """Replaces every parameter of a torch model by ``scale`` x N(0, 1), plus 1 for norm
    scales (transformers initialises some to zero: position embeddings, relative
    positions); returns it."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * scale + (1.0 if is_norm_scale else 0.0))
    return model


def numpy_state_dict(model) -> dict[str, np.ndarray]:
    """A torch model's ``state_dict()`` as numpy arrays."""
    return {k: v.numpy() for k, v in model.state_dict().items()}


def from_torch(family, torch_model, variant, *, seed: int = 0) -> nnx.Module:
    """``family.create(variant)`` (a :mod:`jaxreg.encoders` family module) holding
    ``torch_model``'s weights, converted by ``family.convert`` and assigned strictly."""
    from jaxreg.encoders.checkpoint import assign_params

    model = family.create(variant, rngs=nnx.Rngs(seed))
    assign_params(model, family.convert(numpy_state_dict(torch_model)))
    return model


def hf_vit_errors(hf, model, x: np.ndarray, *, patch: int, prefix: int = 1, final=None,
                  **hf_kwargs) -> tuple[dict[str, float], float]:
    """Relative error of every map of a jaxreg ViT against its transformers twin
    (tests/_parity.py), and the float32 bound it must meet.

    The maps compared: ``"features"`` (transformers' last hidden state, through ``final``
    if given, e.g. CLIP's post-norm), ``"cls"`` (its pooler output) and ``"block_<i>"``
    (hidden state i), each without its first ``prefix`` tokens (the class token and any
    registers) and as a ``(B, h, w, C)`` grid of ``patch``-pixel tokens. ``hf_kwargs`` go
    to the transformers call (e.g. ``interpolate_pos_encoding=True``).
    """
    import torch
    from _parity import relative_errors, vit_bound

    with torch.no_grad():
        ref = hf(torch.from_numpy(x).permute(0, 3, 1, 2), output_hidden_states=True,
                 **hf_kwargs)
        last = ref.last_hidden_state if final is None else final(ref.last_hidden_state)
    out = model(jnp.asarray(x))
    b, h, w = x.shape[0], x.shape[1] // patch, x.shape[2] // patch
    maps = lambda t: t[:, prefix:].reshape(b, h, w, -1).numpy()  # noqa: E731
    expected = {"features": maps(last), "cls": ref.pooler_output.numpy()}
    for i in range(1, len(ref.hidden_states)):
        expected[f"block_{i}"] = maps(ref.hidden_states[i])
    assert out["features"].shape == (b, h, w, hf.config.hidden_size)
    assert all(v.dtype == jnp.float32 for v in out.values())
    return relative_errors(expected, out), vit_bound(model.config, prefix + h * w)


def assert_close(got, expected, name: str, tol: float = 1e-4) -> float:
    """Asserts ``max |got - expected| <= tol * max(1, max |expected|)`` (same shapes);
    returns ``max |got - expected| / max(1, max |expected|)``."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, f"{name}: {got.shape} vs {expected.shape}"
    diff = float(np.abs(got - expected).max())
    scale = max(1.0, float(np.abs(expected).max()))
    assert diff <= tol * scale, f"{name}: max abs diff {diff:.3g}, max |reference| {scale:.3g}"
    return diff / scale


def isolate_weights(mp, cache) -> None:
    """Environment (``mp``: a pytest ``MonkeyPatch``) in which the encoder registry finds
    weights only in an encoder's installed package source or in ``cache`` (a
    ``pathlib.Path``): no $JAXREG_WEIGHTS_DIR, and the Hugging Face caches and $HOME
    inside ``cache``."""
    mp.delenv("JAXREG_WEIGHTS_DIR", raising=False)
    mp.setenv("JAXREG_CACHE_DIR", str(cache))
    mp.setenv("HF_HUB_CACHE", str(cache / "hf"))
    mp.setenv("HF_HOME", str(cache / "hf"))
    mp.setenv("HOME", str(cache / "home"))


# A small encoder for the feature pipeline ------------------------------------------------

class PatchEncoder(nnx.Module):
    """A linear patch embedding: each 4x4 patch of channel 0 times a fixed random
    ``(16, channels)`` matrix (``"features"``); ``"shallow"``: the square of its first
    three channels."""

    def __init__(self, channels: int = 6, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.weight = nnx.Param(jnp.asarray(rng.normal(size=(PATCH * PATCH, channels)),
                                            jnp.float32))

    def __call__(self, images):
        b, h, w, _ = images.shape
        x = images[..., 0].reshape(b, h // PATCH, PATCH, w // PATCH, PATCH)
        x = x.transpose(0, 1, 3, 2, 4).reshape(b, h // PATCH, w // PATCH, PATCH * PATCH)
        out = x @ self.weight[...]
        return {"features": out, "shallow": out[..., :3] ** 2}


def patch_encoder(name: str = "patch", *, channels: int = 6, image_size: int = 32,
                  resize: str = "square", chunk: int = 3, layers=("features",)):
    """A :class:`jaxreg.features.SliceEncoder` of a :class:`PatchEncoder`."""
    from jaxreg import features as F
    from jaxreg.encoders._base import EncoderSpec, Preprocessing

    spec = EncoderSpec(name=name, config=None, patch_size=PATCH, channels=channels,
                       preprocessing=Preprocessing(image_size=image_size, resize=resize))
    return F.SliceEncoder(PatchEncoder(channels), spec, layers=layers, chunk=chunk)
