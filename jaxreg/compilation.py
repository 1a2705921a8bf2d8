"""``jax.jit`` with the XLA options the registration loop needs.

XLA:CPU (jaxlib 0.10) hands chains of elementwise ops and reductions to YNNPACK by
default. In the solver's Adam step that takes the channel sums of the warp's gradient
away from the eight corner gathers that feed them, so the gathers are materialised
instead of fused: the fine stage at MNI size ran 3.1x slower per step (564 ms against
181 ms on 2 cores; BUILD.md). :func:`jit` turns that fusion off for the functions it
compiles, on CPU and only for them: the process-wide ``XLA_FLAGS`` and ``jax.config``
are left alone, and other backends get a plain ``jax.jit``.

jax accepts compiler options only on the outermost jit. jaxreg's entry points
(``register_mind``, ``convex_adam``, the batched registrations) use :func:`jit`; when
you call jaxreg inside a jit of your own (a new loss with :func:`jaxreg.warping.warp`,
``coarse_stage``/``fine_stage`` under your jit), make that outer jit a :func:`jit` too::

    @jaxreg.jit
    def step(params, fixed, moving): ...

A process that registers one pair spends seconds tracing and lowering the big programs
(the affine stage's solver, ``convex_adam``) before XLA's persistent cache can answer.
:func:`use_caches` turns on that cache and, beside it, jaxreg's cache of *exported*
programs: a function jitted with ``export=True`` is traced and lowered once
(:mod:`jax.export`), its StableHLO serialised under the cache folder, and later
processes deserialise it instead of tracing (the affine stage on a 192x224x184 pair:
2.2-2.5 s -> 1.05-1.15 s in a warm process, the same matrix bitwise). The key holds
everything the traced program depends on: the function, its static arguments, the
shapes and dtypes of the others, jax's and jaxlib's versions, the backend, the jax
settings that change tracing, a hash of jaxreg's own source files, and what the
function's ``export=`` callable adds (``convex_adam``: whether the CPU kernels are in
use). Without :func:`use_caches` nothing is cached; any failure to export, read or
call a cached program falls back to the plain jit (logged once).
"""

import functools
import hashlib
import inspect
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

__all__ = ["COMPILER_OPTIONS", "DEFAULT_CACHE", "jit", "use_caches", "export_dir"]

DEFAULT_CACHE = os.path.join("~", ".cache", "jaxreg", "xla")
"""The commands' cache folder (``--compilation_cache``): XLA's persistent compilation
cache, and jaxreg's exported programs in its ``exported`` subfolder."""

# An empty fusion-type list disables YNNPACK fusions in XLA:CPU.
COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


class _Jitted:
    """Two jits of one function: with the options at top level on CPU, without them
    when traced inside another transformation (jax refuses options on a nested jit;
    there the outer jit's options are the ones that apply). At top level an optional
    ``check(arguments) -> replacements`` sees the concrete arguments first."""

    def __init__(self, fun: Callable, kwargs: dict[str, Any]):
        self._check = kwargs.pop("check", None)
        self._export = kwargs.pop("export", None)
        if self._export is True:
            self._export = lambda: ()
        self._signature = inspect.signature(fun) if self._check or self._export else None
        self._static = frozenset(kwargs.get("static_argnames", ()))
        self._name = f"{fun.__module__}.{fun.__qualname__}" if self._export else ""
        self._exported: dict[str, Callable] = {}
        ours = COMPILER_OPTIONS if kwargs.pop("cpu_options", True) else {}
        self._options = {**ours, **kwargs.pop("compiler_options", {})}
        self._with_options = jax.jit(fun, compiler_options=self._options, **kwargs)
        self._plain = jax.jit(fun, **kwargs)
        functools.update_wrapper(self, fun)

    def _top_level(self):
        return self._with_options if jax.default_backend() == "cpu" else self._plain

    def __call__(self, *args, **kwargs):
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
            return self._plain(*args, **kwargs)
        if self._check is not None:
            try:
                bound = self._signature.bind(*args, **kwargs)
            except TypeError:  # a wrong call: the jitted function reports it
                bound = None
            if bound is not None:
                bound.arguments.update(self._check(dict(bound.arguments)))
                args, kwargs = bound.args, bound.kwargs
        if self._export is not None and _EXPORT_DIR is not None:
            out = _call_exported(self, args, kwargs)
            if out is not None:
                return out
        return self._top_level()(*args, **kwargs)

    def __getattr__(self, name):  # lower, trace, eval_shape, ... of the top-level jit
        if name.startswith("__"):
            # Not a jit method: answering would pick a backend, and inspect.signature()
            # asks for __signature__ at import time, before jax.distributed.initialize().
            raise AttributeError(name)
        return getattr(self._top_level(), name)


def jit(fun: Callable | None = None, /, **kwargs: Any):
    """``jax.jit(fun, **kwargs)`` with :data:`COMPILER_OPTIONS` added on CPU.

    Usable as ``@jit``, ``@jit(static_argnames=...)`` or ``jit(f, ...)``; options in
    ``compiler_options=`` are merged over these. Called with traced arguments (inside
    another ``jit``, ``vmap`` or ``grad``) it is a plain ``jax.jit``. ``check=``, a
    function of the bound arguments (name -> value) returning replacements, validates
    concrete arguments before a top-level call; traced calls skip it.
    ``cpu_options=False`` leaves :data:`COMPILER_OPTIONS` out. ``export=True``
    (or a callable returning more key parts; it runs before each top-level call) lets
    top-level calls use the cache of exported programs when :func:`use_caches` is on.
    """
    if fun is None:
        return functools.partial(jit, **kwargs)
    return _Jitted(fun, dict(kwargs))


# the cache of exported programs -----------------------------------------------------------

_EXPORT_DIR: str | None = None  # set by use_caches
_WARNED: set[str] = set()


def use_caches(folder: str | None = DEFAULT_CACHE) -> str | None:
    """Turns on XLA's persistent compilation cache in ``folder`` (``~`` expanded; every
    program, however short its compilation) and jaxreg's exported programs in
    ``folder/exported``. ``$JAX_COMPILATION_CACHE_DIR``, when set, wins; ``''`` or None
    turns both off. Returns the folder used, or None. For commands: call it before the
    first computation."""
    global _EXPORT_DIR
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser(folder or "")
    if not folder:
        _EXPORT_DIR = None
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    # Every program: the metrics' and warps' small ones took 0.1-0.3 s each to compile,
    # 1.4 s of a warm one-pair run when left out.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    _EXPORT_DIR = os.path.join(folder, "exported")
    return folder


def export_dir() -> str | None:
    """Where exported programs are kept (None: not cached)."""
    return _EXPORT_DIR


@functools.cache
def _source_hash() -> str:
    """SHA-256 of jaxreg's source files (.py and the kernels' .cc), read once."""
    digest = hashlib.sha256()
    root = pathlib.Path(__file__).parent
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cc")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _leaf_spec(x) -> tuple | None:
    """A dynamic argument's shape and dtype (and weak type), or None where it is not a
    single-device array (such calls are not cached)."""
    if isinstance(x, np.ndarray):
        return x.shape, str(x.dtype), False
    if isinstance(x, jax.Array) and len(x.sharding.device_set) == 1:
        return x.shape, str(x.dtype), bool(getattr(x, "weak_type", False))
    return None


def _export_key(jitted: _Jitted, static: dict, leaves: list, treedef) -> str | None:
    specs = [_leaf_spec(x) for x in leaves]
    statics = repr(sorted(static.items()))
    if any(s is None for s in specs) or " at 0x" in statics:  # no stable key
        return None
    device = jax.devices()[0]
    parts = (jitted._name, statics, str(treedef), specs, jax.__version__,
             jax.lib.__version__, device.platform, device.device_kind,
             jax.config.jax_enable_x64, str(jax.config.jax_default_matmul_precision),
             _source_hash(), jitted._export())
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:40]


def _exported_callable(jitted: _Jitted, key: str, arguments: dict) -> Callable:
    """The cached program ``key`` as a jitted callable of the dynamic arguments: read
    from the cache folder, else exported from ``jitted`` and written there."""
    from jax import export

    path = os.path.join(_EXPORT_DIR, f"{jitted._name}-{key}.stablehlo")
    try:
        with open(path, "rb") as f:
            exported = export.deserialize(bytearray(f.read()))
    except FileNotFoundError:
        from jaxreg.kernels import cpu as kernels  # jaxreg's own FFI targets may be in it

        checks = [export.DisabledSafetyCheck.custom_call(target)
                  for target, _ in kernels._TARGETS.values()]
        exported = export.export(jitted._top_level(), disabled_checks=checks)(**arguments)
        from jaxreg.io import atomic

        os.makedirs(_EXPORT_DIR, exist_ok=True)
        with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(exported.serialize())
    options = jitted._options if jax.default_backend() == "cpu" else None
    return jax.jit(exported.call, compiler_options=options)


def _call_exported(jitted: _Jitted, args: tuple, kwargs: dict):
    """``jitted(*args, **kwargs)`` through the cache of exported programs; None where the
    call cannot use it (then the caller runs the plain jit)."""
    key = None
    try:
        bound = jitted._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        static = {k: v for k, v in bound.arguments.items() if k in jitted._static}
        dynamic = {k: v for k, v in bound.arguments.items() if k not in jitted._static}
        leaves, treedef = jax.tree.flatten(dynamic)
        key = _export_key(jitted, static, leaves, treedef)
        if key is None:
            return None
        if key not in jitted._exported:
            jitted._exported[key] = _exported_callable(jitted, key, bound.arguments)
        return jitted._exported[key](**dynamic)
    except Exception as e:  # a cache must never fail a registration
        jitted._exported.pop(key, None)  # a program that failed is not kept
        if jitted._name not in _WARNED:
            _WARNED.add(jitted._name)
            logging.warning("jaxreg: %s runs without its exported-program cache (%s: %s)",
                            jitted._name, type(e).__name__, e)
        return None
