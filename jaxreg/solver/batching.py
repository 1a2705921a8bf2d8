"""Batching subject pairs of mixed sizes: shape buckets, padding, vmap and sharding.

The solver (:mod:`jaxreg.solver`) is written for one pair. To run many pairs at once
they must share one shape, so this module

1. groups pairs into buckets of one padded shape (:func:`plan_buckets`), each side a
   multiple of the pooling factors so that pooling divides evenly;
2. pads each pair's features at the end of every axis (:func:`pad_to`) and registers
   them with the padding kept out of every stage (:func:`register_padded`, given the
   pair's real size, its ``extent``), so that a padded pair's field on its own voxels is
   the one the unpadded pair gets;
3. runs a stack of padded pairs with ``jax.vmap`` on one device and, given a 1-D
   :class:`jax.sharding.Mesh`, shards the pair axis over its devices
   (:func:`register_batch`): one compilation per bucket shape and batch size;
4. estimates the peak memory of one pair (:func:`estimate_pair_bytes`) and how many
   pairs fit a device (:func:`plan_batch`, :func:`device_memory_bytes`).

The solver sees feature volumes only, whatever made them (:mod:`jaxreg.features.sources`:
MIND-SSC or an encoder). A typical loop over a data set::

    mesh = jax.make_mesh((jax.device_count(),), ("pairs",))
    source = jaxreg.features.sources.MindSource()
    for bucket in plan_buckets([p["fixed"].shape for p in pairs]):
        feats = [source(pairs[i]["fixed"], pairs[i]["moving"]) for i in bucket.indices]
        fixed = np.stack([pad_to(f.fixed, bucket.shape) for f in feats])
        moving = np.stack([pad_to(f.moving, bucket.shape) for f in feats])
        extents = np.array([pairs[i]["fixed"].shape for i in bucket.indices])
        fields = register_batch(fixed, moving, extents, config=config, mesh=mesh)
        # crop fields[j][:h, :w, :d] back to pair j's own shape.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from jaxreg import compilation
from jaxreg.kernels import cpu as cpu_kernels
from jaxreg.solver.config import ConvexAdamConfig
from jaxreg.solver.convexadam import convex_adam

__all__ = [
    "Bucket",
    "plan_buckets",
    "pad_to",
    "register_padded",
    "pad_batch",
    "register_batch",
    "estimate_pair_bytes",
    "device_memory_bytes",
    "plan_batch",
]

_GIB = 2.0**30


class Bucket(NamedTuple):
    """Pairs registered together at one padded shape.

    Attributes:
      shape: the padded grid ``(H, W, D)``.
      indices: positions of the bucket's pairs in the list given to :func:`plan_buckets`.
    """

    shape: tuple[int, int, int]
    indices: tuple[int, ...]


def _round_up(shape: Sequence[int], multiple: int) -> tuple[int, ...]:
    return tuple(int(-(-int(s) // multiple) * multiple) for s in shape)


def plan_buckets(shapes: Sequence[Sequence[int]], *, multiple: int = 6,
                 max_waste: float = 0.3) -> list[Bucket]:
    """Groups pair shapes into buckets of one padded shape.

    Each shape is first rounded up, side by side, to a multiple of ``multiple`` (use
    ``math.lcm(config.grid_sp, config.grid_sp_adam)`` so that both poolings divide the
    grid). Rounded shapes are then taken largest volume first and merged into the bucket
    whose shape (the side-wise maximum of its members) grows least, as long as no member
    would be padded by more than ``max_waste`` of its rounded volume; otherwise a new
    bucket opens. Fewer buckets mean fewer compilations, more waste means slower runs.

    Args:
      shapes: ``(H, W, D)`` of each pair's fixed grid.
      multiple: every side of a bucket shape is a multiple of it.
      max_waste: the largest allowed ``prod(bucket) / prod(rounded shape) - 1`` of any
        member (0 merges only equal rounded shapes).

    Returns:
      Buckets, largest shape first; indices in input order within each bucket.

    Raises:
      ValueError: a shape is not three positive sizes, or ``multiple < 1`` or
        ``max_waste < 0``.

    >>> plan_buckets([(24, 30, 18), (20, 28, 16), (40, 40, 40)])
    [Bucket(shape=(42, 42, 42), indices=(2,)), Bucket(shape=(24, 30, 18), indices=(0, 1))]
    """
    if multiple < 1:
        raise ValueError(f"plan_buckets: multiple must be >= 1, got {multiple}")
    if max_waste < 0:
        raise ValueError(f"plan_buckets: max_waste must be >= 0, got {max_waste}")
    rounded = []
    for i, s in enumerate(shapes):
        s = tuple(int(v) for v in s)
        if len(s) != 3 or min(s) < 1:
            raise ValueError(f"plan_buckets: shape {i} must be three positive sizes (H, W, D), "
                             f"got {s}")
        rounded.append(_round_up(s, multiple))
    order = sorted(range(len(rounded)), key=lambda i: (-math.prod(rounded[i]), i))
    buckets: list[tuple[tuple[int, ...], list[int]]] = []
    for i in order:
        best = None
        for b, (shape, members) in enumerate(buckets):
            merged = tuple(max(a, c) for a, c in zip(shape, rounded[i]))
            volume = math.prod(merged)
            if all(volume <= (1.0 + max_waste) * math.prod(rounded[j]) for j in members + [i]):
                growth = volume - math.prod(shape)
                if best is None or growth < best[0]:
                    best = (growth, b, merged)
        if best is None:
            buckets.append((rounded[i], [i]))
        else:
            _, b, merged = best
            buckets[b] = (merged, buckets[b][1] + [i])
    return [Bucket(tuple(shape), tuple(sorted(members))) for shape, members in buckets]


def pad_to(volume: ArrayLike, shape: Sequence[int]) -> np.ndarray | jax.Array:
    """Zero-pads a volume at the end of each spatial axis to ``shape``.

    Args:
      volume: ``(h, w, d)`` or ``(h, w, d, C)``, each side at most the target's; a jax
        array stays on its device, anything else becomes numpy (a batch is then stacked
        on the host and goes to the devices once, already split).
      shape: the target ``(H, W, D)``.

    Returns:
      ``(H, W, D[, C])`` in the input's dtype. The pair's real size, its ``extent``, is
      its own shape ``(h, w, d)``.

    Raises:
      ValueError: the volume is larger than ``shape`` along some axis.
    """
    xp = jnp if isinstance(volume, jax.Array) else np
    volume = xp.asarray(volume)
    shape = tuple(int(s) for s in shape)
    if volume.ndim < 3 or len(shape) != 3 or any(v > s for v, s in zip(volume.shape, shape)):
        raise ValueError(f"pad_to: volume of shape {volume.shape} does not fit in {shape}")
    widths = [(0, s - v) for v, s in zip(volume.shape[:3], shape)]
    return xp.pad(volume, widths + [(0, 0)] * (volume.ndim - 3))


@compilation.jit(static_argnames=("config",))
def register_padded(fixed: ArrayLike, moving: ArrayLike, extent: ArrayLike, *,
                    config: ConvexAdamConfig = ConvexAdamConfig()
                    ) -> jax.Array:
    """ConvexAdam on the ``(H, W, D, C)`` features of one pair padded at the end.

    The padding is kept out of every stage (``extent`` of
    :func:`jaxreg.convex_adam`), so the field on the real voxels ``[:h, :w, :d]``
    equals :func:`jaxreg.convex_adam` of the unpadded features up to float
    rounding, whatever the padding holds.

    Args:
      fixed, moving: ``(H, W, D, C)`` features on one padded grid, each side a multiple
        of ``lcm(grid_sp, grid_sp_adam)``.
      extent: ``(3,)`` integers, the pair's real size ``(h, w, d)`` (may be traced).
      config: solver settings (static: one compilation per config and shape).

    Returns:
      ``(H, W, D, 3)`` float32 voxel displacement (pull convention); crop it to the
      pair's own shape.

    Raises:
      ValueError: the features are not two ``(H, W, D, C)`` of one shape, or ``extent``
        is not 3 sizes.
    """
    f = jnp.asarray(fixed, jnp.float32)
    m = jnp.asarray(moving, jnp.float32)
    extent = jnp.asarray(extent, jnp.int32)
    if f.ndim != 4 or f.shape != m.shape or extent.shape != (3,):
        raise ValueError(f"register_padded: features (H, W, D, C) of one shape and a (3,) "
                         f"extent, got {f.shape}, {m.shape} and {extent.shape}")
    return convex_adam(f, m, config=config, extent=extent)


def pad_batch(x: ArrayLike, multiple: int) -> tuple[np.ndarray | jax.Array, int]:
    """Pads the leading (pair) axis with copies of the last pair to a multiple.

    Args:
      x: ``(B, ...)`` stack of pairs, ``B >= 1``. A host (numpy) stack stays on the host,
        so that it goes to the devices once, already split.
      multiple: e.g. the number of devices the pair axis is sharded over.

    Returns:
      ``(padded, B)``: ``(B', ...)`` with ``B'`` the smallest multiple of ``multiple``
      not below ``B``, and the original count, to drop the copies with ``out[:B]``.

    Raises:
      ValueError: the stack is empty or ``multiple < 1``.
    """
    xp = jnp if isinstance(x, jax.Array) else np
    x = xp.asarray(x)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"pad_batch: need at least one pair, got shape {x.shape}")
    if multiple < 1:
        raise ValueError(f"pad_batch: multiple must be >= 1, got {multiple}")
    n = x.shape[0]
    extra = -n % multiple
    if extra:
        x = xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)], axis=0)
    return x, n


@functools.lru_cache(maxsize=None)
def _batched(config: ConvexAdamConfig, mesh: Mesh | None, batch_axis: str):
    """The jitted batched registration for one config and mesh (cached: one jit object,
    so jax's own cache compiles once per bucket shape and batch size)."""
    many = jax.vmap(functools.partial(register_padded, config=config))
    if mesh is None:
        return compilation.jit(many)
    spec = PartitionSpec(batch_axis)
    # shard_map: each device runs the vmap on its own slice of pairs, no communication.
    sharded = jax.shard_map(many, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
    sharding = NamedSharding(mesh, spec)
    return compilation.jit(sharded, in_shardings=(sharding,) * 3, out_shardings=sharding)


def register_batch(fixed: ArrayLike, moving: ArrayLike, extents: ArrayLike, *,
                   config: ConvexAdamConfig = ConvexAdamConfig(),
                   mesh: Mesh | None = None, batch_axis: str = "pairs") -> jax.Array:
    """Registers a stack of padded pairs: ``vmap`` on a device, sharded across a mesh.

    Args:
      fixed, moving: ``(B, H, W, D, C)`` feature stacks, each pair padded at the end as
        :func:`register_padded` takes one.
      extents: ``(B, 3)`` integers, each pair's real size.
      config: solver settings.
      mesh: a 1-D mesh whose axis ``batch_axis`` the pairs are split over; ``None`` runs
        the whole batch with ``jax.vmap`` on the default device. ``B`` need not be a
        multiple of the mesh size: the batch is padded with copies of the last pair
        (:func:`pad_batch`) and the copies' results dropped.
      batch_axis: the mesh axis name.

    Returns:
      ``(B, H, W, D, 3)`` float32 fields, sharded over ``mesh`` when given and ``B`` is a
      multiple of its size, else replicated over it.

    Raises:
      ValueError: the stacks are not ``(B, H, W, D, C)`` of one shape with ``(B, 3)``
        extents within the grid, or ``mesh`` does not have the axis ``batch_axis``.
    """
    shapes = [tuple(jnp.shape(a)) for a in (fixed, moving)]
    extents = np.asarray(extents)
    if (len(shapes[0]) != 5 or shapes[0] != shapes[1] or extents.shape != (shapes[0][0], 3)
            or np.any(extents < 1) or np.any(extents > np.asarray(shapes[0][1:4]))):
        raise ValueError(f"register_batch: fixed and moving must be (B, H, W, D, C) of one "
                         f"shape and extents (B, 3) sizes within (H, W, D), got {shapes[0]}, "
                         f"{shapes[1]} and extents {extents.tolist()}")
    extents = extents.astype(np.int32)
    fn = _batched(config, mesh, batch_axis)
    if mesh is None:
        return fn(fixed, moving, extents)
    if batch_axis not in mesh.axis_names:
        raise ValueError(f"register_batch: mesh axes {mesh.axis_names} lack {batch_axis!r}")
    devices = mesh.shape[batch_axis]
    sharding = NamedSharding(mesh, PartitionSpec(batch_axis))
    args = []
    for a in (fixed, moving):
        a = a.astype(jnp.float32) if isinstance(a, jax.Array) else np.asarray(a, np.float32)
        a, n = pad_batch(a, devices)
        args.append(jax.device_put(a, sharding))
    args.append(jax.device_put(pad_batch(extents, devices)[0], sharding))
    out = fn(*args)
    if out.shape[0] != n:
        # A batch of n pairs cannot be split evenly: drop the copies from a replicated view.
        out = jax.device_put(out, NamedSharding(mesh, PartitionSpec()))[:n]
    return out


def estimate_pair_bytes(shape: Sequence[int], *,
                        config: ConvexAdamConfig = ConvexAdamConfig(),
                        channels: int = 12) -> int:
    """Estimated peak bytes of :func:`register_padded` for one pair.

    Counts float32 arrays in voxels of the full grid ``N = H * W * D``, the coarse grid
    ``n_c = N / grid_sp**3`` and the fine grid ``n_f = N / grid_sp_adam**3``, with
    ``C = channels`` and ``K = (2 * disp_hw + 1)**3`` offsets:

    * always held: both feature volumes ``2 C N`` and the output field ``3 N``;
    * plus the larger of the two stages:

      - coarse stage: the cost volume of each direction (``K n_c``, two with inverse
        consistency), the pooled features ``2 C n_c``, and ``(C + 13) N`` of
        full-resolution temporaries XLA keeps alive alongside (the upsampled field and
        its resize steps): a calibrated term;
      - fine stage: the coarse field ``3 N`` and ``14 C n_f`` for the pooled features,
        the warped features and their residuals and gradients inside the Adam scan
        (independent of the number of iterations); ``7 C n_f`` where the compiled CPU
        kernel computes the similarity (``config.cpu_kernel`` on CPU, see
        :mod:`jaxreg.losses`), which writes no warped copy of the features;

    then adds 10 % margin. Calibrated on XLA's CPU ``memory_analysis`` of
    :func:`register_padded` (arguments + output + temporaries), which it bounds from
    above within a factor 1.5 (``pytest tests/test_batching.py -k memory_estimate``
    checks three shapes and configs). Other backends assign buffers differently; a
    ``vmap`` over ``B`` pairs needs about ``B`` times this. The features themselves are
    made before (:mod:`jaxreg.features.sources`), one pair at a time.

    Args:
      shape: the padded grid ``(H, W, D)``.
      config: solver settings.
      channels: feature channels (12 for MIND-SSC).

    Returns:
      Bytes, an integer.
    """
    h, w, d = (int(s) for s in shape)
    n = h * w * d
    nc = n / config.grid_sp**3
    nf = n / config.grid_sp_adam**3
    k = (2 * config.disp_hw + 1) ** 3
    held = 3 * n + 2 * channels * n
    stages = [
        (channels + 13) * n + ((2 if config.ic else 1) * k + 2 * channels) * nc,
    ]
    if config.lambda_weight > 0:
        fused = config.cpu_kernel and cpu_kernels.usable()
        stages.append(3 * n + (7 if fused else 14) * channels * nf)
    return int(4 * 1.1 * (held + max(stages)))


def device_memory_bytes(device: jax.Device | None = None) -> int:
    """Memory available to one device, in bytes.

    ``device.memory_stats()["bytes_limit"]`` where the backend reports it (GPU, TPU);
    otherwise (CPU) the host's physical RAM divided among the process's devices of that
    platform, since host devices share it.

    Args:
      device: a device; ``None`` for ``jax.devices()[0]``.

    Returns:
      Bytes, an integer.
    """
    device = jax.devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram // max(1, len(jax.local_devices(backend=device.platform))))


def plan_batch(shape: Sequence[int], *,
               config: ConvexAdamConfig = ConvexAdamConfig(),
               device_bytes: int, batch_per_device: int | None = None,
               channels: int = 12) -> int:
    """How many pairs of one padded shape to run per device.

    Args:
      shape: the padded grid ``(H, W, D)``.
      config: solver settings.
      device_bytes: memory of one device (e.g. :func:`device_memory_bytes`).
      batch_per_device: the user's cap (``None``: as many as fit).
      channels: feature channels.

    Returns:
      ``min(device_bytes // estimate_pair_bytes(...), batch_per_device)``, at least 1.

    Raises:
      ValueError: one pair does not fit in ``device_bytes``, or ``batch_per_device < 1``.
    """
    if batch_per_device is not None and batch_per_device < 1:
        raise ValueError(f"plan_batch: batch_per_device must be >= 1, got {batch_per_device}")
    per_pair = estimate_pair_bytes(shape, config=config, channels=channels)
    fits = int(device_bytes // per_pair)
    if fits < 1:
        raise ValueError(
            f"plan_batch: one pair of shape {tuple(int(s) for s in shape)} needs "
            f"~{per_pair / _GIB:.2f} GiB, the device has {device_bytes / _GIB:.2f} GiB; "
            f"use a smaller grid (crop or downsample), a smaller disp_hw, or a larger device")
    return fits if batch_per_device is None else min(fits, batch_per_device)
