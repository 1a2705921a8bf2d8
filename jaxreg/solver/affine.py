"""Rigid and affine registration of two images, and the transform's fields and files.

:func:`register_affine` aligns a pair before the deformable solver (whose coarse stage
only searches a few voxels). It initialises from the images' centres of mass (and
principal axes), then minimises a similarity of the moving image, resampled by the
transform at a subsample of fixed voxels, with Adam over a pyramid of average-pooled
copies (coarse to fine, a cosine-decayed step per level), in one compiled program per
pair shape. Parameters: see ``jaxreg/solver/affine_parts.py`` (rotation, translation in mm,
log-scales and shears for ``kind="affine"``, around the centres of mass).

Conventions. Like jaxreg's fields (:mod:`jaxreg.warping`), the result maps FIXED voxel
coordinates to MOVING voxel coordinates (pull): ``resampled(x) = moving(matrix @ x)``.
Given the images' voxel-to-world affines (RAS+ mm, as :class:`jaxreg.io.Volume` holds),
``world = moving_affine @ matrix @ inv(fixed_affine)`` maps fixed world points to moving
world points, the direction of ITK's transforms; :func:`save_itk` writes it in ITK's
LPS convention for ANTs/ITK/Slicer. Any ``d`` works for ``d``-dimensional images
(``(H, W)`` with 3x3 matrices, ``(H, W, D)`` with 4x4); ITK files are 3D only.

Speed (2-core CPU, 192x224x184 MNI T1 pair, :func:`config_for_shape`'s pyramid 8, 4, 2,
15000 points a level), measured on a quiet machine: 0.31-0.36 s a call with MIND-SSC,
0.42-0.47 s with MI, 0.16-0.23 s with NCC; compilation 4.5-6 s (first call).

Affine then deformable: the deformable stage registers fixed with the moving image
resampled by the affine, ``warped(x) = moving(A(x + u(x)))``; :func:`compose` gives that
total field ``A(x + u(x)) - x`` exactly, and :func:`displacement` the affine's own field.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from jaxreg import compilation
from jaxreg.features import mind
from jaxreg.io import atomic
from jaxreg.losses import mi as mi_lib
from jaxreg.solver import affine_parts as parts

__all__ = ["AffineConfig", "AffineResult", "config_for_shape", "register_affine",
           "displacement", "compose", "world_matrix", "save_itk"]


@dataclasses.dataclass(frozen=True)
class AffineConfig:
    """Settings of :func:`register_affine` (static under jit).

    Attributes:
      kind: ``"rigid"`` (rotation, translation) or ``"affine"`` (+ scales, shears).
      similarity: ``"mind"`` (mean squared difference of MIND-SSC descriptors; the
        moving image's descriptors are computed once and resampled, not recomputed on
        the resampled image, and since MIND-SSC is not rotation invariant that leaves
        about 0.5 voxel of error after a 10-degree rotation: measured 0.49 mean against
        0.25 with MI on the MNI pair; the deformable stage removes it),
        ``"ncc"`` (global normalised cross-correlation) or ``"mi"`` (Parzen mutual
        information, :mod:`jaxreg.losses.mi`, settings ``mi``).
      levels: pooling factors of the pyramid, coarse to fine.
      iterations: Adam iterations per level.
      learning_rate: Adam step at the start of each level, in voxels of that level
        (millimetres of periphery motion for rotations, scales and shears).
      init: ``"moments"`` (centres of mass and principal axes; the axes are kept only if
        they score better than none at the coarsest level), ``"com"`` (centres of mass)
        or ``"identity"`` (the headers' alignment).
      max_points: most fixed voxels sampled per level (a strided subgrid).
      mind_radius, mind_dilation: MIND-SSC settings (:func:`jaxreg.features.mind.mind_ssc`).
      mi: mutual information settings for ``similarity="mi"``.

    Raises:
      ValueError: a field is out of range (named in the message).
    """

    kind: str = "affine"
    similarity: str = "mind"
    levels: tuple[int, ...] = (8, 4, 2)
    iterations: tuple[int, ...] = (100, 40, 20)
    learning_rate: float = 0.5
    init: str = "moments"
    max_points: int = 15000
    mind_radius: int = 1
    mind_dilation: int = 2
    mi: mi_lib.MIConfig = mi_lib.MIConfig()

    def __post_init__(self):
        for name, allowed in (("kind", ("rigid", "affine")),
                              ("similarity", ("mind", "ncc", "mi")),
                              ("init", ("moments", "com", "identity"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"AffineConfig.{name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        ints = lambda seq: isinstance(seq, tuple) and seq and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in seq)
        if not ints(self.levels) or not ints(self.iterations) or len(self.levels) != len(
                self.iterations):
            raise ValueError("AffineConfig.levels and .iterations must be tuples of integers "
                             f">= 1 of one length, got {self.levels!r}, {self.iterations!r}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(
                self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"AffineConfig.learning_rate must be finite > 0, got "
                             f"{self.learning_rate!r}")
        if not isinstance(self.mi, mi_lib.MIConfig):
            raise ValueError(f"AffineConfig.mi must be a MIConfig, got {self.mi!r}")
        for name, low in (("max_points", 1), ("mind_radius", 0), ("mind_dilation", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"AffineConfig.{name} must be an integer >= {low}, got "
                                 f"{value!r}")


def config_for_shape(shape: tuple[int, ...], **overrides) -> AffineConfig:
    """Default settings with a pyramid that suits an image of ``shape``.

    The finest level pools by 2 above two million voxels (the 2 s budget at
    192x224x184 on two cores), else by 1; two coarser levels double it, and levels that
    leave fewer than 6 voxels along an axis are dropped.

    Args:
      shape: the fixed image's shape.
      **overrides: other :class:`AffineConfig` fields (``kind``, ``similarity``...).
    """
    finest = 2 if math.prod(shape) > 2_000_000 else 1
    factors = [f for f in (4 * finest, 2 * finest, finest) if min(shape) // f >= 6]
    factors = factors or [1]
    iterations = (100, 40, 20)[-len(factors):]
    return AffineConfig(**{"levels": tuple(factors), "iterations": iterations, **overrides})


@dataclasses.dataclass(frozen=True, eq=False)
class AffineResult:
    """The outcome of :func:`register_affine`.

    Attributes:
      matrix: ``(d+1, d+1)`` float64, fixed voxel -> moving voxel.
      world: ``(d+1, d+1)`` float64, fixed world -> moving world (RAS mm), or None
        without the images' affines.
      initial: the initialisation's fixed voxel -> moving voxel matrix.
      loss: the similarity at the last step of the finest level (before its last update).
    """

    matrix: np.ndarray
    world: np.ndarray | None
    initial: np.ndarray
    loss: float


def _features(image, config):
    if config.similarity == "mind":
        return mind.mind_ssc(image, radius=config.mind_radius, dilation=config.mind_dilation)
    return image[..., None]


def _level(fixed, moving, mask, moving_mask, factor, config):
    """One pyramid level: sampled fixed features, the moving features, weights."""
    d = fixed.ndim
    pf = parts.pool(fixed, factor, d)
    pm = parts.pool(moving, factor, d)
    feats_f = _features(pf, config)
    stride, grid = parts.sample_grid(pf.shape, config.max_points)
    sub = tuple(slice(None, None, stride) for _ in range(d))
    weights = jnp.ones(grid.shape[0]) if mask is None else parts.pool(mask, factor, d)[
        sub].ravel()
    level = {"points": jnp.asarray(grid * factor + (factor - 1) / 2.0),
             "fixed": feats_f[sub].reshape(grid.shape[0], -1), "weights": weights,
             "moving": _features(pm, config), "factor": factor}
    if moving_mask is not None:
        level["moving_mask"] = parts.pool(moving_mask, factor, d)[..., None]
    if config.similarity == "mi":  # the fixed points' Parzen weights, once per level
        cfg = config.mi
        range_f = mi_lib.intensity_range(pf, mask=None if mask is None else parts.pool(
            mask, factor, d), percentiles=cfg.percentiles)
        level["fixed"] = mi_lib.parzen_weights(
            mi_lib.bin_coords(level["fixed"][:, 0], range_f, cfg.bins), bins=cfg.bins,
            kernel=cfg.kernel, sigma=cfg.sigma)
        level["range_m"] = mi_lib.intensity_range(pm, percentiles=cfg.percentiles)
    return level


def _level_loss(params, frame, level, config):
    d = level["points"].shape[-1]
    m = parts.voxel_matrix(params, frame)
    y = level["points"] @ m[:d, :d].T + m[:d, d]
    f = level["factor"]
    at = (y - (f - 1) / 2.0) / f  # the level's voxel coordinates of the moved points
    values, inside = parts.interpolate(level["moving"], at)
    w = level["weights"] * inside
    if "moving_mask" in level:  # held constant: leaving the mask must not lower the loss
        in_mask, _ = parts.interpolate(level["moving_mask"], at)
        w = w * jax.lax.stop_gradient(in_mask[:, 0])
    if config.similarity == "mind":
        sq = jnp.mean((values - level["fixed"]) ** 2, axis=-1)
        return jnp.sum(w * sq) / jnp.maximum(jnp.sum(w), 1.0)
    if config.similarity == "ncc":
        return parts.weighted_ncc(values[:, 0], level["fixed"][:, 0], w)
    cfg = config.mi
    w_m = mi_lib.parzen_weights(mi_lib.bin_coords(values[:, 0], level["range_m"], cfg.bins),
                                bins=cfg.bins, kernel=cfg.kernel, sigma=cfg.sigma)
    table = w_m.T @ (level["fixed"] * w[:, None])
    return mi_lib.loss_from_table(table / jnp.maximum(jnp.sum(table), 1e-10),
                                  normalised=cfg.normalised)


def _optimise(params, frame, level, iterations, lr, config):
    """Adam on one level; returns the parameters and the loss of the last step's
    parameters (the value the last gradient came with: no separate evaluation, whose
    tracing cost a warm process about 0.1 s per level)."""
    opt = optax.adam(optax.cosine_decay_schedule(lr, iterations, alpha=0.02))
    loss_fn = lambda p: _level_loss(p, frame, level, config)

    def step(carry, _):
        p, state, _ = carry
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = opt.update(grads, state, p)
        return (optax.apply_updates(p, updates), state, loss), None

    init = (params, opt.init(params), jnp.zeros((), jnp.float32))
    (params, _, loss), _ = jax.lax.scan(step, init, None, length=iterations)
    return params, loss


def _frame(fixed, moving, mask, moving_mask, l_f, l_m, header, config):
    d, f = fixed.ndim, config.levels[-1]  # moments on the finest level's grid
    pooled = lambda x: None if x is None else parts.pool(x, f, d)
    c_f, cov_f = parts.moments(pooled(fixed), pooled(mask), l_f * f)
    c_m, cov_m = parts.moments(pooled(moving), pooled(moving_mask), l_m * f)
    c_f, c_m = c_f * f + (f - 1) / 2.0, c_m * f + (f - 1) / 2.0
    if config.init == "identity":
        c_f = (jnp.asarray(fixed.shape, jnp.float32) - 1.0) / 2.0
        c_m = header[:d, :d] @ c_f + header[:d, d]
    radius = jnp.maximum(jnp.sqrt(jnp.trace(cov_f)), 1.0)
    frame = {"c_f": c_f, "c_m": c_m, "l_f": l_f, "inv_l_m": jnp.linalg.inv(l_m),
             "q0": jnp.eye(d), "radius": radius}
    return frame, parts.principal_rotation(cov_f, cov_m)


# XLA's default options (YNNPACK's fusions on): 0.40 s a call on the 2-core CPU against
# 0.33 s without them, but the matrix moves by up to 0.035 (float summation order); kept
# as measured. Exported once per shape and settings (jaxreg.compilation.use_caches).
@compilation.jit(static_argnames=("config",), cpu_options=False, export=True)
def _solve(fixed, moving, mask, moving_mask, l_f, l_m, header, config):
    """The compiled registration: (matrix, initial matrix, final loss)."""
    d = fixed.ndim
    frame, q_axes = _frame(fixed, moving, mask, moving_mask, l_f, l_m, header, config)
    levels = [_level(fixed, moving, mask, moving_mask, f, config) for f in config.levels]
    params = jnp.zeros(parts.n_params(d, config.kind))
    if config.init == "moments":  # keep the principal axes only if they help
        q0s = jnp.stack([frame["q0"], q_axes])
        scores = jax.vmap(lambda q: _level_loss(params, dict(frame, q0=q), levels[0],
                                                config))(q0s)
        frame = dict(frame, q0=q0s[jnp.argmin(scores)])
    initial = parts.voxel_matrix(params, frame)
    spacing = jnp.mean(jnp.linalg.norm(l_f, axis=0))
    loss = jnp.zeros(())
    for level, iterations in zip(levels, config.iterations):
        lr = config.learning_rate * level["factor"] * spacing
        params, loss = _optimise(params, frame, level, iterations, lr, config)
    return parts.voxel_matrix(params, frame), initial, loss


def _check_affine(name, affine, d):
    a = np.asarray(affine, np.float64)
    if a.shape != (d + 1, d + 1) or not np.all(np.isfinite(a)) or abs(
            np.linalg.det(a[:d, :d])) < 1e-12:
        raise ValueError(f"register_affine: {name} must be a finite invertible "
                         f"{d + 1}x{d + 1} matrix, got shape {a.shape}")
    return a


def _check_inputs(fixed, moving, mask, moving_mask, config):
    if fixed.ndim not in (2, 3) or moving.ndim != fixed.ndim:
        raise ValueError("register_affine: fixed and moving must both be 2D or both 3D "
                         f"images, got {fixed.shape} and {moving.shape}")
    if mask is not None and mask.shape != fixed.shape:
        raise ValueError(f"register_affine: mask shape {mask.shape} does not match fixed "
                         f"{fixed.shape}")
    if moving_mask is not None and moving_mask.shape != moving.shape:
        raise ValueError(f"register_affine: moving_mask shape {moving_mask.shape} does not "
                         f"match moving {moving.shape}")
    for f in config.levels:
        for name, shape in (("fixed", fixed.shape), ("moving", moving.shape)):
            if min(shape) // f < 4:
                raise ValueError(f"register_affine: {name} {shape} is too small for "
                                 f"pyramid level {f} (needs >= 4 voxels per axis)")


def register_affine(fixed: ArrayLike, moving: ArrayLike, *,
                    config: AffineConfig = AffineConfig(),
                    fixed_affine: ArrayLike | None = None,
                    moving_affine: ArrayLike | None = None,
                    mask: ArrayLike | None = None,
                    moving_mask: ArrayLike | None = None) -> AffineResult:
    """Rigid or affine registration of ``moving`` onto ``fixed``.

    Args:
      fixed, moving: ``(H, W)`` or ``(H, W, D)`` intensity images (shapes may differ).
      config: :class:`AffineConfig`.
      fixed_affine, moving_affine: the images' voxel-to-world matrices (both or
        neither); they set the millimetre frame (a rigid transform is rigid in the
        world) and the result's ``world`` matrix.
      mask: optional fixed-grid weights (1: voxels that count).
      moving_mask: optional moving-grid weights: a fixed point counts as much as the
        moving mask where the transform sends it (held constant in the gradient); the
        moving image's centre of mass is taken inside it.

    Returns:
      :class:`AffineResult`; ``matrix`` maps fixed voxels to moving voxels.

    Raises:
      ValueError: mismatched dimensions, mask shape, affines, or an image too small
        for the pyramid.
    """
    fixed = jnp.asarray(fixed, jnp.float32)
    moving = jnp.asarray(moving, jnp.float32)
    mask = None if mask is None else jnp.asarray(mask, jnp.float32)
    moving_mask = None if moving_mask is None else jnp.asarray(moving_mask, jnp.float32)
    _check_inputs(fixed, moving, mask, moving_mask, config)
    d = fixed.ndim
    if (fixed_affine is None) != (moving_affine is None):
        raise ValueError("register_affine: give both fixed_affine and moving_affine, or "
                         "neither")
    a_f = a_m = np.eye(d + 1)
    if fixed_affine is not None:
        a_f = _check_affine("fixed_affine", fixed_affine, d)
        a_m = _check_affine("moving_affine", moving_affine, d)
    header = np.linalg.inv(a_m) @ a_f
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    matrix, initial, loss = _solve(fixed, moving, mask, moving_mask, f32(a_f[:d, :d]),
                                   f32(a_m[:d, :d]),
                                   f32(header), config=config)
    matrix = np.asarray(matrix, np.float64)
    world = None if fixed_affine is None else world_matrix(matrix, a_f, a_m)
    return AffineResult(matrix=matrix, world=world,
                        initial=np.asarray(initial, np.float64), loss=float(loss))


def world_matrix(matrix: ArrayLike, fixed_affine: ArrayLike,
                 moving_affine: ArrayLike) -> np.ndarray:
    """``moving_affine @ matrix @ inv(fixed_affine)``: fixed world -> moving world."""
    return (np.asarray(moving_affine, np.float64) @ np.asarray(matrix, np.float64)
            @ np.linalg.inv(np.asarray(fixed_affine, np.float64)))


def _split(matrix, d, where):
    m = jnp.asarray(matrix, jnp.float32)
    if m.shape != (d + 1, d + 1):
        raise ValueError(f"{where}: matrix must be {d + 1}x{d + 1} for {d}D, got {m.shape}")
    return m[:d, :d], m[:d, d]


def displacement(matrix: ArrayLike, shape: tuple[int, ...]) -> jax.Array:
    """The affine's displacement field on the fixed grid, in voxels.

    Args:
      matrix: ``(d+1, d+1)`` fixed voxel -> moving voxel.
      shape: the fixed grid, ``d`` ints.

    Returns:
      ``(*shape, d)`` float32, ``matrix @ x - x`` (use with :func:`jaxreg.warping.warp`).
    """
    lin, off = _split(matrix, len(shape), "displacement")
    grid = parts._coords(tuple(int(s) for s in shape))
    return grid @ (lin - jnp.eye(len(shape))).T + off


def compose(matrix: ArrayLike, disp: ArrayLike) -> jax.Array:
    """Total field of "affine, then a deformable field on the affinely resampled image".

    With ``warped(x) = moving(A(x + u(x)))`` the total displacement is
    ``A(x + u(x)) - x``, exact (no resampling of ``u``).

    Args:
      matrix: ``(d+1, d+1)`` fixed voxel -> moving voxel (``A``).
      disp: ``(*S, d)`` deformable field ``u`` on the fixed grid, voxels.

    Returns:
      ``(*S, d)`` float32 total field, for :func:`jaxreg.warping.warp` of the original
      moving image.
    """
    disp = jnp.asarray(disp, jnp.float32)
    d = disp.shape[-1]
    if disp.ndim != d + 1:
        raise ValueError(f"compose: field must be (*S, d) with d spatial axes, got "
                         f"{disp.shape}")
    lin, off = _split(matrix, d, "compose")
    grid = parts._coords(disp.shape[:-1])
    return (grid + disp) @ lin.T + off - grid


def save_itk(path: str | os.PathLike, world: ArrayLike) -> None:
    """Writes a 3D world transform (fixed -> moving, RAS) as an ITK/ANTs affine file.

    ITK's convention (LPS, fixed points to moving points) via ``nitransforms``: ``.mat``
    gives ANTs' binary ``AffineTransform_double_3_3`` (full precision), other names
    (``.tfm``, ``.txt``) ITK's text format, which nitransforms writes as
    ``AffineTransform_float_3_3`` with six significant digits. Written atomically.

    Args:
      path: the file.
      world: ``(4, 4)`` matrix, e.g. :attr:`AffineResult.world`.

    Raises:
      ValueError: not a finite 4x4 matrix with last row ``0 0 0 1``.
    """
    try:  # a dependency of this writer only
        from nitransforms import linear as nt_linear  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError("save_itk needs the nitransforms package (pip install "
                          "nitransforms)") from e
    w = np.asarray(world, np.float64)
    if w.shape != (4, 4) or not np.all(np.isfinite(w)) or not np.allclose(w[3], [0, 0, 0, 1]):
        raise ValueError(f"save_itk: {os.fspath(path)}: world must be a finite 4x4 affine "
                         f"matrix, got shape {w.shape}")
    suffix = ".mat" if os.fspath(path).endswith(".mat") else ".tfm"
    with atomic.atomic_path(path, suffix=suffix) as tmp:
        nt_linear.Affine(w).to_filename(tmp, fmt="itk")
