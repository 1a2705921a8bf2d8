"""Compiled CPU kernels for the fine stage's hot loop (used by jaxreg.losses and
jaxreg.solver when ``ConvexAdamConfig.cpu_kernel`` is on).

Why: XLA:CPU materialises each of the eight corner gathers of a trilinear warp as an
``(N, C)`` array before the fusion that reads them (it does not fuse a gather into a
consumer that reuses its elements), and runs each of the fine stage's 18 box filters per
Adam step (three smoothings, forward and transposed, three axes each) plus a division as
separate passes over the field. Two kernels replace them (source and what they compute:
``jaxreg/kernels/cpu_kernels.cc``):

- :func:`warp_ssd_terms`: one pass over the voxels computes the warped features' squared
  residuals and their derivative with respect to the displacement; nothing of size
  ``N x C`` is written.
- :func:`box_smooth`: the repeated box filters, one read and write per axis.

They are C++ against XLA's FFI headers (shipped in jaxlib), compiled on first use with
the system's C++ compiler (``$CXX``, else ``c++``, ``g++``, ``clang++``) into
``$JAXREG_CACHE_DIR/kernels`` (default ``~/.cache/jaxreg/kernels``), keyed by the source,
jaxlib's version, the compiler and the CPU; later processes load the cached library
(~5 s the first time). Without a compiler, when the build fails, or with
``$JAXREG_CPU_KERNEL=0``, :func:`available` is False (the reason is logged once) and the
callers use the XLA formulation.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
from absl import logging

SOURCE = (importlib.resources.files("jaxreg.kernels") / "cpu_kernels.cc").read_text()
"""The C++ of the two kernels (``cpu_kernels.cc`` beside this module)."""

__all__ = ["available", "usable", "warp_ssd_terms", "box_smooth", "match_varying"]

_TARGETS = {"warp_ssd": ("jaxreg_warp_ssd_f32", "JaxregWarpSsd"),
            "box_smooth": ("jaxreg_box_smooth_f32", "JaxregBoxSmooth")}
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
# Tried in order: the CPU's own instructions (AVX-512/AVX2 where present; measured 1.4x
# faster than the baseline build), then the compiler's baseline.
_ARCH_FLAGS = (("-march=native",), ())


def _cache_dir() -> str:
    """``$JAXREG_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxreg``, else ``~/.cache/jaxreg``."""
    if os.environ.get("JAXREG_CACHE_DIR"):
        return os.environ["JAXREG_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxreg")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """The CPU's model and instruction sets: a library built with -march=native for one
    CPU must not be loaded on another (a shared home folder)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return "".join(sorted({line for line in fh
                                   if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.machine() + platform.processor()


def _compile(compiler: str, folder: str, arch: tuple[str, ...]) -> str:
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = os.path.join(tmp, "kernels.cc")
        with open(src, "w") as fh:
            fh.write(SOURCE)
        out = os.path.join(tmp, "kernels.so")
        subprocess.run([compiler, *_FLAGS, *arch, f"-I{jax.ffi.include_dir()}", src, "-o", out],
                       check=True, capture_output=True, text=True, timeout=600)
        final = os.path.join(folder, _name(compiler))
        os.replace(out, final)  # atomic: a concurrent build writes an equivalent file
    return final


def _name(compiler: str) -> str:
    import jaxlib

    key = "\0".join((SOURCE, jaxlib.__version__, compiler, *_FLAGS, repr(_ARCH_FLAGS),
                     _cpu_id()))
    return f"kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _build(compiler: str) -> str:
    """The kernels' shared library, compiled into the cache unless already there."""
    folder = os.path.join(_cache_dir(), "kernels")
    path = os.path.join(folder, _name(compiler))
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    for i, arch in enumerate(_ARCH_FLAGS):
        try:
            return _compile(compiler, folder, arch)
        except subprocess.CalledProcessError:
            if i == len(_ARCH_FLAGS) - 1:
                raise
    raise AssertionError("unreachable")


_LOCK = threading.Lock()  # one build and registration per process, whichever thread asks
_AVAILABLE: list[bool] = []  # the answer, once known


def available() -> bool:
    """Whether the kernels are built (or loaded from the cache) and registered with XLA;
    decided once per process.

    ``$JAXREG_CPU_KERNEL=0`` turns them off for the whole process.
    """
    if not _AVAILABLE:
        with _LOCK:
            if not _AVAILABLE:
                _AVAILABLE.append(_load())
    return _AVAILABLE[0]


def _load() -> bool:
    if os.environ.get("JAXREG_CPU_KERNEL", "1") == "0":
        return False
    compiler = _compiler()
    if compiler is None:
        logging.warning("jaxreg: no C++ compiler ($CXX, c++, g++, clang++): the fine stage "
                        "uses XLA's gathers, about 3x slower on CPU")
        return False
    try:
        library = ctypes.cdll.LoadLibrary(_build(compiler))
        for target, symbol in _TARGETS.values():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")
    except (OSError, AttributeError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", None) or "")[-2000:]
        logging.warning("jaxreg: the CPU kernels did not build (%s%s): the fine stage uses "
                        "XLA's gathers, about 3x slower on CPU", e,
                        f"\n{detail}" if detail else "")
        return False
    return True


def usable() -> bool:
    """The kernels are available and jax computes on CPU."""
    return jax.default_backend() == "cpu" and available()


def _varying(x) -> frozenset:
    """The manual mesh axes (inside ``shard_map``) that ``x`` varies over."""
    mat = getattr(jax.typeof(x), "mat", None)
    return frozenset(getattr(mat, "varying", None) or ())


def match_varying(*arrays: jax.Array) -> list[jax.Array]:
    """Inside ``shard_map``: the arrays made varying over the same manual axes (an FFI
    call needs its operands alike; jax transposes the cast for their cotangents). A
    no-op elsewhere."""
    axes = frozenset().union(*(_varying(a) for a in arrays))
    out = []
    for a in arrays:
        missing = tuple(sorted(axes - _varying(a), key=str))
        out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
    return out


def _result(like: jax.Array, shape) -> jax.ShapeDtypeStruct:
    """A float32 result of ``shape`` typed like ``like`` (its varying mesh axes)."""
    return jax.typeof(like).update(shape=tuple(shape), dtype=jnp.float32)


def warp_ssd_terms(moving: jax.Array, fixed: jax.Array, disp: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """Per voxel ``sum_c r_c**2`` and ``sum_c r_c * d warped_c / d disp``, where
    ``r = warp(moving, disp) - fixed`` (:func:`jaxreg.warping.warp`, zero padding).

    ``moving``, ``fixed``: ``(..., H, W, D, C)``; ``disp``: ``(..., H, W, D, 3)`` on the
    same grid, float32, varying alike inside ``shard_map`` (:func:`match_varying`).
    Returns ``(..., H, W, D)`` and ``(..., H, W, D, 3)`` float32. Not differentiable
    (see :func:`jaxreg.losses.warped_ssd`); call only when :func:`usable`.
    """
    out = (_result(disp, disp.shape[:-1]), _result(disp, disp.shape))
    call = jax.ffi.ffi_call(_TARGETS["warp_ssd"][0], out, vmap_method="broadcast_all")
    return call(moving, fixed, disp)


def _smooth_call(x, width, times):
    call = jax.ffi.ffi_call(_TARGETS["box_smooth"][0], _result(x, x.shape),
                            vmap_method="broadcast_all")
    return call(x, width=int(width), times=int(times))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def box_smooth(x: jax.Array, width: int, times: int) -> jax.Array:
    """``times`` applications of ``filters.box_filter(., width)`` (zero padding) to a
    float32 ``(..., H, W, D, K)`` array. The operator is symmetric, so its VJP is itself.
    Call only when :func:`usable`."""
    return _smooth_call(x, width, times)


def _box_smooth_fwd(x, width, times):
    return _smooth_call(x, width, times), x


def _box_smooth_bwd(width, times, x, ct):
    return (_smooth_call(match_varying(ct, x)[0], width, times),)


box_smooth.defvjp(_box_smooth_fwd, _box_smooth_bwd)
