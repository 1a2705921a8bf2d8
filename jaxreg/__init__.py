"""jaxreg: zero-shot deformable registration with foundation-model features, in JAX."""
