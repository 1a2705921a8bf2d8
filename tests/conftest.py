"""Shared test setup: float32 on CPU, two host devices for sharding tests; fixtures used by
several files (shared plain functions: tests/helpers.py)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest


def mni_path(name: str) -> str:
    """A file of nilearn's MNI152 2009 templates (t1, gm, wm), shipped in the package."""
    import nilearn

    return os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                        f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")


@pytest.fixture(scope="session")
def mni_small():
    """Real anatomy, small: MNI T1 and GM/WM masks cropped and downsampled by 4."""
    nib = pytest.importorskip("nibabel")
    crop = (slice(2, 194, 4), slice(4, 228, 4), slice(2, 186, 4))
    t1 = np.asarray(nib.load(mni_path("t1")).dataobj, np.float32)[crop]
    gm = np.asarray(nib.load(mni_path("gm")).dataobj, np.float32)[crop] > 127
    wm = np.asarray(nib.load(mni_path("wm")).dataobj, np.float32)[crop] > 127
    labels = (gm * 1 + wm * 2).astype(np.int16)
    return t1 / t1.max(), labels


@pytest.fixture(scope="module")
def tiny_segmenter():
    """Random weights: a TinyViT at 64 px (16x16 embedding, 32 channels) and its SAM heads
    (tests/_sam_decoder_reference.py)."""
    import _sam_decoder_reference as ref

    return ref.tiny_segmenter()
