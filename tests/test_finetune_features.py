"""The adapter file format and the feature adapter: applying it in the feature pipeline,
training it (the loss falls, a resumed run equals an uninterrupted one), the synthetic
contrasts, and the ``python -m experiments.finetune features`` command line."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import PatchEncoder, patch_encoder
from jaxreg import features as F
from jaxreg.finetune import features as adapters
from jaxreg.finetune import io as adapter_io
from jaxreg.finetune import synthetic


def _adapter_file(tmp_path, *, channels=6, hidden=0, dims=4, spec="patch", seed=0):
    params = adapters.init_adapter(jax.random.key(seed), channels, hidden=hidden, dims=dims,
                                   mean=np.linspace(-1, 1, channels),
                                   std=np.linspace(1, 2, channels))
    path = str(tmp_path / f"adapter_{spec}_{hidden}.safetensors")
    adapter_io.save(path, {"features": params}, kind="feature_adapter",
                    info={"encoder": spec, "spec": spec, "render": "intensity"})
    return path, params


# ----------------------------------------------------------------------------- the file

def test_file_round_trip_and_refusals(tmp_path):
    path, params = _adapter_file(tmp_path, hidden=5)
    tree, info = adapter_io.load(path, kind="feature_adapter")
    assert info == {"encoder": "patch", "spec": "patch", "render": "intensity"}
    for k, v in params.items():
        np.testing.assert_array_equal(tree["features"][k], np.asarray(v))
    with pytest.raises(ValueError, match=f"{path}: holds a feature_adapter, not a checkpoint"):
        adapter_io.load(path, kind="checkpoint")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        adapter_io.load(str(tmp_path / "nope.safetensors"))
    from safetensors.numpy import save_file

    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"w": np.ones(2, np.float32)}, foreign)
    with pytest.raises(ValueError, match="foreign.safetensors: .* not one jaxreg wrote"):
        adapter_io.load(foreign)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors: not a readable"):
        adapter_io.load(str(broken))
    with pytest.raises(ValueError, match="missing"):
        adapter_io.load(path, like={"features": {"w2": 0}})


def test_failed_write_keeps_the_old_file(tmp_path):
    path, _ = _adapter_file(tmp_path)
    before = open(path, "rb").read()
    with pytest.raises(Exception):
        adapter_io.save(path, {"bad": object()}, kind="feature_adapter")
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]


# ----------------------------------------------------------------------------- applying it

def test_apply_adapter_against_numpy():
    rng = np.random.default_rng(0)
    params = adapters.init_adapter(jax.random.key(1), 5, hidden=7, dims=3,
                                   mean=rng.normal(size=5), std=rng.uniform(1, 2, 5))
    x = rng.normal(size=(4, 6, 5)).astype(np.float32)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    h = (x - p["mean"]) / p["std"] @ p["w1"] + p["b1"]
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))  # GELU (tanh)
    y = h @ p["w2"] + p["b2"]
    y /= np.linalg.norm(y, axis=-1, keepdims=True)
    got = np.asarray(adapters.apply_adapter(params, x))
    np.testing.assert_allclose(got, y, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


class _AdaptedPatchEncoder(PatchEncoder):
    """A PatchEncoder whose "features" already went through an adapter."""

    def __init__(self, params):
        super().__init__()
        self.adapter = nnx.data({k: nnx.Variable(jnp.asarray(v)) for k, v in params.items()})

    def __call__(self, images):
        out = super().__call__(images)
        params = {k: v[...] for k, v in self.adapter.items()}
        return {**out, "features": adapters.apply_adapter(params, out["features"])}


def test_pair_features_applies_the_adapter_before_the_pca(tmp_path):
    from jaxreg.encoders._base import EncoderSpec, Preprocessing

    path, params = _adapter_file(tmp_path, hidden=4, dims=5)
    rng = np.random.default_rng(3)
    fixed = rng.uniform(size=(20, 24, 9)).astype(np.float32)
    moving = np.roll(fixed, 2, axis=0)
    config = F.FeatureConfig(gap=2, pca_dims=3, adapter=path, layers=("features",))
    choices = {}
    got = F.pair_features(fixed, moving, patch_encoder(), config=config,
                          choices=choices)["features"]
    spec = EncoderSpec(name="patch", config=None, patch_size=4, channels=5,
                       preprocessing=Preprocessing(image_size=32, resize="square"))
    inside = F.SliceEncoder(_AdaptedPatchEncoder(params), spec, layers=("features",), chunk=3)
    want = F.pair_features(fixed, moving, inside,
                           config=F.FeatureConfig(gap=2, pca_dims=3))["features"]
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5)
    plain = F.pair_features(fixed, moving, patch_encoder(),
                            config=F.FeatureConfig(gap=2, pca_dims=3))["features"]
    assert np.abs(np.asarray(plain[0]) - np.asarray(got[0])).max() > 1e-2

    # render="auto" takes the adapter's training render, and says so
    auto = F.FeatureConfig(gap=2, pca_dims=3, adapter=path, render="auto")
    choices = {}
    F.pair_features(fixed, -moving, patch_encoder(), config=auto, choices=choices)
    assert choices == {"render": "intensity", "render_from": "adapter"}


def test_adapter_for_another_encoder_is_refused(tmp_path):
    path, _ = _adapter_file(tmp_path, spec="other")
    img = np.random.default_rng(0).uniform(size=(16, 16, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=f"{path}: an adapter for encoder 'other'"):
        F.pair_features(img, img, patch_encoder(),
                        config=F.FeatureConfig(adapter=path, gap=2))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        F.pair_features(img, img, patch_encoder(),
                        config=F.FeatureConfig(adapter=str(tmp_path / "missing.safetensors")))
    with pytest.raises(ValueError, match="adapter=3"):
        F.FeatureConfig(adapter=3)


def test_adapter_reaches_the_settings_only_when_set():
    from experiments.configs import breast
    from jaxreg import experiment
    from jaxreg.experiment import settings

    c = breast.get_config("litemedsam")
    assert c.features.adapter == ""
    study = experiment.from_configdict(c)
    assert "adapter" not in settings.result_settings(study)["features"]
    c.features.adapter = "/models/a.safetensors"
    study = experiment.from_configdict(c)
    assert study.registration.features.adapter == "/models/a.safetensors"
    assert settings.result_settings(study)["features"]["adapter"] == "/models/a.safetensors"


# ----------------------------------------------------------------------------- training

def _toy_tokens(seed=0, n=3, v=3, th=8, tw=9, c=6):
    """Tokens of a 'contrast' family: half the channels carry the place (the same in
    every image of a slice, plus a little noise), the other half a strong nuisance drawn
    anew for every image (what a contrast changes)."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n, 1, th, tw, c // 2))
    tokens = np.concatenate([signal + 0.05 * rng.normal(size=(n, v, th, tw, c // 2)),
                             3.0 * rng.normal(size=(n, v, th, tw, c - c // 2))], -1)
    tokens = tokens.astype(np.float32)
    grid = np.stack(np.meshgrid(np.arange(th), np.arange(tw), indexing="ij"), -1)
    rc = np.broadcast_to(grid, (n, v, th, tw, 2)).astype(np.float32)
    on = np.ones((n, v, th, tw), bool)
    return tokens, rc, on


def test_training_lowers_the_loss_and_resumes_exactly(tmp_path):
    tokens, rc, on = _toy_tokens()
    config = adapters.AdapterConfig(hidden=8, dims=4, steps=260, pairs=2, anchors=32,
                                    learning_rate=1e-2)
    seen = []
    ck = str(tmp_path / "ck.safetensors")
    whole, losses = adapters._train_map("features", tokens, rc, on, config,
                                        jax.random.key(0), ck,
                                        lambda *a: seen.append(a[1]))
    assert seen == list(range(1, 261))
    assert np.mean(losses[-30:]) < np.mean(losses[:30]) - 0.3
    # the checkpoint of step 250 was written; a run starting from it does the last 10
    info = adapter_io.read_info(ck, kind="checkpoint")
    assert info["step"] == 250 and info["layer"] == "features"
    seen.clear()
    resumed, losses2 = adapters._train_map("features", tokens, rc, on, config,
                                           jax.random.key(0), ck,
                                           lambda *a: seen.append(a[1]))
    assert seen == list(range(251, 261))
    assert losses2 == losses
    for k in whole:
        np.testing.assert_array_equal(np.asarray(whole[k]), np.asarray(resumed[k]))
    # after training the right place is found more often than with the raw tokens
    from benchmarks.diagnose_adapter import nearest_within_one

    loaded = adapters.FeatureAdapter(path="", params={"features": whole}, info={})
    raw = np.mean([nearest_within_one(tokens[i, 0], tokens[i, 1], on[i, 1], places=rc[i, 1])
                   for i in range(3)])
    tuned = np.mean([nearest_within_one(loaded("features", tokens[i, 0]),
                                        loaded("features", tokens[i, 1]), on[i, 1],
                                        places=rc[i, 1]) for i in range(3)])
    assert tuned > raw + 0.1, (raw, tuned)


def test_training_is_seeded(tmp_path):
    tokens, rc, on = _toy_tokens(seed=1)
    config = adapters.AdapterConfig(hidden=0, dims=3, steps=5, pairs=2, anchors=16)
    runs = [adapters._train_map("features", tokens, rc, on, config, jax.random.key(4),
                                str(tmp_path / f"none{i}"), lambda *a: None)[1]
            for i in range(2)]
    assert runs[0] == runs[1]
    other = adapters.AdapterConfig(hidden=0, dims=3, steps=5, pairs=2, anchors=16, seed=1)
    assert adapters._train_map("features", tokens, rc, on, other, jax.random.key(4),
                               str(tmp_path / "none2"), lambda *a: None)[1] != runs[0]


def test_synthetic_slices(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:60, :64, :12]
    r = np.sqrt((z - 30) ** 2 + (y - 32) ** 2)
    brain = (r < 10).astype(np.float32)
    paths = {}
    for name, vol in (("t1", brain * (1 + 0.1 * rng.uniform(size=brain.shape))),
                      ("gm", 255 * brain * (r > 6)), ("wm", 255 * brain * (r <= 6))):
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), paths[name])
    data = synthetic.synthetic_slices(paths, slices=3, variants=3, max_disp=2.0, seed=5)
    assert data.images.shape == (3, 3, 60, 64) and data.fields.shape == (3, 3, 60, 64, 2)
    assert np.all(data.fields[:, 0] == 0) and 0.5 < np.abs(data.fields[:, 1:]).max() <= 2.01
    assert data.images.min() >= 0 and data.images.max() <= 1
    # the head: the brain and its shells (at most 19 pixels thick), not the corners
    assert data.foreground[:, 30, 32].all() and not data.foreground[:, 0, 0].any()
    # contrasts differ between the images of one slice; the seed fixes everything
    assert np.abs(data.images[:, 0] - data.images[:, 1]).mean() > 0.05
    again = synthetic.synthetic_slices(paths, slices=3, variants=3, max_disp=2.0, seed=5)
    np.testing.assert_array_equal(again.images, data.images)
    with pytest.raises(ValueError, match="variants=1"):
        synthetic.synthetic_slices(paths, slices=3, variants=1)
    # the gradient render: the middle slice of a slab's 3D gradient magnitude
    edges = synthetic.synthetic_slices(paths, slices=3, variants=3, max_disp=2.0, seed=5,
                                      render="gradient")
    assert edges.images.shape == data.images.shape
    assert 0 <= edges.images.min() and edges.images.max() <= 1
    assert edges.images[:, 0, 30, 32].max() < 0.2  # flat inside the brain's core
    with pytest.raises(ValueError, match="render='edges'"):
        synthetic.synthetic_slices(paths, slices=3, render="edges")


def test_command_line_reaches_the_config():
    from experiments import finetune

    args = finetune.parse_args(["features", "--out=a.safetensors", "--hidden=0",
                                "--layers=features,stage_3", "--temperature=0.2"])
    assert (args.hidden, args.layers, args.temperature) == (0, ("features", "stage_3"), 0.2)
    assert finetune.main(["features", "--out=a.safetensors", "--steps=0"]) == 2
    args = finetune.parse_args(["segment", "--image=i.nii", "--labels=l.nii", "--label=4",
                                "--out=d.safetensors"])
    assert (args.task, args.label, args.shots) == ("segment", 4, 3)
    with pytest.raises(SystemExit):
        finetune.parse_args(["features"])  # --out is required
