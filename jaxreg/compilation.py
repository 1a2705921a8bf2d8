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
"""

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["COMPILER_OPTIONS", "jit"]

# An empty fusion-type list disables YNNPACK fusions in XLA:CPU.
COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


class _Jitted:
    """Two jits of one function: with the options at top level on CPU, without them
    when traced inside another transformation (jax refuses options on a nested jit;
    there the outer jit's options are the ones that apply). At top level an optional
    ``check(arguments) -> replacements`` sees the concrete arguments first."""

    def __init__(self, fun: Callable, kwargs: dict[str, Any]):
        self._check = kwargs.pop("check", None)
        self._signature = inspect.signature(fun) if self._check else None
        options = {**COMPILER_OPTIONS, **kwargs.pop("compiler_options", {})}
        self._with_options = jax.jit(fun, compiler_options=options, **kwargs)
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
    """
    if fun is None:
        return functools.partial(jit, **kwargs)
    return _Jitted(fun, dict(kwargs))
