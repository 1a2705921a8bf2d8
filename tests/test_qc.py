"""QC PNG: layout, shape errors, atomic write, and no change to matplotlib's global state."""

import os
import sys

import matplotlib
import matplotlib.image
import numpy as np
import pytest
from scipy import ndimage

from jaxreg import qc

SHAPE = (20, 24, 16)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    fixed = np.zeros(SHAPE, np.float32)
    fixed[6:14, 8:16, 5:11] = 1.0
    fixed += 0.05 * rng.normal(size=SHAPE).astype(np.float32)
    field = ndimage.gaussian_filter(rng.normal(size=SHAPE + (3,)), (3, 3, 3, 0)) * 8.0
    field = field.astype(np.float32)
    moving = np.roll(fixed, 2, axis=0)
    coords = np.indices(SHAPE) + np.moveaxis(field, -1, 0)  # pull, as warping.warp
    warped = ndimage.map_coordinates(moving, coords, order=1, mode="grid-constant")
    return dict(fixed=fixed, moving=moving, warped=warped, field=field)


def _png_shape(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path).shape


def test_writes_png_with_one_more_column_for_features(case, tmp_path):
    plain = qc.save_qc_png(str(tmp_path / "plain.png"), **case, title="pair 0")
    feats = np.random.default_rng(1).normal(size=SHAPE + (2,))
    with_f = qc.save_qc_png(str(tmp_path / "feat.png"), **case, features=feats,
                            slices=(3, 4, 5), spacing=(1.0, 1.0, 2.5))
    assert plain == str(tmp_path / "plain.png")
    (h1, w1, c1), (h2, w2, _) = _png_shape(plain), _png_shape(with_f)
    assert c1 in (3, 4) and w1 > h1
    assert h1 == h2
    # Six panels without features, seven with: one more panel's width.
    assert w2 - w1 == pytest.approx(qc._PANEL_IN * 100, abs=2)
    assert sorted(os.listdir(tmp_path)) == ["feat.png", "plain.png"]  # no temporary left


def test_overwrites_atomically_and_leaves_no_temporary(case, tmp_path):
    path = tmp_path / "qc.png"
    path.write_bytes(b"old")
    qc.save_qc_png(str(path), **case)
    assert _png_shape(str(path))[1] > 0
    assert os.listdir(tmp_path) == ["qc.png"]


@pytest.mark.parametrize("key, bad, message", [
    ("field", np.zeros(SHAPE[:2] + (3, 3), np.float32), "field shape (20, 24, 3, 3)"),
    ("warped", np.zeros((20, 24, 15), np.float32), "warped shape (20, 24, 15)"),
    ("features", np.zeros((20, 24, 15, 3), np.float32), "features shape (20, 24, 15, 3)"),
])
def test_shape_mismatch_raises_naming_shapes(case, tmp_path, key, bad, message):
    with pytest.raises(ValueError) as err:
        qc.save_qc_png(str(tmp_path / "x.png"), **{**case, key: bad})
    assert message in str(err.value) and "(20, 24, 16)" in str(err.value)
    assert os.listdir(tmp_path) == []


def test_global_matplotlib_state_unchanged(case, tmp_path):
    backend = matplotlib.get_backend()
    params = dict(matplotlib.rcParams)
    had_pyplot = "matplotlib.pyplot" in sys.modules
    qc.save_qc_png(str(tmp_path / "qc.png"), **case)
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == params
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules


def test_planes_are_the_full_volume_pictures_cut():
    # Only the three planes are scaled and drawn; they equal the planes of the whole
    # volumes scaled by their whole-volume percentiles (the picture before the change).
    rng = np.random.default_rng(2)
    vols = {k: rng.normal(size=SHAPE).astype(np.float32) for k in ("fixed", "moving", "warped")}
    field = (0.3 * rng.normal(size=SHAPE + (3,))).astype(np.float32)
    slices = (3, 20, 9)
    columns = qc._columns(vols["fixed"], vols["moving"], vols["warped"], field, None, slices)

    def robust(x):
        a, b = np.percentile(x, [1.0, 99.0])
        return np.clip((x - a) / max(b - a, 1e-12), 0.0, 1.0)

    tiles = (np.indices(SHAPE) // qc._TILE).sum(axis=0) % 2 == 0
    whole = {"fixed": robust(vols["fixed"]), "moving": robust(vols["moving"]),
             "warped": robust(vols["warped"]),
             "checkerboard": np.where(tiles, robust(vols["fixed"]), robust(vols["warped"])),
             "|warped - fixed|": np.abs(vols["warped"] - vols["fixed"])}
    for name, planes, _ in columns:
        if name in whole:
            for axis in range(3):
                np.testing.assert_allclose(planes[axis],
                                           qc._plane(whole[name], axis, slices[axis]),
                                           rtol=1e-6, err_msg=name)
    assert "matplotlib.figure" in sys.modules  # (this test module imports matplotlib)


def test_importing_jaxreg_does_not_import_matplotlib():
    import subprocess

    code = ("import jaxreg, jaxreg.qc, experiments.breast, sys; "
            "print('matplotlib' in sys.modules, 'flax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", errors="replace",
                         check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    # Neither the picture's matplotlib nor the encoders' flax loads for a MIND-SSC run.
    assert out.stdout.strip() == "False False"


def test_given_jacobian_draws_the_same_picture(case, tmp_path):
    from jaxreg import metrics

    det, _ = metrics.jacobian_summary(case["field"])
    own = qc.save_qc_png(str(tmp_path / "own.png"), **case)
    given = qc.save_qc_png(str(tmp_path / "given.png"), **case, jacobian=det)
    np.testing.assert_allclose(matplotlib.image.imread(given), matplotlib.image.imread(own),
                               atol=1.5 / 255)
    with pytest.raises(ValueError, match="jacobian"):
        qc.save_qc_png(str(tmp_path / "bad.png"), **case, jacobian=det[:-1])
