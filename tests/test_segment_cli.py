"""experiments.segment end to end on a synthetic volume in a tmp folder (a tiny random-weight
model stands in for LiteMedSAM): segmentation mode writes a uint8 NIfTI with the image's
affine, evaluation mode prints and saves Dice / IoU; bad inputs fail naming the file."""

import json

import numpy as np
import pytest
from absl import flags

import jaxreg.segment
from experiments import segment as cli
from jaxreg import io

nib = pytest.importorskip("nibabel")


@pytest.fixture()
def files(tmp_path):
    vol = np.random.default_rng(0).normal(0.1, 0.05, (20, 24, 8)).astype(np.float32)
    labels = np.zeros(vol.shape, np.int16)
    labels[4:12, 5:15, 2:6] = 3
    labels[13:18, 16:22, 1:7] = 7
    vol[labels > 0] += 1.0
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-10, 5, 3]
    io.save_volume(tmp_path / "img.nii.gz", vol, affine)
    io.save_volume(tmp_path / "lab.nii.gz", labels, affine)
    return tmp_path, affine


def _run(*argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["segment", *argv])
    cli.run()


def test_segment_and_evaluate(files, tiny_segmenter, monkeypatch, capsys):
    tmp, affine = files
    models = []
    monkeypatch.setattr(jaxreg.segment, "load_segmenter",
                        lambda name, **_: models.append(name) or tiny_segmenter)
    out = tmp / "mask.nii.gz"
    _run(f"--image={tmp / 'img.nii.gz'}", "--box=4,5,2,12,15,6", f"--out={out}",
         "--model=mobilesam")
    assert models == ["mobilesam"]
    img = nib.load(out)
    mask = np.asarray(img.dataobj)
    assert img.get_data_dtype() == np.uint8 and mask.shape == (20, 24, 8)
    np.testing.assert_allclose(img.affine, affine)
    assert set(np.unique(mask)) <= {0, 1} and not mask[..., :2].any() and not mask[..., 6:].any()
    _run(f"--image={tmp / 'img.nii.gz'}", f"--labels={tmp / 'lab.nii.gz'}",
         f"--json={tmp / 's.json'}", f"--out={tmp / 'pred.nii.gz'}")
    printed = capsys.readouterr().out
    assert "label    3" in printed and "label    7" in printed and "mean over 2" in printed
    report = json.loads((tmp / "s.json").read_text())
    assert set(report["structures"]) == {"3", "7"}
    assert report["structures"]["3"]["box"] == [4, 5, 2, 12, 15, 6]
    for s in report["structures"].values():
        assert 0.0 <= s["dice"] <= 1.0 and 0.0 <= s["iou"] <= s["dice"] + 1e-9
    pred = np.asarray(nib.load(tmp / "pred.nii.gz").dataobj)
    assert set(np.unique(pred)) <= {0, 3, 7}


def test_scores_and_boxes():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[:2], b[1:3] = True, True
    s = cli.scores(a, b)
    assert s["dice"] == pytest.approx(0.5) and s["iou"] == pytest.approx(1 / 3)
    labels = np.zeros((5, 6, 7), np.int16)
    labels[1:3, 2:5, 4] = 2
    assert cli.label_box(labels, 2) == (1, 2, 4, 3, 5, 5)


@pytest.mark.parametrize("args, match", [
    (["--box=1,2,3", "--out=x.nii.gz"], "expected 6 integers"),
    (["--box=0,0,0,21,5,5", "--out=x.nii.gz"], "outside the image .*img.nii.gz"),
    (["--box=0,0,5,3,3,5", "--out=x.nii.gz"], "empty or outside"),
    (["--box=0,0,0,3,3,3"], "give --box and --out"),
    (["--labels=MISSING", "--structures=3"], "MISSING"),
    (["--labels=LAB", "--structures=3,4"], r"lab.nii.gz: labels \[4\] are not in"),
])
def test_bad_inputs(files, tiny_segmenter, monkeypatch, args, match):
    tmp, _ = files
    monkeypatch.setattr(jaxreg.segment, "load_segmenter", lambda name, **_: tiny_segmenter)
    args = [a.replace("MISSING", str(tmp / "nope.nii.gz")).replace("LAB", str(tmp / "lab.nii.gz"))
            for a in args]
    with pytest.raises(ValueError, match=match):
        _run(f"--image={tmp / 'img.nii.gz'}", *args)


def test_missing_image(tmp_path):
    with pytest.raises(io.InputError, match="nope.nii.gz"):
        _run(f"--image={tmp_path / 'nope.nii.gz'}", "--box=0,0,0,1,1,1", "--out=x.nii.gz")
