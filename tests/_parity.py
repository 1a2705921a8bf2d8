"""Tolerances for the encoder parity tests, and the error they measure.

An encoder is compared with its PyTorch reference map by map (each block's tokens, the
final features, the class token). Both run in float32, so they differ by rounding, and
rounding depends on the order of summation, which changes with the processor's vector
width (AVX2 or AVX-512) and with the library builds. An absolute bound does not survive
that: a ViT-B's deep blocks reach |x| ~ 60, where 1e-4 is a relative error of 2e-6.

So the error is relative to the magnitude of the reference map,

    max |jaxreg - reference| / max |reference|,

and its bound follows from float32 error growth: each dot product of ``n`` terms errs by
about ``sqrt(n) u`` relative to its terms (u = 2^-24, the unit roundoff, errors of random
sign), and the errors of successive residual blocks add up, so after ``depth`` blocks whose
longest dot product has ``reduction`` terms (the MLP's hidden width, or the tokens attended
to, whichever is longer):

    bound = depth * sqrt(reduction) * u.

For the ViT-B/16 parity tests (12 blocks, MLP 3072) that is 4.0e-5; measured errors are
1.6e-6 to 2.2e-6 with the default instruction set and with ``--xla_cpu_max_isa=AVX2`` (BUILD.md,
"Parity tolerances"). Mistakes are far above it: each ViT family's test also runs a model
with one deliberate mistake (a wrong activation, RoPE theta or position grid) and checks
that its error exceeds the bound by at least ten times.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

UNIT_ROUNDOFF = 2.0 ** -24  # float32


def float32_bound(depth: int, reduction: int) -> float:
    """Relative error float32 may reach after ``depth`` blocks of ``reduction``-term sums."""
    if depth < 1 or reduction < 1:
        raise ValueError(f"depth={depth}, reduction={reduction}: both must be >= 1")
    return depth * math.sqrt(reduction) * UNIT_ROUNDOFF


def relative_error(expected, got) -> float:
    """``max |got - expected| / max |expected|`` (shapes must agree)."""
    expected = np.asarray(expected, np.float64)
    got = np.asarray(got, np.float64)
    if expected.shape != got.shape:
        raise ValueError(f"shapes differ: expected {expected.shape}, got {got.shape}")
    scale = float(np.abs(expected).max())
    if scale == 0.0:
        raise ValueError("the reference map is all zeros: a relative error means nothing there")
    return float(np.abs(got - expected).max()) / scale


def relative_errors(expected: Mapping[str, np.ndarray],
                    got: Mapping[str, np.ndarray]) -> dict[str, float]:
    """:func:`relative_error` of every map in ``expected`` (``got`` must have each)."""
    return {name: relative_error(e, got[name]) for name, e in expected.items()}


def vit_bound(config, tokens: int) -> float:
    """:func:`float32_bound` of a ViT config (``depth``, ``mlp_dim``) attending ``tokens``."""
    return float32_bound(config.depth, max(config.mlp_dim, config.hidden_size, tokens))
