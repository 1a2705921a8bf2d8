"""Flags that more than one command defines: absl allows a flag name once per process,
and a process (a test run, a notebook) may import several commands."""

from absl import flags

from jaxreg import compilation

COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", compilation.DEFAULT_CACHE,
    "Folder of XLA's persistent compilation cache and of jaxreg's exported programs "
    "(jaxreg.compilation.use_caches), so that a second run skips tracing and compiling; "
    "'' turns it off. $JAX_COMPILATION_CACHE_DIR, when set, wins.")
