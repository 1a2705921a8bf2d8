r"""Seconds per 1024 px slice of jaxreg's SAM2 Hiera encoder beside transformers' Sam2VisionModel.

    python -m benchmarks.bench_hiera --variants=sam2.1_hiera_tiny,sam2.1_hiera_base_plus

Random weights (no SAM2 weights exist on these machines; the time does not depend on the
values), float32, one 1024x1024 image per call. jaxreg: the whole model (trunk and FPN
neck) under ``jax.jit`` after one warm-up call that compiles it; transformers: eager
PyTorch under ``no_grad`` after one warm-up call, ``--threads`` threads. The median of
``--repeats`` timed calls is printed, as wall time and as this process's CPU time (the
steadier figure on a shared machine), with the load average.
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app, flags

_VARIANTS = flags.DEFINE_list("variants", ["sam2.1_hiera_tiny", "sam2.1_hiera_base_plus"],
                              "jaxreg.encoders.hiera variants")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls after the warm-up")
_THREADS = flags.DEFINE_integer("threads", 2, "torch intra-op threads")
_TORCH = flags.DEFINE_bool("torch", True, "also time transformers' Sam2VisionModel")


def _timed(fn) -> tuple[float, float]:
    fn()  # warm-up (jax: compilation)
    wall, cpu = [], []
    for _ in range(_REPEATS.value):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def _jaxreg(variant, image):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxreg.encoders import hiera

    abstract = nnx.eval_shape(lambda: hiera.create(variant, rngs=nnx.Rngs(0)))
    graphdef, shapes = nnx.split(abstract)
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(shapes))))
    state = jax.tree.map(lambda s: 0.02 * jax.random.normal(next(keys), s.shape, s.dtype),
                         shapes)
    run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)["features"])
    x = jnp.asarray(image)
    return _timed(lambda: run(state, x).block_until_ready())


def _transformers(variant, image):
    import torch
    from transformers import Sam2HieraDetConfig, Sam2VisionConfig, Sam2VisionModel

    from jaxreg.encoders import hiera

    torch.set_num_threads(_THREADS.value)
    backbone, neck = hiera.hf_config(hiera.VARIANTS[variant].config)
    model = Sam2VisionModel(Sam2VisionConfig(backbone_config=Sam2HieraDetConfig(**backbone),
                                             **neck)).eval()
    x = torch.from_numpy(image).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        return _timed(lambda: model(x))


def main(argv):
    del argv
    import numpy as np

    image = np.random.default_rng(0).standard_normal((1, 1024, 1024, 3), np.float32)
    print(f"load average at start {os.getloadavg()[0]:.2f}")
    print("| variant | implementation | wall s / slice | CPU s / slice |")
    print("|---|---|---|---|")
    for variant in _VARIANTS.value:
        runs = [("jaxreg (jit)", _jaxreg)] + (
            [("transformers (eager)", _transformers)] if _TORCH.value else [])
        for name, fn in runs:
            wall, cpu = fn(variant, image)
            print(f"| {variant} | {name} | {wall:.2f} | {cpu:.2f} |", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    app.run(main)
