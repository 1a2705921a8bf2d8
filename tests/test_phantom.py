"""Tests for jaxreg.phantom: determinism, anatomy, exact ground truth, task contrasts."""

import functools

import numpy as np
import pytest
from scipy import ndimage

from jaxreg import metrics, phantom


@functools.lru_cache(maxsize=None)
def _pair(task, seed=0):
    return phantom.breast_pair(task, seed=seed)


def _pull(volume, field, order):
    coords = np.indices(field.shape[:3], dtype=np.float32) + np.moveaxis(field, -1, 0)
    return ndimage.map_coordinates(volume, coords, order=order, mode="nearest")


def test_fixed_anatomy_is_the_moving_anatomy_pulled_through_true_field():
    """The tissue labels of the fixed image are those of the moving one pulled (nearest
    neighbour) through ``true_field``, but for the rounding at tissue borders. Catches a
    returned field that is not the one the fixed image was drawn with: its sign, its channel
    order or its scale wrong (each leaves 7-20 % of the body mislabelled, the true field
    4.4 %), or the fixed and moving images swapped."""
    pair = _pair("date")
    field, fixed, moving = pair["true_field"], pair["fixed_tissues"], pair["moving_tissues"]
    body = fixed != phantom.TISSUES.index("air")
    mismatch = lambda u: np.mean(_pull(moving, u, 0)[body] != fixed[body])  # noqa: E731
    assert mismatch(field) < 0.06, mismatch(field)
    assert mismatch(field) < 0.5 * mismatch(0 * field)  # the deformation is not trivial
    assert mismatch(-field) > 2 * mismatch(field)


@pytest.mark.parametrize("task", ["date", "lesion"])
def test_masks_are_binary_nested_and_those_of_the_label_maps(task):
    """``<side>_breast`` / ``<side>_fgt`` are 0/1 masks of the side's own tissue map: the
    breast is fat, FGT, skin and lesion, the FGT mask FGT and lesion, so FGT lies inside
    the breast. Catches masks of 0/255 or bool (a Dice of label 1 would be 0 or fail), a
    mask drawn from the other side's tissues, and a lesion left out of the FGT mask."""
    pair = _pair(task)
    index = lambda *names: [phantom.TISSUES.index(n) for n in names]  # noqa: E731
    for side in ("fixed", "moving"):
        tissues, breast, fgt = (pair[f"{side}_{k}"] for k in ("tissues", "breast", "fgt"))
        for mask in (breast, fgt):
            assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        np.testing.assert_array_equal(breast, np.isin(tissues, index("fat", "fgt", "skin",
                                                                     "lesion")))
        np.testing.assert_array_equal(fgt, np.isin(tissues, index("fgt", "lesion")))
        assert np.all(fgt <= breast)
    assert not np.array_equal(pair["fixed_fgt"], pair["moving_fgt"])  # each side its own


def test_grid_affine_and_dtypes_follow_the_arguments():
    """Every volume is on the grid ``shape`` asks for, and the affine is the documented
    one: 2 x 2 x 2.5 mm voxels along array axes 0, 1, 2 (RAS+, no flips) with the grid
    centred on the origin. Catches the spacings in another order, a corner-anchored or
    flipped affine, and a default grid or integer images returned whatever is asked."""
    shape = (40, 32, 20)
    pair = phantom.breast_pair("sequence", shape=shape, seed=1)
    for key in ("fixed", "moving"):
        assert pair[key].shape == shape and pair[key].dtype == np.float32
        assert np.all(np.isfinite(pair[key])) and pair[key].max() > 0.5
    for key in ("fixed_breast", "moving_fgt", "fixed_tissues", "moving_lesion"):
        assert pair[key].shape == shape
    assert pair["true_field"].shape == shape + (3,) and pair["true_field"].dtype == np.float32
    affine = pair["affine"]
    world = lambda ijk: affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]  # noqa: E731
    np.testing.assert_allclose(world((np.asarray(shape) - 1) / 2), 0.0, atol=1e-9)
    for axis, mm in enumerate((2.0, 2.0, 2.5)):
        step = world(np.eye(3)[axis]) - world(np.zeros(3))
        np.testing.assert_allclose(step, mm * np.eye(3)[axis])  # along +axis (RAS), mm long
    np.testing.assert_array_equal(affine[3], [0, 0, 0, 1])
    assert pair["task"] == "sequence"


def test_deterministic_per_seed():
    a = phantom.breast_pair("lesion", seed=3, shape=(48, 40, 24))
    b = phantom.breast_pair("lesion", seed=3, shape=(48, 40, 24))
    c = phantom.breast_pair("lesion", seed=4, shape=(48, 40, 24))
    for key in ("fixed", "moving", "fixed_fgt", "moving_lesion", "true_field"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["fixed_fgt"], c["fixed_fgt"])
    assert not np.array_equal(a["true_field"], c["true_field"])


def test_anatomy_plausible():
    pair = _pair("date")
    for side in ("fixed", "moving"):
        breast, fgt = pair[f"{side}_breast"], pair[f"{side}_fgt"]
        assert np.all(fgt <= breast)  # FGT inside the breast
        assert 0.1 < fgt.sum() / breast.sum() < 0.5
        assert 0.1 < breast.mean() < 0.5
        # Two breasts, both in front (axis 1 high) of the chest wall.
        _, count = ndimage.label(breast)
        assert count == 2
        assert np.argwhere(breast)[:, 1].min() > 8
        # Fat is brighter than FGT on the T1-like fixed image; air is dark.
    fixed, tissues = pair["fixed"], pair["fixed_tissues"]
    fat = fixed[tissues == phantom.TISSUES.index("fat")].mean()
    fgt = fixed[tissues == phantom.TISSUES.index("fgt")].mean()
    air = fixed[tissues == 0].mean()
    assert fat > fgt + 0.2 and air < 0.05


def test_true_field_maps_moving_masks_onto_fixed():
    pair = _pair("date")
    field = pair["true_field"]
    norm = np.linalg.norm(field, axis=-1)
    assert 3.0 <= norm.max() <= 5.0 + 1e-5
    assert metrics.jacobian_stats(field)["folding_percent"] == 0.0
    for mask in ("breast", "fgt"):
        before = metrics.dice(pair[f"moving_{mask}"], pair[f"fixed_{mask}"])[1]
        after = metrics.dice(_pull(pair[f"moving_{mask}"], field, 0), pair[f"fixed_{mask}"])[1]
        assert after > 0.95, mask
        assert after > before + 0.02, mask  # the deformation is not trivial
    # Same contrast (date task): warped moving image matches the fixed image closely.
    warped = _pull(pair["moving"], field, 1)
    assert np.corrcoef(warped.ravel(), pair["fixed"].ravel())[0, 1] > 0.97
    # Compare with the lesion task (same T1 contrast without the date task's bias field).
    same = _pair("lesion")
    error_after = np.abs(_pull(same["moving"], field, 1) - same["fixed"])[~_pull(
        same["moving_lesion"], field, 0).astype(bool)].mean()
    error_before = np.abs(same["moving"] - same["fixed"]).mean()
    assert error_after < 0.5 * error_before


def test_tasks_share_anatomy_and_differ_in_contrast():
    pairs = {task: _pair(task) for task in phantom.TASKS}
    base = pairs["date"]
    for pair in pairs.values():
        np.testing.assert_array_equal(pair["fixed_breast"], base["fixed_breast"])
        np.testing.assert_array_equal(pair["true_field"], base["true_field"])
    tissues = base["moving_tissues"]
    fat, fgt = tissues == phantom.TISSUES.index("fat"), tissues == phantom.TISSUES.index("fgt")

    def contrast(task):  # fat minus FGT on the moving image
        moving = pairs[task]["moving"]
        return moving[fat].mean() - moving[fgt].mean()

    assert contrast("date") > 0.3       # T1-like: fat bright
    assert contrast("sequence") < -0.3  # fat-suppressed: fat dark, FGT bright
    assert contrast("modality") < -0.2  # inverted remap
    # The date task drifts intensities with a bias field: not a copy of the T1 contrast.
    ratio = pairs["date"]["moving"][fat] / np.maximum(pairs["lesion"]["moving"][fat], 1e-3)
    assert ratio.std() > 0.02
    # Moving images pairwise distinct.
    for i, a in enumerate(phantom.TASKS):
        for b in phantom.TASKS[i + 1:]:
            assert np.abs(pairs[a]["moving"] - pairs[b]["moving"]).mean() > 0.005, (a, b)


def test_lesion_is_bright_and_inside_fgt():
    pair = _pair("lesion")
    lesion = pair["moving_lesion"].astype(bool)
    assert 30 < lesion.sum() < 300
    assert np.all(pair["moving_breast"][lesion] == 1)
    assert np.all(pair["moving_fgt"][lesion] == 1)
    tissues = pair["moving_tissues"]
    fat = pair["moving"][tissues == phantom.TISSUES.index("fat")].mean()
    fgt = pair["moving"][tissues == phantom.TISSUES.index("fgt")].mean()
    assert pair["moving"][lesion].mean() > max(fat + 0.05, 2 * fgt)
    assert not _pair("date")["moving_lesion"].any()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        phantom.breast_pair("ultrasound")
    with pytest.raises(ValueError, match="shape"):
        phantom.breast_pair("date", shape=(4, 4, 4))


def test_true_field_agrees_with_jaxreg_warp():
    # The phantom's pull convention is the one jaxreg.warping implements.
    from jaxreg import warping as warp

    pair = _pair("date")
    warped = np.asarray(warp.warp_labels(pair["moving_fgt"], pair["true_field"]))
    assert metrics.dice(warped, pair["fixed_fgt"])[1] > 0.95
    image = np.asarray(warp.warp(pair["moving"], pair["true_field"], mode="edge"))
    np.testing.assert_allclose(image, _pull(pair["moving"], pair["true_field"], 1), atol=1e-4)
