"""2D image pairs through jaxreg's API: (H, W) / (H, W, C) images, (H, W, 2) fields.

Each function against a numpy/scipy reference or against the 3D function on an equivalent
input where that is exact, under jit and vmap; an end-to-end registration of a real MNI T1
slice deformed by a known smooth field; the README's 2D example.
"""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from conftest import mni_path
from helpers import patch_encoder
from jaxreg import features as F
from jaxreg import filters
from jaxreg import losses
from jaxreg import metrics
from jaxreg import regularisers
from jaxreg import solver
from jaxreg import warping as W
from jaxreg.features import mind
from jaxreg.features import sources

RNG = np.random.default_rng(2024)


def _image(shape=(11, 9), channels=None, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random(shape + ((channels,) if channels else ())).astype(np.float32)


def _field(shape=(11, 9), scale=2.0, seed=1):
    return (np.random.default_rng(seed).normal(size=shape + (2,)) * scale).astype(np.float32)


def _scipy_warp(img, u, mode):
    """Bilinear pull warp by scipy: zeros -> 'grid-constant', edge -> 'nearest'."""
    coords = np.mgrid[:u.shape[0], :u.shape[1]].astype(np.float64) + np.moveaxis(u, -1, 0)
    kw = dict(order=1, mode="grid-constant" if mode == "zeros" else "nearest", cval=0.0)
    if img.ndim == 2:
        return ndimage.map_coordinates(img.astype(np.float64), coords, **kw)
    return np.stack([ndimage.map_coordinates(img[..., c].astype(np.float64), coords, **kw)
                     for c in range(img.shape[-1])], axis=-1)


def _plain_bilinear(m, u):
    """Bilinear zero-padded sampling written with gathers and jax's own autodiff."""
    m = jnp.asarray(m)
    h, w = m.shape[:2]
    pos = W.identity_grid(u.shape[:2]) + u
    base = jnp.floor(pos)
    frac = pos - base
    base = base.astype(jnp.int32)
    out = 0.0
    for dy, dx in itertools.product((0, 1), repeat=2):
        y, x = base[..., 0] + dy, base[..., 1] + dx
        wy = frac[..., 0] if dy else 1 - frac[..., 0]
        wx = frac[..., 1] if dx else 1 - frac[..., 1]
        ok = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        val = m[jnp.clip(y, 0, h - 1), jnp.clip(x, 0, w - 1)]
        out = out + (wy * wx * ok)[..., None] * val
    return out


# warping -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["zeros", "edge"])
@pytest.mark.parametrize("channels", [None, 3])
def test_warp_matches_scipy_map_coordinates(mode, channels):
    img, u = _image(channels=channels), _field()
    out = W.warp(img, u, mode=mode)
    assert out.shape == img.shape
    np.testing.assert_allclose(out, _scipy_warp(img, u, mode), atol=2e-6)


def test_warp_equals_the_3d_warp_of_a_one_slice_volume():
    img, u = _image(channels=2), _field()
    u3 = np.concatenate([u, np.zeros_like(u[..., :1])], axis=-1)[:, :, None]
    out3 = W.warp(img[:, :, None], u3)[:, :, 0]
    np.testing.assert_allclose(W.warp(img, u), out3, rtol=0, atol=1e-6)


def test_warp_gradients_match_plain_autodiff():
    img, u = _image(channels=3), _field(scale=1.5)
    g = jnp.asarray(_image(channels=3, seed=5))
    grad = lambda f, x: jax.jit(jax.grad(f))(jnp.asarray(x))  # one program each
    grad_u = grad(lambda d: jnp.sum(W.warp(img, d) * g), u)
    ref_u = grad(lambda d: jnp.sum(_plain_bilinear(img, d) * g), u)
    np.testing.assert_allclose(grad_u, ref_u, atol=1e-5)
    grad_m = grad(lambda m: jnp.sum(W.warp(m, u) * g), img)
    ref_m = grad(lambda m: jnp.sum(_plain_bilinear(m, jnp.asarray(u)) * g), img)
    np.testing.assert_allclose(grad_m, ref_m, atol=1e-5)


def test_warp_under_jit_and_vmap():
    imgs = np.stack([_image(seed=s) for s in range(3)])
    fields = np.stack([_field(seed=s) for s in range(3)])
    batched = jax.jit(jax.vmap(W.warp))(imgs, fields)
    for i in range(3):
        np.testing.assert_allclose(batched[i], W.warp(imgs[i], fields[i]), atol=1e-6)


def test_warp_labels_compose_resize_field_and_grid():
    labels = (_image(seed=3) * 5).astype(np.int16)
    u = _field(scale=1.5)
    pos = np.round(np.mgrid[:11, :9].transpose(1, 2, 0) + u).astype(int)
    inside = np.all((pos >= 0) & (pos < (11, 9)), axis=-1)
    ref = np.where(inside, labels[np.clip(pos[..., 0], 0, 10), np.clip(pos[..., 1], 0, 8)], 0)
    out = W.warp_labels(labels, u)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(jax.vmap(W.warp_labels)(labels[None], u[None])[0], ref)
    first, second = _field(scale=1.0, seed=7), _field(scale=1.0, seed=8)
    np.testing.assert_allclose(W.compose(first, second),
                               second + _scipy_warp(first, second, "edge"), atol=2e-6)
    # resize_field: the 3D resize of a one-slice field (the depth axis stays 1 voxel)
    u3 = np.concatenate([u, np.zeros_like(u[..., :1])], axis=-1)[:, :, None]
    np.testing.assert_allclose(W.resize_field(u, (7, 15)),
                               W.resize_field(u3, (7, 15, 1))[:, :, 0, :2], atol=1e-6)
    np.testing.assert_array_equal(W.identity_grid((2, 3))[1, 2], [1, 2])


def test_warp_rejects_a_field_that_does_not_match_the_image():
    with pytest.raises(ValueError, match="moving must be"):
        W.warp(np.zeros((4, 4)), np.zeros((4, 4, 4, 3)))
    with pytest.raises(ValueError, match="moving must be"):
        W.warp(np.zeros((4, 4, 4, 4, 1)), np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match=r"\(H, W, 2\)"):
        W.warp(np.zeros((4, 4)), np.zeros((4, 4, 4, 2)))
    with pytest.raises(ValueError, match="labels must be"):
        W.warp_labels(np.zeros((4, 4, 4), np.int16), np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match="different dimension"):
        W.compose(np.zeros((4, 4, 2)), np.zeros((4, 4, 4, 3)))
    with pytest.raises(ValueError, match="needs 2 sizes"):
        W.resize_field(np.zeros((4, 4, 2)), (4, 4, 4))


# filters -------------------------------------------------------------------------------

def test_filters_match_numpy_references_in_2d():
    x = _image((9, 8), channels=2)
    ref = ndimage.uniform_filter(x, size=(3, 3, 1), mode="constant")
    np.testing.assert_allclose(filters.box_filter(x, 3, spatial_dims=2), ref, atol=1e-6)
    ref = ndimage.uniform_filter(x[..., 0], size=5, mode="nearest")
    np.testing.assert_allclose(filters.box_filter(x[..., 0], 5, mode="edge"), ref, atol=1e-6)
    pooled = filters.avg_pool(x, 2, spatial_dims=2)
    np.testing.assert_allclose(pooled, x[:8].reshape(4, 2, 4, 2, 2).mean(axis=(1, 3)), atol=1e-6)
    np.testing.assert_allclose(filters.avg_pool(x[..., 1], 3),
                               x[:9, :6, 1].reshape(3, 3, 2, 3).mean(axis=(1, 3)), atol=1e-6)
    np.testing.assert_array_equal(filters.replicate_pad(x, 2, spatial_dims=2),
                                  np.pad(x, ((2, 2), (2, 2), (0, 0)), mode="edge"))
    mask = filters.extent_mask((9, 8, 2), jnp.array([4, 6]))
    np.testing.assert_array_equal(mask, np.pad(np.ones((4, 6)), ((0, 5), (0, 2))))
    ref = x[np.minimum(np.arange(9), 3)][:, np.minimum(np.arange(8), 5)]
    np.testing.assert_array_equal(filters.continue_edge(x, (4, 6)), ref)


def test_resize_is_bilinear_half_pixel_and_the_3d_resize_of_one_slice():
    x = _image((6, 5), channels=2)

    def axis_weights(n_in, n_out):  # half-pixel centres, clamped at the border
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        w = np.zeros((n_out, n_in))
        w[np.arange(n_out), lo] += 1 - (src - lo)
        w[np.arange(n_out), hi] += src - lo
        return w

    ref = np.einsum("ai,bj,ijc->abc", axis_weights(6, 11), axis_weights(5, 8), x)
    np.testing.assert_allclose(filters.resize(x, (11, 8)), ref, atol=1e-5)
    three = filters.resize(x[:, :, None], (4, 9, 1), antialias=True)[:, :, 0]
    np.testing.assert_allclose(filters.resize(x, (4, 9), antialias=True), three, atol=1e-6)
    ext = (jnp.array([5, 4]), jnp.array([3, 7]))
    ext3 = (jnp.array([5, 4, 1]), jnp.array([3, 7, 1]))
    resize = jax.jit(filters.resize, static_argnums=1)  # one program, not op by op
    np.testing.assert_allclose(resize(x, (4, 9), extents=ext),
                               resize(x[:, :, None], (4, 9, 1), extents=ext3)[:, :, 0],
                               atol=1e-6)


def test_filters_refuse_a_rank_that_is_not_the_spatial_dims():
    with pytest.raises(ValueError, match="spatial axes"):
        filters.box_filter(np.zeros((4, 4, 4, 4)), 3, spatial_dims=2)
    with pytest.raises(ValueError, match="spatial axes"):
        filters.avg_pool(np.zeros((4,)), 2)
    with pytest.raises(ValueError, match="extent must be 2 or 3 sizes"):
        filters.continue_edge(np.zeros((4, 4)), (4,))


# MIND-SSC ------------------------------------------------------------------------------

def _mind_2d_numpy(img, radius, dilation):
    """Plain numpy 2D MIND-SSC, channel order of jaxreg.features.mind's docstring."""
    pairs = [((0, -1), (-1, 0)), ((0, 1), (-1, 0)), ((1, 0), (0, -1)), ((1, 0), (0, 1))]
    h, w = img.shape
    p = dilation
    padded = np.pad(img.astype(np.float64), p, mode="edge")
    shift = lambda o: padded[p + o[0] * p:p + o[0] * p + h, p + o[1] * p:p + o[1] * p + w]
    d = np.stack([ndimage.uniform_filter((shift(a) - shift(b)) ** 2, 2 * radius + 1,
                                         mode="nearest") for a, b in pairs])
    d -= d.min(axis=0)
    var = d.mean(axis=0)
    var = np.clip(var, var.mean() * 0.001, var.mean() * 1000)
    return np.moveaxis(np.exp(-d / var), 0, -1)


@pytest.mark.parametrize("radius,dilation", [(1, 2), (2, 1)])
def test_mind_ssc_2d_matches_numpy(radius, dilation):
    img = ndimage.gaussian_filter(_image((17, 13), seed=4), 1.0)
    out = mind.mind_ssc(img, radius=radius, dilation=dilation)
    assert out.shape == (17, 13, 4)
    np.testing.assert_allclose(out, _mind_2d_numpy(img, radius, dilation), atol=2e-5)
    np.testing.assert_array_equal(mind.mind_ssc(np.full((5, 6), 3.0)), np.ones((5, 6, 4)))


def test_mind_ssc_2d_with_extent_under_jit_and_vmap():
    img = _image((12, 10), seed=6)
    padded = np.pad(img, ((0, 4), (0, 6)), constant_values=9.0)
    out = jax.jit(lambda x, e: mind.mind_ssc(x, extent=e))(padded, jnp.array([12, 10]))
    np.testing.assert_allclose(out[:12, :10], mind.mind_ssc(img), atol=1e-6)
    batch = np.stack([img, img[::-1]])
    vm = jax.vmap(mind.mind_ssc)(batch)
    np.testing.assert_allclose(vm[1], mind.mind_ssc(img[::-1]), atol=1e-6)
    with pytest.raises(ValueError, match="extent must be 2 sizes"):
        mind.mind_ssc(img, extent=(12, 10, 1))


# regularisers --------------------------------------------------------------------------

def test_regularisers_in_2d():
    u = _field((9, 8), scale=0.7)
    ref = sum(np.mean(np.diff(u, axis=a) ** 2) for a in range(2))
    np.testing.assert_allclose(regularisers.diffusion(u), ref, rtol=1e-5)
    m = np.zeros((9, 8), np.float32)
    m[:6, :5] = 1
    inner = u[:6, :5]
    ref = sum(np.sum(np.diff(inner, axis=a) ** 2) / (2 * np.diff(inner, axis=a)[..., 0].size)
              for a in range(2))
    np.testing.assert_allclose(regularisers.diffusion(u, mask=m), ref, rtol=1e-5)
    # bending energy of u0 = a y^2 + c y x, u1 = 0: d2 = 2a, dxy = c (exact differences)
    y, x = np.mgrid[:9, :8].astype(np.float32)
    a, c = 0.3, -0.2
    quad = np.stack([a * y**2 + c * y * x, np.zeros_like(y)], axis=-1)
    np.testing.assert_allclose(regularisers.bending_energy(quad), (4 * a**2 + 2 * c**2) / 2,
                               rtol=1e-4)
    grads = [np.gradient(u[..., i], axis=(0, 1)) for i in range(2)]
    det = (1 + grads[0][0]) * (1 + grads[1][1]) - grads[0][1] * grads[1][0]
    np.testing.assert_allclose(regularisers.jacobian_determinant(u), det, atol=1e-5)
    u3 = np.concatenate([u, np.zeros_like(u[..., :1])], axis=-1)[:, :, None].repeat(3, 2)
    np.testing.assert_allclose(regularisers.jacobian_determinant(u),
                               regularisers.jacobian_determinant(u3)[:, :, 1], atol=1e-6)
    vm = jax.jit(jax.vmap(regularisers.diffusion))(np.stack([u, 2 * u]))
    np.testing.assert_allclose(vm[1], 4 * regularisers.diffusion(u), rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(H, W, 2\)"):
        regularisers.diffusion(np.zeros((4, 4, 3)))


# losses --------------------------------------------------------------------------------

def test_losses_in_2d_match_numpy():
    a, b = _image((10, 9), channels=3, seed=1), _image((10, 9), channels=3, seed=2)
    mask = np.zeros((10, 9), np.float32)
    mask[2:8, 1:7] = 1
    np.testing.assert_allclose(losses.ssd(a, b), np.mean((a - b) ** 2), rtol=1e-5)
    inside = mask.astype(bool)
    np.testing.assert_allclose(losses.ssd(a, b, mask=mask), np.mean((a - b)[inside] ** 2),
                               rtol=1e-5)

    def ncc_np(x, y):
        x, y = x - x.mean(axis=0), y - y.mean(axis=0)
        return -np.mean((x * y).sum(0) / np.sqrt((x**2).sum(0) * (y**2).sum(0)))

    np.testing.assert_allclose(losses.ncc(a, b, spatial_dims=2),
                               ncc_np(a.reshape(-1, 3), b.reshape(-1, 3)), rtol=1e-4)
    np.testing.assert_allclose(losses.ncc(a, b, mask=mask), ncc_np(a[inside], b[inside]),
                               rtol=1e-4)
    box = lambda x: ndimage.uniform_filter(x.astype(np.float64), (5, 5, 1), mode="nearest")
    cc = (box(a * b) - box(a) * box(b)) ** 2 / (
        (box(a * a) - box(a) ** 2) * (box(b * b) - box(b) ** 2) + 1e-5)
    np.testing.assert_allclose(losses.local_ncc(a, b, window=5, spatial_dims=2),
                               -cc.mean(), rtol=1e-3)
    np.testing.assert_allclose(losses.local_ncc(a[..., 0], b[..., 0], window=5),
                               -cc[..., 0].mean(), rtol=1e-3)
    with pytest.raises(ValueError, match="not 2D"):
        losses.ssd(np.zeros((4, 4, 4, 4)), np.zeros((4, 4, 4, 4)), mask=np.ones((4, 4)))


def test_warped_ssd_in_2d_is_the_xla_composition_with_its_gradient():
    m, f, u = _image(channels=4, seed=1), _image(channels=4, seed=2), _field(scale=1.2)
    value = losses.warped_ssd(m, u, f)
    np.testing.assert_allclose(value, np.mean((_scipy_warp(m, u, "zeros") - f) ** 2), rtol=1e-5)
    grad = jax.jit(jax.grad(lambda d: losses.warped_ssd(m, d, f)))(jnp.asarray(u))
    ref = jax.grad(lambda d: jnp.mean((_plain_bilinear(m, d) - f) ** 2))(jnp.asarray(u))
    np.testing.assert_allclose(grad, ref, atol=1e-6)


# solver pieces -------------------------------------------------------------------------

def test_correlation_cost_and_coupled_convex_in_2d_match_numpy():
    f, m = _image((6, 5), channels=3, seed=1), _image((6, 5), channels=3, seed=2)
    hw = 2
    pad = np.pad(m, ((hw, hw), (hw, hw), (0, 0)))
    ref = []
    for dy, dx in itertools.product(range(-hw, hw + 1), repeat=2):
        cost = ((f - pad[hw + dy:hw + dy + 6, hw + dx:hw + dx + 5]) ** 2).sum(-1)
        box = lambda c: ndimage.uniform_filter(c, 3, mode="constant")
        ref.append(box(box(cost)))
    cost = solver.correlation_cost(f, m, disp_hw=hw)
    np.testing.assert_allclose(cost, np.stack(ref), atol=1e-5)
    # coupled convex on well-separated integer costs (no ties under rounding)
    cost = RNG.permutation(25 * 30).reshape(25, 6, 5).astype(np.float32) / 100.0
    mesh = np.array(list(itertools.product(range(-hw, hw + 1), repeat=2)), np.float32)
    smooth = lambda idx: ndimage.uniform_filter(mesh[idx], (3, 3, 1), mode="constant")
    soft = smooth(cost.argmin(0))
    for coeff in (0.3, 1.0):
        pen = ((mesh[:, None, None, :] - soft[None]) ** 2).sum(-1)
        soft = smooth((cost + coeff * pen).argmin(0))
    out = solver.coupled_convex(cost, disp_hw=hw, coupling=(0.3, 1.0))
    assert out.shape == (6, 5, 2)
    np.testing.assert_allclose(out, soft, atol=1e-5)


FAST = solver.ConvexAdamConfig(grid_sp=4, disp_hw=3, iterations=10, grid_sp_adam=2)


def _blobs(shape=(32, 28), shift=(2, -1)):
    y, x = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    img = (np.exp(-((y - 12) ** 2 + (x - 10) ** 2) / 20) + 0.6 * np.exp(
        -((y - 20) ** 2 + (x - 18) ** 2) / 12)).astype(np.float32)
    return img, np.roll(img, shift, axis=(0, 1))


def test_convex_adam_2d_padded_with_extent_under_vmap_equals_unpadded():
    img, mov = _blobs()
    f, m = mind.mind_ssc(img), mind.mind_ssc(mov)
    field = solver.register_mind(img, mov, config=FAST, percentiles=None)  # MIND of the raw images
    assert field.shape == (32, 28, 2)
    # a batch of two padded pairs (the pair and its swap) under vmap, real size (32, 28)
    pad = ((0, 0), (0, 4), (0, 8), (0, 0))
    fixed, moving = jnp.pad(jnp.stack([f, m]), pad), jnp.pad(jnp.stack([m, f]), pad)
    batched = jax.vmap(lambda a, b: solver.convex_adam(a, b, config=FAST,
                                                       extent=jnp.array([32, 28])))(fixed, moving)
    assert batched.shape == (2, 36, 36, 2)
    np.testing.assert_allclose(batched[0, :32, :28], field, atol=2e-3)
    # the swapped pair's field is close to the opposite one
    assert np.mean(np.asarray(batched[1, :32, :28] + field) ** 2) < 0.5 * np.mean(
        np.asarray(field) ** 2)
    with pytest.raises(ValueError, match=r"extent must be 2 sizes"):
        solver.convex_adam(f, m, config=FAST, extent=(32, 28, 1))


# metrics -------------------------------------------------------------------------------

def test_metrics_in_2d():
    yy, xx = np.mgrid[:30, :30]
    a = ((yy - 14) ** 2 + (xx - 14) ** 2 <= 49).astype(np.int16)
    b = ((yy - 16) ** 2 + (xx - 13) ** 2 <= 49).astype(np.int16)
    ref = 2 * np.sum(a & b) / (a.sum() + b.sum())
    assert metrics.dice(a, b) == {1: pytest.approx(ref)}

    def contour(mask):  # a pixel of the mask with a 4-neighbour outside (or on the border)
        p = np.pad(mask, 1)
        return mask & ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])

    pa = np.argwhere(contour(a.astype(bool))) * (1.0, 2.0)
    pb = np.argwhere(contour(b.astype(bool))) * (1.0, 2.0)
    dist = np.linalg.norm(pa[:, None] - pb[None], axis=-1)
    ref = max(np.percentile(dist.min(1), 95), np.percentile(dist.min(0), 95))
    assert metrics.hd95(a, b, spacing=(1.0, 2.0)) == {1: pytest.approx(ref)}
    # TRE under an affine field (bilinear interpolation is exact for it)
    A, t = np.array([[0.05, -0.02], [0.03, 0.01]]), np.array([1.5, -0.5])
    grid = np.mgrid[:20, :18].transpose(1, 2, 0).astype(np.float64)
    u = (grid @ A.T + t).astype(np.float32)
    pts, moving = np.array([[3.2, 4.5], [10.0, 11.7]]), np.array([[5.0, 4.0], [9.0, 13.0]])
    ref = np.linalg.norm((pts + pts @ A.T + t - moving) * (0.5, 2.0), axis=1)
    np.testing.assert_allclose(metrics.tre(pts, moving, u, spacing=(0.5, 2.0)), ref, rtol=1e-5)
    v = _field((20, 18), scale=0.6, seed=3)
    np.testing.assert_allclose(metrics.field_error(u, v),
                               np.linalg.norm(u - v, axis=-1).mean(), rtol=1e-5)
    mask = grid[..., 0] > 8
    np.testing.assert_allclose(metrics.field_error(u, v, mask=mask, spacing=(1.0, 3.0)),
                               np.linalg.norm((u - v) * (1, 3), axis=-1)[mask].mean(), rtol=1e-5)
    g = [np.gradient(v[..., i], axis=(0, 1)) for i in range(2)]
    det = (1 + g[0][0]) * (1 + g[1][1]) - g[0][1] * g[1][0]
    stats = metrics.jacobian_stats(v)
    assert stats["folding_percent"] == pytest.approx(100 * np.mean(det <= 0), abs=1e-4)
    assert stats["std_log_jac"] == pytest.approx(np.log(np.maximum(det, 1e-9)).std(), rel=1e-3)


# end to end on a real slice -------------------------------------------------------------

@pytest.fixture(scope="module")
def mni_slice():
    """An axial slice of the MNI T1 (2 mm), GM/WM labels, a known smooth deformation."""
    nib = pytest.importorskip("nibabel")
    crop = (slice(2, 194, 2), slice(4, 228, 2), 90)
    t1, gm, wm = (np.asarray(nib.load(mni_path(n)).dataobj, np.float32)[crop]
                  for n in ("t1", "gm", "wm"))
    fixed = t1 / t1.max()
    labels = ((gm > 127) * 1 + (wm > 127) * 2).astype(np.int16)
    rng = np.random.default_rng(3)  # smooth noise, largest displacement 5 pixels
    v = np.stack([ndimage.gaussian_filter(rng.normal(size=fixed.shape), 12.0, mode="wrap")
                  for _ in range(2)], axis=-1)
    v = (v * 5.0 / np.linalg.norm(v, axis=-1).max()).astype(np.float32)
    assert max(np.abs(np.gradient(v[..., i], axis=j)).max() for i in (0, 1) for j in (0, 1)) < 0.5
    moving = np.asarray(W.warp(fixed, v))
    moving_labels = np.asarray(W.warp_labels(labels, v))
    truth = np.zeros_like(v)  # the inverse of v: u(x) = -v(x + u(x))
    for _ in range(30):
        truth = -np.asarray(W.warp(v, truth, mode="edge"))
    return fixed, moving, labels, moving_labels, truth


def test_register_mind_recovers_a_known_deformation_of_a_real_slice(mni_slice):
    fixed, moving, labels, moving_labels, truth = mni_slice
    field = solver.register_mind(fixed, moving)
    assert field.shape == fixed.shape + (2,)
    brain = labels > 0
    before = metrics.field_error(np.zeros_like(truth), truth, mask=brain)
    after = metrics.field_error(field, truth, mask=brain)
    dice_before = np.mean(list(metrics.dice(labels, moving_labels).values()))
    warped = W.warp_labels(moving_labels, field)
    dice_after = np.mean(list(metrics.dice(labels, warped).values()))
    print(f"2D MNI slice: field error {before:.3f} -> {after:.3f} px, "
          f"mean Dice {dice_before:.4f} -> {dice_after:.4f}")
    assert after < 0.35 * before, (before, after)
    assert dice_after > dice_before + 0.1, (dice_before, dice_after)
    assert metrics.jacobian_stats(field)["folding_percent"] < 0.1


def _readme_example() -> str:
    """The README's 2D example: the python block after the line naming this file."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
    with open(path) as fh:
        text = fh.read()
    after = text[text.index("This example is run by `tests/test_2d.py`"):]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


README_EXAMPLE = _readme_example()


def test_readme_2d_example_runs_and_improves(mni_slice, tmp_path, monkeypatch, capsys):
    fixed, moving, labels, moving_labels, _ = mni_slice
    for name, x in [("fixed", fixed), ("moving", moving), ("fixed_labels", labels),
                    ("moving_labels", moving_labels)]:
        np.save(tmp_path / f"{name}.npy", x)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(README_EXAMPLE, scope)
    assert 10 <= len(README_EXAMPLE.strip().splitlines()) <= 16
    assert "NCC" in capsys.readouterr().out
    assert float(jnp.asarray(scope["warped"]).shape == fixed.shape)
    assert float(losses.ncc(scope["warped"], fixed)) < float(losses.ncc(moving, fixed)) - 0.02
    assert np.mean(list(metrics.dice(labels, scope["warped_labels"]).values())) > np.mean(
        list(metrics.dice(labels, moving_labels).values())) + 0.1


# foundation features --------------------------------------------------------------------

def _encoder():
    """A linear patch embedding (tests/helpers.py), 5 channels."""
    return patch_encoder("patch2d", channels=5, chunk=2)


def test_pair_features_2d_encodes_each_image_once_as_its_own_slice(tmp_path):
    fixed, moving = _blobs((28, 24))
    fixed = fixed + 0.1 * _image((28, 24), seed=3)
    moving = moving + 0.1 * _image((28, 24), seed=4)
    enc = _encoder()
    config = F.FeatureConfig(pca_dims=2, scale=False)
    out = F.pair_features(fixed, moving, enc, config=config)["features"]
    assert enc.calls == 2 and out[0].shape == out[1].shape == (28, 24, 2)
    # the stages by hand: one slice per image, joint PCA, tokens resized to the pixels
    tokens = [enc(F.normalise_intensity(x)[None])["features"] for x in (fixed, moving)]
    pca = F.fit_pca(tokens, dims=2, scale=False)
    scale = jnp.asarray(enc.token_scale((28, 24), "features"), jnp.float32)
    for got, tok in zip(out, tokens):
        ref = jax.image.scale_and_translate(F.project(tok, pca)[0], (28, 24, 2), (0, 1), scale,
                                            jnp.zeros(2), method="linear", antialias=True)
        np.testing.assert_allclose(got, ref, atol=1e-5)
    # a PCA mask and the token cache work on 2D pairs too
    cache = F.FeatureCache(str(tmp_path))
    calls = enc.calls
    masked = F.pair_features(fixed, moving, enc, config=config, fixed_mask=fixed > 0.3,
                             cache=cache)["features"]
    assert masked[0].shape == (28, 24, 2) and enc.calls == calls + 2
    again = F.pair_features(fixed, moving, enc, config=config, fixed_mask=fixed > 0.3,
                            cache=cache)["features"]
    assert enc.calls == calls + 2
    np.testing.assert_allclose(again[1], masked[1], atol=1e-6)
    with pytest.raises(ValueError, match="its own slice"):
        F.pair_features(fixed, moving, enc, config=F.FeatureConfig(axes=(0, 1, 2)))
    with pytest.raises(ValueError, match="uniform intensity"):
        F.pair_features(np.ones((28, 24)), moving, enc, config=config)


def test_encoder_and_hybrid_sources_make_2d_features():
    fixed, moving = _blobs()
    fixed = fixed + 0.05 * _image((32, 28), seed=5)
    moving = moving + 0.05 * _image((32, 28), seed=6)
    enc = sources.EncoderSource(_encoder(), F.FeatureConfig(pca_dims=3))
    hybrid = sources.HybridSource(sources.MindSource(), enc, weight=2.0)
    h = hybrid(fixed, moving)
    m = sources.MindSource()(fixed, moving)
    e = enc(fixed, moving)
    assert h.fixed.shape == (32, 28, 4 + 3) and m.fixed.shape == (32, 28, 4)
    # 12 x the mean over the mixed channels = 12 x MIND's mean + weight x the features' mean
    obj = lambda a, b: 12 * jnp.mean((a - b) ** 2)
    np.testing.assert_allclose(
        obj(h.fixed, h.moving),
        obj(m.fixed, m.moving) + 2.0 * jnp.mean((e.fixed - e.moving) ** 2), rtol=1e-4)
