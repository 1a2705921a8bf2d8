"""The converter command writes safetensors that load like the original checkpoint; the
registry's pyramids name maps the models return."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreg.encoders import convert
from jaxreg.encoders import dinov2, registry

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_convert_hf_folder_for_a_vit_family(tmp_path):
    torch.manual_seed(0)
    hf = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518,
        patch_size=14))
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "vits14.safetensors"
    assert convert.main(["--encoder", "dinov2_vits14", "--input", str(tmp_path / "hf"),
                         "--output", str(out)]) == 0
    x = np.random.default_rng(0).normal(size=(1, 56, 70, 3)).astype(np.float32)
    from_folder = dinov2.load("dinov2_vits14", tmp_path / "hf")(x)["features"]
    from_converted = dinov2.load("dinov2_vits14", out)(x)["features"]
    np.testing.assert_array_equal(np.asarray(from_folder), np.asarray(from_converted))


def test_convert_refuses_a_mismatched_checkpoint_and_writes_nothing(tmp_path, capsys):
    torch.manual_seed(0)
    hf = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=98, patch_size=14))
    hf.save_pretrained(tmp_path / "small")
    out = tmp_path / "x.safetensors"
    # A folder: its config.json is read and refused before any tensor is compared.
    assert convert.main(["--encoder", "dinov2_vits14", "--input", str(tmp_path / "small"),
                         "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "config.json" in err and "hidden_size" in err and not out.exists()
    # The weight file alone: the strict check lists the mis-shaped tensors.
    assert convert.main(["--encoder", "dinov2_vits14", "--input",
                         str(tmp_path / "small" / "model.safetensors"), "--output", str(out)]) == 1
    assert "mis-shaped" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("name", sorted(registry.ENCODERS))
def test_registry_pyramid_names_maps_the_model_returns(name):
    """Every family names its maps the same way (_base), and the registry uses those names."""
    entry = registry.ENCODERS[name]
    model = nnx.eval_shape(lambda: entry.module.create(entry.variant, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    side = 4 * entry.spec.patch_size
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                         jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))
    assert set(entry.pyramid) <= set(out) and entry.pyramid[-1] == "features"
    kinds = {"tinyvit": {"stage"}, "hiera": {"stage", "fpn"}}.get(entry.family, {"block"})
    numbered = [k for k in out if k not in ("features", "cls")]
    assert {k.split("_")[0] for k in numbered} == kinds
    for kind in kinds:  # each kind counted from 1 without gaps
        got = sorted(int(k.split("_")[1]) for k in numbered if k.startswith(kind + "_"))
        assert got == list(range(1, len(got) + 1)), (kind, got)
