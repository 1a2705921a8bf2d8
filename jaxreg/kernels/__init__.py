"""Compiled kernels that replace XLA's formulation where it is slow.

* :mod:`jaxreg.kernels.cpu`: the fine stage's fused warp + SSD and repeated box filters as
  C++ XLA FFI handlers (source: ``cpu_kernels.cc``), built on first use; the losses and the
  solver fall back to XLA without a compiler.
"""
