"""Shared ViT pieces (torch-exact bicubic resampling) and checkpoint folders."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxreg.encoders import vit  # noqa: E402
from jaxreg.encoders.checkpoint import CheckpointError, resolve_checkpoint  # noqa: E402


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("size", [(37, 37), (128, 128), (20, 26), (9, 5), (3, 50)])
def test_resample_matches_torch_interpolate(antialias, size):
    grid = np.random.RandomState(0).randn(37, 37, 8).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], size=size, mode="bicubic",
        align_corners=False, antialias=antialias)[0].permute(1, 2, 0).numpy()
    got = vit.resample_pos_embed(jnp.asarray(grid), size, antialias=antialias)
    np.testing.assert_allclose(got, ref, atol=2e-5)  # float32 rounding only


@pytest.mark.parametrize("size", [(16, 16), (128, 96), (20, 26)])
def test_resample_with_dino_offset_matches_scale_factor_call(size):
    """The original DINOv2 code: scale_factor=(n + 0.1) / grid instead of a size."""
    grid = np.random.RandomState(1).randn(37, 37, 4).astype(np.float32)
    sf = tuple((n + 0.1) / 37 for n in size)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], scale_factor=sf, mode="bicubic",
        align_corners=False)[0].permute(1, 2, 0).numpy()
    assert ref.shape[:2] == size
    got = vit.resample_pos_embed(jnp.asarray(grid), size, offset=0.1)
    np.testing.assert_allclose(got, ref, atol=2e-5)  # float32 rounding only


def test_resolve_checkpoint(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    assert resolve_checkpoint(tmp_path / "m") == [str(tmp_path / "m" / "model.safetensors")]
    snap = tmp_path / "models--o--n" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00002.safetensors", "b": "model-00001.safetensors"}}')
    assert resolve_checkpoint(tmp_path / "models--o--n") == [
        str(snap / "model-00001.safetensors"), str(snap / "model-00002.safetensors")]
    with pytest.raises(CheckpointError, match="without model.safetensors"):
        resolve_checkpoint(tmp_path / "models--o--n" / "snapshots")
    # An open_clip folder, as BiomedCLIP's release: open_clip_pytorch_model.bin.
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_pytorch_model.bin").write_bytes(b"")
    assert resolve_checkpoint(tmp_path / "oc") == [
        str(tmp_path / "oc" / "open_clip_pytorch_model.bin")]
    with pytest.raises(CheckpointError, match="no such"):
        resolve_checkpoint(tmp_path / "absent")


def test_set_attention_reaches_every_vit_layer_and_refuses_unknown_names():
    from flax import nnx

    from jaxreg.encoders import dinov2, sam

    model = dinov2.create("dinov2_vits14_reg", rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jnp.asarray(np.random.RandomState(0).rand(1, 56, 56, 3), jnp.float32)
    before = nnx.merge(graphdef, state)(x)["features"]
    assert vit.set_attention(model, "xla") == 12  # one per block of ViT-S
    assert all(node.implementation == "xla" for _, node in nnx.iter_graph(model)
               if isinstance(node, vit.Attention))
    np.testing.assert_array_equal(model(x)["features"], before)  # None and "xla": one path
    with pytest.raises(ValueError, match="'flash'"):
        vit.set_attention(model, "flash")
    assert vit.set_attention(sam.create("sam_vitb", rngs=nnx.Rngs(0)), "cudnn") == 0
