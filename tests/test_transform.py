"""jaxreg.transform: applying, inverting and saving a registration, and what ANTs and ITK
make of the saved files, on an oblique, anisotropic pair stored in LPS orientation."""

import json

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from jaxreg import io, metrics
from jaxreg.transform import Transform, inverse_consistency

FIXED_SHAPE, MOVING_SHAPE = (40, 44, 24), (44, 48, 24)


def _lps_affine(rotvec, spacing, origin):
    """Voxel axes running left, posterior, superior (LPS storage), rotated (oblique)."""
    a = np.eye(4)
    a[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ Rotation.from_rotvec(rotvec).as_matrix() \
        @ np.diag(spacing)
    a[:3, 3] = origin
    return a


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Fixed and moving grids that differ in shape, spacing and obliquity; a moving image
    and label map; a transform with an affine stage and a smooth 2-voxel deformable one."""
    folder = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(0)
    fixed_affine = _lps_affine([0.2, 0.25, 0.1], [1.2, 0.9, 2.0], [30.0, 20.0, -10.0])
    moving_affine = _lps_affine([0.1, -0.15, 0.2], [1.0, 1.1, 2.2], [28.0, 24.0, -12.0])
    image = ndimage.gaussian_filter(rng.standard_normal(MOVING_SHAPE), 2.5)
    image = ((image - image.min()) / np.ptp(image)).astype(np.float32)
    labels = ((image > 0.5).astype(np.int16) + (image > 0.65)).astype(np.int16)
    fixed = ndimage.gaussian_filter(rng.standard_normal(FIXED_SHAPE), 2.5).astype(np.float32)
    paths = {k: str(folder / f"{k}.nii.gz") for k in ("fixed", "moving", "labels")}
    io.save_volume(paths["fixed"], fixed, fixed_affine)
    io.save_volume(paths["moving"], image, moving_affine)
    io.save_volume(paths["labels"], labels, moving_affine)
    u = np.stack([ndimage.gaussian_filter(rng.standard_normal(FIXED_SHAPE), 5) for _ in "xyz"],
                 -1)
    u *= 2.0 / np.abs(u).max()
    pre = np.eye(4)
    pre[:3, :3] = Rotation.from_rotvec([0.03, -0.02, 0.05]).as_matrix()
    pre[:3, 3] = [1.5, -2.0, 1.0]
    t = Transform.from_stages(u, fixed_affine, pre)
    inv = t.inverse(io.load_volume(paths["moving"]))
    files = t.export(folder / "out", inverse=inv)
    return dict(paths=paths, t=t, inv=inv, files=files, u=u, pre=pre)


def _inside_moving(t, moving_affine, margin=1):
    """Fixed voxels whose moving position is a voxel inside the moving grid (there ITK's
    linear interpolation and jaxreg's agree; at the border ITK reads the default)."""
    from jaxreg.transform import _positions

    pos = np.asarray(_positions(t.field, np.linalg.inv(moving_affine) @ t.affine))
    return np.all((pos >= margin) & (pos <= np.array(MOVING_SHAPE) - 1 - margin), -1)


def _grid_points(t, step=7):
    vox = np.stack(np.meshgrid(*[np.arange(3, s - 3, step) for s in t.shape], indexing="ij"),
                   -1).reshape(-1, 3)
    return vox @ t.affine[:3, :3].T + t.affine[:3, 3]


def test_stages_compose_exactly_and_split_back(pair):
    t, u, pre = pair["t"], pair["u"], pair["pre"]
    np.testing.assert_array_equal(t.deformable, u.astype(np.float32))  # kept by from_stages
    rebuilt = Transform(t.field, t.affine, t.prealignment)  # as Transform.load gives it
    np.testing.assert_allclose(rebuilt.deformable, u, atol=2e-4)  # computed back
    # One fixed voxel by hand: world of x + u(x), through the prealignment.
    x = np.array([5, 7, 3])
    want = pre @ t.affine @ np.append(x + u[tuple(x)], 1.0)
    got = t.affine @ np.append(x + t.field[tuple(x)], 1.0)
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert Transform(u, t.affine).deformable is not None
    np.testing.assert_array_equal(Transform(u, t.affine).deformable, u.astype(np.float32))


def test_ants_applies_the_saved_warp_as_jaxreg_does(pair):
    ants = pytest.importorskip("ants")
    paths, t, files = pair["paths"], pair["t"], pair["files"]
    fixed, moving = ants.image_read(paths["fixed"]), ants.image_read(paths["moving"])
    moving_vol = io.load_volume(paths["moving"])
    ours = t.apply(moving_vol).data
    inside = _inside_moving(t, moving_vol.affine)
    assert inside.mean() > 0.5
    # The field alone, and the two stages in ANTs' order (deformable, then affine).
    for transforms in ([files["warp"]], [files["deformable"], files["affine"]]):
        theirs = ants.apply_transforms(fixed, moving, transforms, interpolator="linear").numpy()
        print(f"ANTs image, {len(transforms)} file(s): max difference "
              f"{np.abs(theirs - ours)[inside].max():.1e}")  # pytest -s (BUILD.md)
        np.testing.assert_allclose(theirs[inside], ours[inside], atol=1e-5, err_msg=transforms)
    swapped = ants.apply_transforms(fixed, moving, [files["affine"], files["deformable"]],
                                    interpolator="linear").numpy()
    assert np.abs(swapped - ours)[inside].max() > 0.05  # the order matters, and is right
    labels = ants.image_read(paths["labels"])
    theirs = ants.apply_transforms(fixed, labels, [files["warp"]],
                                   interpolator="nearestNeighbor").numpy().astype(np.int16)
    ours_labels = t.apply(paths["labels"], labels=True).data
    assert ours_labels.dtype == np.int16
    print(f"ANTs labels: Dice {metrics.dice(theirs, ours_labels)}")
    for label, d in metrics.dice(theirs, ours_labels).items():
        assert d >= 0.99, (label, d)


def test_ants_and_simpleitk_map_points_as_jaxreg_does(pair):
    ants = pytest.importorskip("ants")
    sitk = pytest.importorskip("SimpleITK")
    import pandas as pd

    t, files = pair["t"], pair["files"]
    lps = _grid_points(t) * [-1.0, -1.0, 1.0]
    ours = t.map_points(lps, space="lps")
    np.testing.assert_allclose(ours * [-1, -1, 1], t.map_points(lps * [-1, -1, 1]), atol=1e-9)
    for transforms in ([files["warp"]], [files["deformable"], files["affine"]]):
        theirs = ants.apply_transforms_to_points(
            3, pd.DataFrame(lps, columns=["x", "y", "z"]), transforms).values
        print(f"ANTs points, {len(transforms)} file(s): max difference "
              f"{np.abs(theirs - ours).max():.1e} mm")
        assert np.abs(theirs - ours).max() < 0.05, transforms
    field = sitk.DisplacementFieldTransform(sitk.ReadImage(files["warp"], sitk.sitkVectorFloat64))
    theirs = np.array([field.TransformPoint(tuple(p)) for p in lps])
    print(f"SimpleITK points: max difference {np.abs(theirs - ours).max():.1e} mm")
    assert np.abs(theirs - ours).max() < 0.05


def test_simpleitk_resamples_with_the_saved_warp_as_jaxreg_does(pair):
    sitk = pytest.importorskip("SimpleITK")
    paths, t, files = pair["paths"], pair["t"], pair["files"]
    field = sitk.DisplacementFieldTransform(sitk.ReadImage(files["warp"], sitk.sitkVectorFloat64))
    moving_vol = io.load_volume(paths["moving"])
    out = sitk.Resample(sitk.ReadImage(paths["moving"]), sitk.ReadImage(paths["fixed"]), field,
                        sitk.sitkLinear, 0.0)
    theirs = sitk.GetArrayFromImage(out).transpose(2, 1, 0)
    inside = _inside_moving(t, moving_vol.affine)
    ours = t.apply(moving_vol).data
    print(f"SimpleITK image: max difference {np.abs(theirs - ours)[inside].max():.1e}")
    np.testing.assert_allclose(theirs[inside], ours[inside], atol=1e-5)
    labels = sitk.Resample(sitk.ReadImage(paths["labels"]), sitk.ReadImage(paths["fixed"]),
                           field, sitk.sitkNearestNeighbor, 0)
    theirs = sitk.GetArrayFromImage(labels).transpose(2, 1, 0)
    dice = metrics.dice(theirs, t.apply(paths["labels"], labels=True).data)
    print(f"SimpleITK labels: Dice {dice}")
    for label, d in dice.items():
        assert d >= 0.99, (label, d)


def test_saved_warp_is_itk_shaped_and_loads_back(pair):
    import nibabel as nib

    t, files = pair["t"], pair["files"]
    image = nib.load(files["warp"])
    assert image.shape == FIXED_SHAPE + (1, 3)
    assert image.header.get_intent()[0] == "vector" and image.get_data_dtype() == np.float32
    np.testing.assert_allclose(image.affine, t.affine, atol=1e-5)
    back = Transform.load(files["warp"])
    print(f"load: max difference {np.abs(back.field - t.field).max():.1e} voxels")
    np.testing.assert_allclose(back.field, t.field, atol=1e-5)
    np.testing.assert_allclose(back.prealignment, pair["pre"], atol=1e-12)
    deformable = Transform.load(files["deformable"])
    assert deformable.prealignment is None
    np.testing.assert_allclose(deformable.field, pair["u"], atol=2e-4)


def test_inverse_is_consistent_and_on_the_reference_grid(pair):
    t, inv = pair["t"], pair["inv"]
    moving_affine = io.load_volume(pair["paths"]["moving"]).affine
    assert inv.shape == MOVING_SHAPE and np.allclose(inv.affine, moving_affine)
    interior = np.zeros(FIXED_SHAPE, bool)
    interior[4:-4, 4:-4, 3:-3] = True
    ic = inverse_consistency(t, inv, mask=interior)
    assert ic["inside"] > 0.5 and ic["mean"] < 0.05 and ic["max"] < 0.5, ic
    ic_fixed = inverse_consistency(t, t.inverse(), mask=interior)
    assert ic_fixed["inside"] > 0.95 and ic_fixed["mean"] < 0.05, ic_fixed
    # An inverse that is wrong on purpose (the forward itself) is far off.
    assert inverse_consistency(t, t, mask=interior)["mean"] > 1.0
    # The loaded inverse file gives the same.
    loaded = Transform.load(pair["files"]["inverse"])
    assert abs(inverse_consistency(t, loaded, mask=interior)["mean"] - ic["mean"]) < 1e-3


def test_bad_inputs_are_refused(pair, tmp_path):
    t = pair["t"]
    with pytest.raises(ValueError, match=r"field must be \(H, W, D, 3\)"):
        Transform(np.zeros((4, 4, 4, 2)), np.eye(4))
    with pytest.raises(ValueError, match="finite"):
        Transform(np.full((4, 4, 4, 3), np.nan), np.eye(4))
    with pytest.raises(ValueError, match="not invertible"):
        Transform(np.zeros((4, 4, 4, 3)), np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"points must be \(N, 3\)"):
        t.map_points(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="space must be"):
        t.map_points(np.zeros((1, 3)), space="xyz")
    io.save_volume(tmp_path / "image.nii.gz", np.zeros((5, 5, 5), np.float32), np.eye(4))
    with pytest.raises(io.InputError, match=r"image.nii.gz: not a displacement field"):
        Transform.load(tmp_path / "image.nii.gz")
    target = tmp_path / "warp.nii.gz"
    t.save(target)
    before = target.read_bytes()
    with pytest.raises(ValueError, match="nii"):
        t.save(tmp_path / "warp.mha")
    assert target.read_bytes() == before
    ext = json.loads(__import__("nibabel").load(target).header.extensions[0].get_content())
    assert np.allclose(ext["jaxreg"]["prealignment"], pair["pre"])
