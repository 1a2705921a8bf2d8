"""Checks that need an accelerator: marked ``gpu``, skipped where jax sees none (CPU CI).

On a GPU machine (BUILD.md, "GPU"), with nothing else changed:

    JAX_PLATFORMS=cuda,cpu python -m pytest -q -m gpu tests/test_gpu.py

``JAXREG_TEST_ACCELERATOR=cpu`` runs them with the CPU standing in for the accelerator,
which checks the tests' own code (the comparisons then set CPU against CPU; the cuDNN
attention test skips).

What they hold the accelerator to: MIND-SSC registration agrees with the CPU's; a batch
of pairs agrees with one pair at a time; a ViT encoder in bfloat16 agrees with float32,
and cuDNN's fused attention with XLA's; the CLI runs a pair end to end there.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def accelerator():
    platform = os.environ.get("JAXREG_TEST_ACCELERATOR", "gpu")
    try:
        return jax.devices(platform)[0]
    except RuntimeError:
        pytest.skip(f"jax sees no {platform} device (JAX_PLATFORMS="
                    f"{os.environ.get('JAX_PLATFORMS', '')!r})")


def _on(device, fn, *args):
    with jax.default_device(device):
        return np.asarray(jax.block_until_ready(fn(*args)))


@pytest.fixture(scope="module")
def phantom_pair():
    from jaxreg import phantom

    return phantom.breast_pair("date", shape=(64, 48, 40), amplitude=3.0)


def test_register_mind_agrees_with_the_cpu(accelerator, phantom_pair):
    from jaxreg import metrics, solver
    from jaxreg.kernels import cpu as cpu_kernels

    p = phantom_pair
    config = solver.ConvexAdamConfig(iterations=40)
    run = lambda f, m: solver.register_mind(f, m, config=config)
    on_accelerator = _on(accelerator, run, p["fixed"], p["moving"])
    on_cpu = _on(jax.devices("cpu")[0], run, p["fixed"], p["moving"])
    if accelerator.platform != "cpu":
        assert not cpu_kernels.usable()  # the CPU kernels are never traced for a GPU
    mask = p["fixed_breast"] > 0
    errors = [metrics.field_error(u, p["true_field"], mask=mask)
              for u in (on_accelerator, on_cpu)]
    before = metrics.field_error(0 * p["true_field"], p["true_field"], mask=mask)
    assert errors[0] < 0.7 * before
    # Float32 on both; the coarse stage's arg-min may break near-ties differently.
    assert abs(errors[0] - errors[1]) < 0.02
    assert np.mean(np.abs(on_accelerator - on_cpu)) < 0.05


def test_a_batch_agrees_with_one_pair_at_a_time(accelerator):
    from jaxreg import phantom, solver
    from jaxreg.solver import batching
    from jaxreg.features import sources

    config = solver.ConvexAdamConfig(iterations=20)
    shape = (48, 42, 36)
    feats = []
    for seed in range(3):
        p = phantom.breast_pair("sequence", shape=shape, seed=seed, amplitude=2.0)
        f = sources.MindSource()(p["fixed"], p["moving"])
        feats.append((np.asarray(f.fixed), np.asarray(f.moving)))
    fixed, moving = (np.stack([f[i] for f in feats]) for i in (0, 1))
    extents = np.array([shape] * 3)
    batch = _on(accelerator, lambda: batching.register_batch(fixed, moving, extents,
                                                             config=config))
    single = np.stack([_on(accelerator, lambda f=f, m=m: batching.register_padded(
        f, m, np.array(shape), config=config)) for f, m in feats])
    np.testing.assert_allclose(batch, single, atol=1e-4)


def _vit(dtype):
    from flax import nnx

    from jaxreg.encoders import dinov2

    model = dinov2.create("dinov2_vits14_reg", rngs=nnx.Rngs(0), dtype=dtype)
    graphdef, state = nnx.split(model)
    return model, graphdef, state


def _features(device, graphdef, state, images):
    from flax import nnx

    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)["features"])
    with jax.default_device(device):
        return np.asarray(fn(jax.device_put(state, device), jnp.asarray(images)), np.float32)


def _relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_vit_bfloat16_agrees_with_float32(accelerator):
    images = np.random.RandomState(0).rand(2, 224, 224, 3).astype(np.float32)
    _, graphdef32, state = _vit(jnp.float32)
    _, graphdef16, _ = _vit(jnp.bfloat16)  # same random weights (same seed), bf16 compute
    with jax.default_matmul_precision("highest"):
        f32 = _features(accelerator, graphdef32, state, images)
        cpu = _features(jax.devices("cpu")[0], graphdef32, state, images)
    bf16 = _features(accelerator, graphdef16, state, images)
    assert _relative(f32, cpu) < 1e-4
    assert _relative(bf16, f32) < 0.05


def test_cudnn_attention_agrees_with_xla(accelerator):
    from flax import nnx

    from jaxreg.encoders import vit

    if accelerator.platform != "gpu":
        pytest.skip("cuDNN attention needs an NVIDIA GPU")
    images = np.random.RandomState(1).rand(2, 224, 224, 3).astype(np.float32)
    model, graphdef, state = _vit(jnp.bfloat16)
    xla = _features(accelerator, graphdef, state, images)
    assert vit.set_attention(model, "cudnn") == 12
    cudnn = _features(accelerator, *nnx.split(model), images)
    assert _relative(cudnn, xla) < 0.02


def test_cli_registers_a_pair_on_the_accelerator(accelerator, tmp_path):
    env = dict(os.environ)
    if accelerator.platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    args = ["breast", "--encoder=mind", f"--workdir={tmp_path / 'run'}", "--compilation_cache=",
            "--config.phantom.tasks=date", "--config.phantom.shape=64,48,40"]
    # The CLI as `python -m experiments.breast` runs it, after saying which backend jax took.
    code = ("import jax, runpy, sys; print('backend', jax.default_backend()); "
            f"sys.argv = {args!r}; runpy.run_module('experiments.breast', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=_REPO, env=env,
                          capture_output=True, encoding="utf-8", errors="replace")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"backend {accelerator.platform}" in proc.stdout
    with open(tmp_path / "run" / "pairs" / "00_date" / "metrics.json") as fh:
        row = json.load(fh)
    assert row["breast_after_dice_1"] > row["breast_before_dice_1"]
    assert row["folding_percent"] < 0.1
