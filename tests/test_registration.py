"""jaxreg.register and the jaxreg command: one call and one command per pair, the same field
as the study, files that ANTs applies, DICOM folders in."""

import json
import os

import numpy as np
import pytest

import jaxreg
from experiments.configs import breast
from jaxreg import cli, experiment, io, registration
from jaxreg.experiment import pairs as pairs_lib
from jaxreg.transform import Transform

FEW = ("--set", "solver.iterations=20")


@pytest.mark.parametrize("method", registration.METHODS)
def test_library_defaults_are_the_cli_defaults(method):
    from_cli = experiment.from_configdict(breast.get_config(method)).registration
    assert from_cli == registration.default_config(method)
    with_affine = breast.get_config(method)
    with_affine.affine = "rigid"
    assert experiment.from_configdict(with_affine).registration == registration.default_config(
        method, affine="rigid")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    pairs_lib.write_phantom_pairs(str(folder), tasks=("date",), shape=(48, 40, 32))
    return folder


def test_register_gives_the_studys_field(data, tmp_path):
    c = breast.get_config("mind")
    c.data_dir, c.solver.iterations, c.qc = str(data), 20, False
    c.batch.devices = "1"  # one pair at a time
    rows, failures = experiment.run_study(c, str(tmp_path / "run"), progress=False)
    assert failures == []
    out = tmp_path / "run" / "pairs" / rows[0]["pair"]
    study_field = io.load_field(out / "field_voxels.nii.gz")
    config = experiment.from_configdict(c).registration
    t = jaxreg.register(str(data / "date_fixed.nii.gz"), str(data / "date_moving.nii.gz"),
                        config=config)
    np.testing.assert_allclose(t.field, study_field, atol=1e-5)
    # The study also writes the transform for ANTs; it loads back to the same field.
    np.testing.assert_allclose(Transform.load(out / "warp.nii.gz").field, study_field, atol=1e-4)
    # Arrays (identity affine) and register_mind give the same too: one way to register.
    fixed, moving = (io.load_volume(data / f"date_{k}.nii.gz") for k in ("fixed", "moving"))
    from_arrays = jaxreg.register(fixed.data, moving.data, config=config)
    np.testing.assert_allclose(from_arrays.field, study_field, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jaxreg.register_mind(fixed.data, moving.data,
                                                               config=config.solver)),
                               study_field, atol=1e-5)


def test_register_refuses_unclear_calls(data):
    fixed = str(data / "date_fixed.nii.gz")
    with pytest.raises(ValueError, match="method='nope': choose from mind, "):
        jaxreg.register(fixed, fixed, method="nope")
    with pytest.raises(ValueError, match="either config or method"):
        jaxreg.register(fixed, fixed, config=registration.default_config(), affine="rigid")
    with pytest.raises(ValueError, match=r"moving array must have the fixed shape"):
        jaxreg.register(np.ones((8, 8, 8)), np.ones((8, 8, 9)))
    with pytest.raises(ValueError, match=r"moving_mask \(8, 8, 9\) is not its image's grid"):
        jaxreg.register(np.ones((8, 8, 8)), np.ones((8, 8, 8)), moving_mask=np.ones((8, 8, 9)))
    with pytest.raises(io.InputError, match="absent.nii.gz"):
        jaxreg.register(fixed, str(data / "absent.nii.gz"))


def test_override_sets_nested_fields_and_names_unknown_ones():
    config = registration.default_config("litemedsam")
    changed = cli.override(cli.override(config, "solver.iterations=7"), "features.axes=[0, 1]")
    assert changed.solver.iterations == 7 and changed.features.axes == (0, 1)
    assert cli.override(config, "weights=/w/a.pth").weights == "/w/a.pth"
    with pytest.raises(registration.ConfigError, match="no field 'gapp' \\(fields: axes"):
        cli.override(config, "features.gapp=2")
    with pytest.raises(registration.ConfigError, match="solver.iterations=-1: .*iterations "
                                                       "must be an integer >= 0"):
        cli.override(config, "solver.iterations=-1")


def _dicom_folder(nifti, folder):
    """The volume written as a DICOM series (int16, its geometry in the tags)."""
    from test_dicom import _write_series  # tests/ is on sys.path under pytest

    vol = io.load_volume(nifti)
    _write_series(str(folder), np.round(vol.data * 1000).astype(np.int16), vol.affine)
    return str(folder)


def test_two_commands_from_dicom_folders_to_a_transform_ants_applies(data, tmp_path, capsys):
    ants = pytest.importorskip("ants")
    fixed = _dicom_folder(data / "date_fixed.nii.gz", tmp_path / "fixed_dicom")
    moving = _dicom_folder(data / "date_moving.nii.gz", tmp_path / "moving_dicom")
    np.testing.assert_allclose(io.load_volume(fixed).affine,
                               io.load_volume(data / "date_fixed.nii.gz").affine, atol=1e-4)
    points = tmp_path / "fixed.fcsv"
    centres = np.array([[10.0, 12.0, 8.0], [20.0, 15.0, 12.0], [30.0, 22.0, 16.0]])
    aff = io.load_volume(fixed).affine
    jaxreg.write_points(points, centres @ aff[:3, :3].T + aff[:3, 3])
    out = tmp_path / "out"
    code = cli.main(["register", fixed, moving, "-o", str(out), "--affine", "rigid",
                     "--fixed-mask", str(data / "date_fixed_breast.nii.gz"),
                     "--moving-mask", str(data / "date_moving_breast.nii.gz"),
                     "--fixed-points", str(points), "--moving-points", str(points), *FEW])
    assert code == 0, capsys.readouterr().err
    names = sorted(os.listdir(out))
    for name in ("warp.nii.gz", "inverse_warp.nii.gz", "affine.mat", "deformable_warp.nii.gz",
                 "warped.nii.gz", "qc.png", "metrics.json"):
        assert name in names
    row = json.loads((out / "metrics.json").read_text())
    assert row["mask_after_dice_1"] > row["mask_before_dice_1"]
    assert row["tre_mm_before"] == 0.0 and row["tre_mm"] > 0.0  # the same points: TRE = motion
    assert row["inverse_consistency_mm_mean"] < 0.2
    # ANTs applies the warp as `jaxreg apply` does (second command).
    assert cli.main(["apply", str(out / "warp.nii.gz"), moving, "-o",
                     str(tmp_path / "warped.nii.gz")]) == 0
    ours = io.load_volume(tmp_path / "warped.nii.gz").data
    np.testing.assert_allclose(ours, io.load_volume(out / "warped.nii.gz").data, atol=1e-3)
    ants_moving = ants.image_read(str(data / "date_moving.nii.gz"))
    ants_fixed = ants.image_read(str(data / "date_fixed.nii.gz"))
    theirs = ants.apply_transforms(ants_fixed, ants_moving, [str(out / "warp.nii.gz")]).numpy()
    inside = np.zeros(ours.shape, bool)
    inside[4:-4, 4:-4, 4:-4] = True
    assert np.abs(theirs * 1000 - ours)[inside].max() < 1.0  # int16 DICOM of values * 1000


def test_cli_errors_are_one_line_and_write_nothing(data, tmp_path, capsys):
    fixed = str(data / "date_fixed.nii.gz")
    out = tmp_path / "out"
    assert cli.main(["register", fixed, str(data / "absent.nii.gz"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "absent.nii.gz: file not found" in err
    assert err.count("\n") == 1 and not out.exists()
    assert cli.main(["register", fixed, fixed, "-o", str(out), "--set", "solver.lr=3"]) == 2
    assert "no field 'lr'" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli.main(["register", fixed, fixed, "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert cli.main(["apply", fixed, fixed, "-o", str(tmp_path / "w.nii.gz")]) == 2
    assert "not a displacement field" in capsys.readouterr().err


def test_cli_apply_invert_points_match_the_library(data, tmp_path):
    fixed, moving = (str(data / f"date_{k}.nii.gz") for k in ("fixed", "moving"))
    out = tmp_path / "out"
    assert cli.main(["register", fixed, moving, "-o", str(out), "--no-qc", *FEW]) == 0
    assert not (out / "qc.png").exists()
    t = Transform.load(out / "warp.nii.gz")
    labels = str(data / "date_moving_fgt.nii.gz")
    assert cli.main(["apply", str(out / "warp.nii.gz"), labels, "-o",
                     str(tmp_path / "fgt.nii.gz"), "--labels"]) == 0
    np.testing.assert_array_equal(io.load_labels(tmp_path / "fgt.nii.gz").data,
                                  t.apply(labels, labels=True).data)
    assert cli.main(["invert", str(out / "warp.nii.gz"), "-o", str(tmp_path / "inv.nii.gz"),
                     "--reference", moving]) == 0
    np.testing.assert_allclose(Transform.load(tmp_path / "inv.nii.gz").field,
                               t.inverse(io.load_volume(moving)).field, atol=1e-4)
    pts = t.affine[:3, :3] @ np.array([[20.0, 18.0, 14.0]]).T + t.affine[:3, 3:]
    jaxreg.write_points(tmp_path / "p.mrk.json", pts.T)
    assert cli.main(["points", str(out / "warp.nii.gz"), str(tmp_path / "p.mrk.json"), "-o",
                     str(tmp_path / "q.csv")]) == 0
    np.testing.assert_allclose(jaxreg.read_points(tmp_path / "q.csv").ras, t.map_points(pts.T),
                               atol=1e-6)


@pytest.mark.parametrize("code,status,err", [
    (None, 0, ""), (3, 3, ""), ("error: x.nii: bad", 1, "error: x.nii: bad")])
def test_exit_now_keeps_sys_exit_meaning(code, status, err):
    """The commands end through cli.exit_now (no XLA teardown): the same status and
    messages as sys.exit, output flushed, jax's work done."""
    import subprocess
    import sys

    script = ("import jax.numpy as jnp; from jaxreg import cli; "
              "print('sum', float(jnp.arange(4.0).sum()), end=''); "
              f"cli.exit_now({code!r})")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == status
    assert done.stdout == "sum 6.0"  # flushed although no newline ended it
    assert done.stderr.strip().endswith(err)
