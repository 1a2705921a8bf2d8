"""Pieces of :mod:`jaxreg.solver.affine` (private): parameters, initialisation, sampling, pooling.

Dimension-generic: ``d`` (2 or 3) is the number of spatial axes of the input.

The transform from fixed voxel ``x`` to moving voxel ``y`` is parametrised around a
fixed centre ``c_f`` and a moving centre ``c_m``, in millimetres (``L_f``, ``L_m``: the
linear parts of the images' voxel-to-world affines, the identity without them)::

    y = L_m^-1 (Q L_f (x - c_f) + t) + c_m,    Q = R(rot) Q0 (I + U(shear)) diag(exp(scale))

so that ``Q`` is the linear part of the world transform (rigid when ``rot`` only).
``Q0`` is the initial rotation (principal axes). Rotation, log-scale and shear
parameters are divided by ``radius`` (the fixed image's RMS radius in mm): one unit of
every parameter moves the image's periphery by about one millimetre, which keeps Adam's
per-parameter steps balanced.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg import warping


def n_rotations(d: int) -> int:
    return d * (d - 1) // 2


def n_params(d: int, kind: str) -> int:
    """Length of the parameter vector: rotations, shifts (+ log-scales, shears)."""
    rigid = n_rotations(d) + d
    return rigid if kind == "rigid" else rigid + d + n_rotations(d)


def _skew(v, d):
    if d == 2:
        return jnp.array([[0.0, -v[0]], [v[0], 0.0]])
    return jnp.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


def rotation(v, d: int) -> jax.Array:
    """Rotation matrix of an angle (2D, ``(1,)``) or an axis-angle vector (3D, ``(3,)``).

    Rodrigues' formula ``I + sinc(t) K + (1 - cos t) / t^2 K^2``, written with ``sinc``
    and a floored norm so that it and its gradient are finite at ``v = 0``.
    """
    k = _skew(v, d)
    theta = jnp.sqrt(jnp.sum(v**2) + 1e-12)
    half = jnp.sinc(theta / (2.0 * jnp.pi))
    return jnp.eye(d) + jnp.sinc(theta / jnp.pi) * k + 0.5 * half**2 * (k @ k)


def _upper(v, d):
    rows, cols = np.triu_indices(d, 1)
    return jnp.zeros((d, d)).at[rows, cols].set(v)


def linear_part(params, frame) -> jax.Array:
    """``Q`` (world linear part, d x d) of a parameter vector (see module doc)."""
    d = frame["c_f"].shape[0]
    r, k = frame["radius"], n_rotations(d)
    q = rotation(params[:k] / r, d) @ frame["q0"]
    if params.shape[0] > k + d:
        scale = params[k + d:k + 2 * d] / r
        shear = params[k + 2 * d:] / r
        q = q @ (jnp.eye(d) + _upper(shear, d)) @ jnp.diag(jnp.exp(scale))
    return q


def voxel_matrix(params, frame) -> jax.Array:
    """The ``(d+1, d+1)`` fixed-voxel -> moving-voxel matrix of a parameter vector."""
    d = frame["c_f"].shape[0]
    k = n_rotations(d)
    inv_m = frame["inv_l_m"]
    lin = inv_m @ linear_part(params, frame) @ frame["l_f"]
    off = inv_m @ params[k:k + d] + frame["c_m"] - lin @ frame["c_f"]
    top = jnp.concatenate([lin, off[:, None]], axis=1)
    return jnp.concatenate([top, jnp.eye(d + 1)[d:]], axis=0)


def _coords(shape):
    axes = [jnp.arange(n, dtype=jnp.float32) for n in shape]
    return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)


def moments(image, mask, linear):
    """Weighted centre (voxels) and covariance (mm^2) of an image's intensities.

    Weights are the intensities above the image's minimum (times ``mask``).
    """
    img = jnp.asarray(image, jnp.float32)
    w = img - jnp.min(img)
    if mask is not None:
        w = w * mask
    w = w / jnp.maximum(jnp.sum(w), 1e-12)
    x = _coords(img.shape).reshape(-1, img.ndim)
    wf = w.ravel()
    centre = wf @ x
    mm = (x - centre) @ linear.T
    cov = (mm * wf[:, None]).T @ mm
    return centre, cov


def principal_rotation(cov_f, cov_m):
    """The proper rotation taking the fixed principal axes onto the moving ones.

    Of the sign choices of the eigenvectors that give a rotation, the one closest to
    the identity (largest trace) is kept.
    """
    d = cov_f.shape[0]
    _, e_f = jnp.linalg.eigh(cov_f)
    _, e_m = jnp.linalg.eigh(cov_m)
    signs = jnp.array(list(itertools.product((1.0, -1.0), repeat=d)))
    cands = jnp.einsum("ij,sj,kj->sik", e_m, signs, e_f)
    score = jnp.trace(cands, axis1=1, axis2=2)
    score = jnp.where(jnp.linalg.det(cands) > 0, score, -jnp.inf)
    return cands[jnp.argmax(score)]


def pool(x, factor: int, d: int):
    """Mean over non-overlapping ``factor`` cells of the first ``d`` axes (any rest kept)."""
    if factor == 1:
        return x
    window = (factor,) * d + (1,) * (x.ndim - d)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, "VALID")
    return total / factor**d


def sample_grid(shape, max_points: int):
    """Strided voxel positions ``(N, d)`` of a grid (stride >= 1), N <= max_points."""
    stride = 1
    while int(np.prod([-(-n // stride) for n in shape])) > max_points:
        stride += 1
    axes = [np.arange(0, n, stride, dtype=np.float32) for n in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return stride, grid.reshape(-1, len(shape))


def interpolate(volume, coords):
    """Linear interpolation of ``volume`` ``(*S, C)`` at ``coords`` ``(N, d)``.

    Zero outside. Returns ``(values (N, C), inside (N,))``, ``inside`` 1.0 where the
    position lies within the volume's voxel centres. Differentiable in ``coords``; the
    volume is only gathered. The values are :mod:`jaxreg.warping`'s own sampling (its
    plain, autodiff form, whose gradient with respect to ``coords`` needs no scatter).
    """
    d = coords.shape[-1]
    shape = volume.shape[:d]
    inside = 1.0
    for a in range(d):
        x = coords[:, a]
        inside = inside * ((x >= 0.0) & (x <= shape[a] - 1.0)).astype(jnp.float32)
    return warping._trilinear(volume, coords), inside


def weighted_ncc(a, b, w):
    """Minus the weighted Pearson correlation of two ``(N,)`` vectors."""
    n = jnp.maximum(jnp.sum(w), 1.0)
    da = a - jnp.sum(a * w) / n
    db = b - jnp.sum(b * w) / n
    cov = jnp.sum(w * da * db)
    return -cov / jnp.sqrt(jnp.sum(w * da**2) * jnp.sum(w * db**2) + 1e-12)
