"""jaxreg.finetune.segment: the training slices and boxes, tuning a tiny random-weight model
(the loss falls, only the chosen part changes, the seed decides), the file's round trip
and refusals, ``--decoder`` in both segment commands, and LiteMedSAM's real decoder tuned
on one slice of a synthetic structure it misses zero-shot (skipped without its weights)."""

import jax
import numpy as np
import pytest
from absl import flags

from jaxreg.finetune import _decoder_parts as parts
from jaxreg.finetune import io as adapter_io
from jaxreg.finetune import segment as fs
from jaxreg.segment import predict


def _structure(shape=(40, 44, 7), seed=0):  # tiny-model tests use shots=2: one program
    """A bright disc (radius 11) on a noisy background; the label is its ring (the disc
    minus its inner radius-6 core, which is a little darker): a box around the disc
    prompts the whole disc, so the pretrained decoder misses the hole."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(0.2, 0.03, shape).astype(np.float32)
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, bool)
    for z in range(shape[2]):
        r = np.hypot(rr - 20 - 0.5 * (z - 3), cc - 22)
        disc, core = r <= 11 - 0.6 * abs(z - 3), r <= 6 - 0.3 * abs(z - 3)
        vol[..., z][disc] += 0.7
        vol[..., z][core] -= 0.25
        mask[..., z] = disc & ~core
    return vol, mask


def test_choose_slices():
    m = np.zeros((4, 4, 30), bool)
    m[1:3, 1:3, 5:15] = True  # slices 5..14
    assert fs.choose_slices(m, 1) == [9]  # segment_3d's key slice (5 + 15 - 1) // 2
    assert fs.choose_slices(m, 2) == [7, 12]
    assert fs.choose_slices(m, 3) == [6, 9, 12]
    assert fs.choose_slices(m, 10) == list(range(5, 15))
    assert fs.choose_slices(m, 30) == list(range(5, 15))  # repeats dropped
    m[..., 9] = False  # a gap: the nearest slice with voxels
    assert fs.choose_slices(m, 1) == [8]
    assert fs.choose_slices(np.moveaxis(m, -1, 0), 3, axis=0) == fs.choose_slices(m, 3)
    with pytest.raises(ValueError, match="empty"):
        fs.choose_slices(np.zeros((3, 3, 3), bool), 1)
    with pytest.raises(ValueError, match="at least 1"):
        fs.choose_slices(m, 0)


def test_training_boxes():
    m = np.zeros((64, 128), bool)
    m[10:20, 30:50] = True
    boxes = fs.training_boxes(m, (5, 25, 30, 60), rng=np.random.default_rng(0))
    grow = 3.0 * 128 / 256
    np.testing.assert_allclose(boxes[0], [10 - grow, 30 - grow, 20 + grow, 50 + grow])
    np.testing.assert_allclose(boxes[1], [5, 25, 30, 60])
    assert boxes.shape == (fs.BOXES, 4) and len({tuple(b) for b in boxes}) == fs.BOXES
    assert np.all(np.abs(boxes[2:] - boxes[0]) <= 4.0 * 128 / 256 + 1e-5)
    assert np.all(boxes >= 0) and np.all(boxes[:, 2] <= 64) and np.all(boxes[:, 3] <= 128)
    again = fs.training_boxes(m, (5, 25, 30, 60), rng=np.random.default_rng(0))
    np.testing.assert_array_equal(boxes, again)


def test_decoder_halves_match_the_mask_decoder(tiny_segmenter):
    """The training's split forward (transformer, then upscaling and hypernetwork) is the
    mask decoder's single-mask output."""
    heads = tiny_segmenter.heads
    emb = jax.random.normal(jax.random.key(0), (2, 16, 16, 32))
    boxes = np.array([[5.0, 6.0, 30.0, 40.0], [10.0, 2.0, 50.0, 20.0]], np.float32)

    def whole(e, b):
        sparse, dense = heads.prompt_encoder(boxes=b)
        return heads.mask_decoder(e, heads.prompt_encoder.dense_pe(), sparse, dense,
                                  multimask_output=False)[0]

    ref = jax.jit(whole)(emb, boxes)
    # "output" runs every piece (the others only move where the upscaling or the
    # transformer runs: before training or in each step); one compilation keeps it quick
    split = jax.jit(lambda e, b: parts.logits(heads, "output", parts.features(heads, "output", e, b)))
    np.testing.assert_allclose(np.asarray(split(emb, boxes)), np.asarray(ref[:, 0]), atol=1e-4)


def test_trainable_parts(tiny_segmenter):
    parts = {p: set(adapter_io.flatten(fs._pure(tiny_segmenter.heads, p)))
             for p in fs.TRAINABLE}
    hyper = {k for k in parts["decoder"]
             if k.startswith("mask_decoder/output_hypernetworks_mlps/0/")}
    upscaling = {k for k in parts["decoder"] if k.startswith("mask_decoder/output_upscaling/")}
    assert len(hyper) == 6 and len(upscaling) == 6  # 3 Linear; 2 convolutions and a norm
    assert parts["hypernetwork"] == hyper and parts["output"] == hyper | upscaling
    assert all(k.startswith("mask_decoder/") for k in parts["decoder"])
    assert any("transformer" in k for k in parts["decoder"])
    with pytest.raises(ValueError, match="trainable='encoder'"):
        fs._filter("encoder")


@pytest.mark.parametrize("part", ["hypernetwork"])  # the default; "decoder": 20 s more
def test_training_lowers_loss_and_changes_only_its_part(tiny_segmenter, part):
    vol, mask = _structure()
    params, info = fs.finetune_decoder(tiny_segmenter, vol, mask, shots=2, steps=30,
                                       learning_rate=1e-2, trainable=part, normalise=True)
    assert info["loss_final"] < 0.9 * info["loss_first"], info
    assert info["slices"] == fs.choose_slices(mask, 2) and info["shots"] == 2
    assert info["model"] == "tiny" and info["trainable"] == part
    flat = adapter_io.flatten(params)
    before = adapter_io.flatten(fs._pure(tiny_segmenter.heads, part))
    assert set(before) == set(flat)
    assert any(not np.allclose(before[k], flat[k]) for k in flat)


def test_seed_makes_training_deterministic(tiny_segmenter):
    vol, mask = _structure()
    run = lambda seed: adapter_io.flatten(fs.finetune_decoder(  # noqa: E731
        tiny_segmenter, vol, mask, shots=2, steps=4, seed=seed, normalise=True)[0])
    a, b, c = run(0), run(0), run(1)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_save_load_round_trip_and_refusals(tiny_segmenter, tmp_path):
    vol, mask = _structure()
    params, info = fs.finetune_decoder(tiny_segmenter, vol, mask, shots=2, steps=5,
                                       learning_rate=3e-3, normalise=True)
    path = tmp_path / "dec.safetensors"
    fs.save_decoder(path, params, dict(info, label=5))
    stored = adapter_io.read_info(path, kind="mask_decoder")
    for key in ("model", "shots", "slices", "steps", "learning_rate", "seed", "label"):
        assert stored[key] == dict(info, label=5)[key], key
    tuned, loaded = fs.tuned_segmenter(tiny_segmenter, params), fs.load_decoder(path,
                                                                              tiny_segmenter)
    emb = tiny_segmenter.encode(predict.normalise_intensity(vol[..., 3])[None])[0]
    box = predict.mask_box(mask[..., 3])
    a, _ = tuned.decode(emb, vol.shape[:2], box=box)
    b, _ = loaded.decode(emb, vol.shape[:2], box=box)
    c, _ = tiny_segmenter.decode(emb, vol.shape[:2], box=box)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))  # the original is untouched
    c2, _ = tiny_segmenter.with_heads(tiny_segmenter.heads).decode(emb, vol.shape[:2], box=box)
    np.testing.assert_array_equal(np.asarray(c), np.asarray(c2))

    other = tmp_path / "other_model.safetensors"
    fs.save_decoder(other, params, dict(info, model="litemedsam"))
    with pytest.raises(ValueError, match=r"other_model\.safetensors.*'litemedsam'.*'tiny'"):
        fs.load_decoder(other, tiny_segmenter)
    kind = tmp_path / "adapter.safetensors"
    adapter_io.save(kind, params, kind="feature_adapter", info=info)
    with pytest.raises(ValueError, match=r"adapter\.safetensors: holds a feature_adapter"):
        fs.load_decoder(kind, tiny_segmenter)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        fs.load_decoder(tmp_path / "nope.safetensors", tiny_segmenter)
    with pytest.raises(ValueError, match="must name the model"):
        fs.save_decoder(tmp_path / "x.safetensors", params, {"shots": 1})


def test_decoder_flag_reaches_the_settings(tiny_segmenter, tmp_path, monkeypatch):
    """``--decoder`` in both commands becomes SegmentSettings.decoder; the segment
    command then uses the tuned heads, and a wrong file is an InputError naming it."""
    import dataclasses

    from experiments import segment as exp_segment
    from jaxreg import cli as jaxreg_cli
    from jaxreg import io
    from jaxreg.segment import run

    assert "decoder" in {f.name for f in dataclasses.fields(run.SegmentSettings)}
    assert run.SegmentSettings(image="x").decoder == ""
    args = jaxreg_cli._parser().parse_args(["segment", "--decoder=d.safetensors"])
    assert args.decoder == "d.safetensors"
    seen = []
    monkeypatch.setattr(run, "segment_files", lambda s, **_: seen.append(s) or {})
    monkeypatch.setattr(run, "prepare_process", lambda *_: {})
    assert jaxreg_cli.main(["segment", "--image=i.nii.gz", "--decoder=d.safetensors"]) == 0
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["segment", "--image=i.nii.gz", "--decoder=e.safetensors"])
    try:
        assert exp_segment.settings().decoder == "e.safetensors"
    finally:
        flags.FLAGS.unparse_flags()
    assert seen[0].decoder == "d.safetensors"
    monkeypatch.undo()

    vol, mask = _structure()
    io.save_volume(tmp_path / "img.nii.gz", vol, np.eye(4))
    io.save_volume(tmp_path / "lab.nii.gz", mask.astype(np.int16) * 4, np.eye(4))
    monkeypatch.setattr(predict, "load_segmenter", lambda name, **_: tiny_segmenter)
    summary = fs.finetune_files(str(tmp_path / "img.nii.gz"), str(tmp_path / "lab.nii.gz"), 4,
                                out=str(tmp_path / "d.safetensors"), shots=2, steps=20,
                                learning_rate=3e-3, segmenter=tiny_segmenter)
    assert summary["slices"] == fs.choose_slices(mask, 2)
    assert summary["loss_final"] < summary["loss_first"]
    assert adapter_io.read_info(tmp_path / "d.safetensors")["label"] == 4
    used, real = [], fs.load_decoder
    monkeypatch.setattr(fs, "load_decoder", lambda path, seg: used.append(path) or real(path, seg))
    settings = run.SegmentSettings(image=str(tmp_path / "img.nii.gz"),
                                   labels=str(tmp_path / "lab.nii.gz"), model="mobilesam",
                                   decoder=str(tmp_path / "d.safetensors"))
    run.segment_files(settings, echo=lambda _: None)
    assert used == [settings.decoder]
    monkeypatch.undo()
    monkeypatch.setattr(predict, "load_segmenter", lambda name, **_: tiny_segmenter)
    bad = dataclasses.replace(settings, decoder=str(tmp_path / "missing.safetensors"))
    with pytest.raises(io.InputError, match="missing.safetensors"):
        run.segment_files(bad, echo=lambda _: None)


@pytest.fixture(scope="module")
def litemedsam():
    from jaxreg.encoders.checkpoint import CheckpointError

    try:
        return predict.load_segmenter("litemedsam")
    except CheckpointError as e:
        pytest.skip(f"LiteMedSAM weights not installed: {e}")


def test_litemedsam_one_shot_beats_zero_shot(litemedsam):
    """Tuned on the middle slice of a ring, the real decoder segments the other slices of
    the ring better than zero-shot (which fills the hole) from the same box."""
    vol, mask = _structure()
    vol = predict.normalise_intensity(vol)
    cache = {}
    params, info = fs.finetune_decoder(litemedsam, vol, mask, shots=1, steps=40,
                                       embeddings=cache)
    assert info["slices"] == [3] and info["loss_final"] < 0.5 * info["loss_first"]
    tuned = fs.tuned_segmenter(litemedsam, params)
    dice = {}
    for name, seg in (("zero", litemedsam), ("tuned", tuned)):
        d = []
        for z in (1, 5):  # held out
            if z not in cache:
                cache[z] = seg.encode(vol[..., z][None])[0]
            b = predict.mask_box(mask[..., z])
            logits, _ = seg.decode(cache[z], vol.shape[:2], box=(b[0] - 1, b[1] - 1,
                                                                 b[2] + 1, b[3] + 1))
            p, t = np.asarray(logits) > 0, mask[..., z]
            d.append(2 * (p & t).sum() / (p.sum() + t.sum()))
        dice[name] = float(np.mean(d))
    assert dice["tuned"] > dice["zero"] + 0.1, dice
