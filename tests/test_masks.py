"""Similarity masks (cost-function masking): the solver's two stages and the affine stage
count only what the masks hold."""

import itertools

import numpy as np
import pytest
from scipy import ndimage

from jaxreg import solver
import jaxreg
from jaxreg.solver import affine
from jaxreg.solver.coarse import correlation_cost

FAST = solver.ConvexAdamConfig(grid_sp=3, disp_hw=3, iterations=40)


def _box3(x):
    """box3 with zero padding, dividing by 27 (filters.box_filter's mode="zeros")."""
    return ndimage.uniform_filter(x, 3, mode="constant")


def _reference_cost(fixed, moving, disp_hw, wf, wm):
    """numpy: weighted squared differences, offsets outside the moving mask replaced by
    the mean of those inside it, box-filtered twice."""
    shape = fixed.shape[:3]
    pad = [(disp_hw, disp_hw)] * 3
    pm = np.pad(moving, pad + [(0, 0)])
    pw = np.pad(wm, pad)
    costs, ws = [], []
    for o in itertools.product(range(2 * disp_hw + 1), repeat=3):
        window = tuple(slice(o[a], o[a] + shape[a]) for a in range(3))
        costs.append(((fixed - pm[window]) ** 2).sum(-1) * wf * pw[window])
        ws.append(pw[window])
    costs, ws = np.stack(costs), np.stack(ws)
    neutral = costs.sum(0) / np.maximum(ws.sum(0), 1e-6)
    return np.stack([_box3(_box3(c + (1 - w) * neutral)) for c, w in zip(costs, ws)])


def test_weighted_cost_matches_numpy():
    rng = np.random.default_rng(0)
    fixed, moving = rng.random((2, 6, 5, 4, 3), dtype=np.float32)
    wf = rng.random((6, 5, 4)).astype(np.float32)
    wm = (rng.random((6, 5, 4)) > 0.4).astype(np.float32)
    got = np.asarray(correlation_cost(fixed, moving, disp_hw=1, fixed_weight=wf,
                                      moving_weight=wm))
    np.testing.assert_allclose(got, _reference_cost(fixed, moving, 1, wf, wm), rtol=1e-5,
                               atol=1e-6)
    # All-ones weights leave the plain cost (inside the grid: the padding now counts as
    # outside the moving mask, where before it read zero features).
    ones = np.ones((6, 5, 4), np.float32)
    plain = np.asarray(correlation_cost(fixed, moving, disp_hw=1))
    np.testing.assert_allclose(np.asarray(correlation_cost(fixed, moving, disp_hw=1,
                                                           fixed_weight=ones)), plain, rtol=1e-6)


def _box_moved_apart(shape=(36, 36, 24)):
    """A textured volume moved by -2 voxels along axis 0, but for a 12-voxel box moved by
    +2: the box's own motion is what a mask on it asks for."""
    rng = np.random.default_rng(1)
    fixed = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5).astype(np.float32)
    moving = np.roll(fixed, -2, axis=0)
    box = (slice(12, 24), slice(12, 24), slice(6, 18))
    moving[box] = np.roll(fixed, 2, axis=0)[box]
    mask = np.zeros(shape, np.float32)
    mask[box] = 1.0
    return fixed, moving, mask


def test_masks_restrict_the_match_to_their_region():
    fixed, moving, mask = _box_moved_apart()
    inside = mask > 0
    # moving(x + u) = fixed(x): the box needs u_0 = +2 (measured: 2.47 mean error
    # unmasked, 0.47 with the fixed mask, 0.54 with the moving one).
    error = lambda **masks: float(np.abs(np.asarray(jaxreg.register_mind(
        fixed, moving, config=FAST, **masks))[..., 0][inside] - 2.0).mean())
    free = error()
    assert free > 1.5
    assert error(fixed_mask=mask) < 0.8
    assert error(moving_mask=mask) < 0.8  # the box lies at the same place in both


def test_masks_are_checked():
    fixed, moving, mask = (x[:18, :18, :12] for x in _box_moved_apart())
    mask[4:8] = 1.0
    feats = jaxreg.mind_ssc(fixed), jaxreg.mind_ssc(moving)
    with pytest.raises(ValueError, match=r"fixed_mask must be the fixed grid \(18, 18, 12\)"):
        solver.convex_adam(*feats, config=FAST, fixed_mask=mask[:-1])
    with pytest.raises(ValueError, match=r"moving_mask must be weights in \[0, 1\], not all "
                                         r"zero; got values from 0 to 0"):
        solver.convex_adam(*feats, config=FAST, moving_mask=0 * mask)
    with pytest.raises(ValueError, match="from -1 to 1"):
        solver.convex_adam(*feats, config=FAST, fixed_mask=2 * mask - 1)
    with pytest.raises(ValueError, match="custom similarity"):
        solver.fine_stage(*feats, np.zeros((18, 18, 12, 3)), config=FAST,
                          similarity=jaxreg.ssd, fixed_mask=mask)


def test_affine_stage_follows_the_moving_mask():
    """Two objects moved differently: the masks pick whose motion the affine stage finds."""
    yy, xx, zz = np.mgrid[:40, :40, :40].astype(np.float32)
    blob = lambda c, r: np.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2 + (zz - c[2]) ** 2)
                               / (2 * r * r))
    fixed = blob((14, 14, 20), 4) + blob((27, 27, 20), 3)
    moving = blob((17, 14, 20), 4) + blob((27, 23, 20), 3)  # first +3 along 0, second -4 along 1
    fixed_mask = (blob((14, 14, 20), 4) > 0.05).astype(np.float32)
    moving_mask = (blob((17, 14, 20), 4) > 0.05).astype(np.float32)
    config = affine.AffineConfig(kind="rigid", similarity="ncc", levels=(2, 1),
                                 iterations=(60, 30), init="com")
    result = affine.register_affine(fixed, moving, config=config, mask=fixed_mask,
                                    moving_mask=moving_mask)
    centre = np.array([14.0, 14.0, 20.0, 1.0])
    np.testing.assert_allclose((result.matrix @ centre)[:3], [17, 14, 20], atol=0.5)
    with pytest.raises(ValueError, match="moving_mask shape"):
        affine.register_affine(fixed, moving, config=config, moving_mask=moving_mask[:-1])
