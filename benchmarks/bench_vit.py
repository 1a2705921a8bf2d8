r"""Images/s of jaxreg's DINOv2 beside transformers' PyTorch Dinov2Model, on CPU.

Random weights (the same for both), float32, batch of ``--batch`` images, jaxreg
under ``jax.jit`` after one warm-up call, PyTorch under ``inference_mode`` after one
warm-up call; the median of ``--repeats`` timed calls is reported.

  python -m benchmarks.bench_vit --variants=dinov2_vits14,dinov2_vitb14 \
      --sizes=224,448 --batch=1 --repeats=3
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags, logging

flags.DEFINE_list("variants", ["dinov2_vits14", "dinov2_vitb14"], "jaxreg DINOv2 variants.")
flags.DEFINE_list("sizes", ["224", "448"], "Square input sizes in pixels.")
flags.DEFINE_integer("batch", 1, "Images per call.")
flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median reported).")
flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: torch's default).")
FLAGS = flags.FLAGS


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation for jax)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(variant: str, size: int, *, batch: int, repeats: int) -> dict[str, float]:
    """Images/s of jaxreg and transformers for one variant and input size."""
    import jax
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from jaxreg.encoders import dinov2
    from jaxreg.encoders.checkpoint import assign_params

    cfg = dinov2.VARIANTS[variant].config
    torch.manual_seed(0)
    hf = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, image_size=518, patch_size=14)).eval()
    model = dinov2.create(variant, rngs=nnx.Rngs(0))
    assign_params(model, dinov2.convert({k: v.numpy() for k, v in hf.state_dict().items()}))
    graphdef, state = nnx.split(model)

    @jax.jit
    def features(state, x):
        return nnx.merge(graphdef, state)(x, blocks=())["features"]

    x = np.random.RandomState(0).randn(batch, size, size, 3).astype(np.float32)
    xj = jax.device_put(x)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    def run_torch():
        with torch.inference_mode():
            hf(xt)

    t_jax = _median_seconds(lambda: features(state, xj).block_until_ready(), repeats)
    t_torch = _median_seconds(run_torch, repeats)
    return {"jaxreg": batch / t_jax, "torch": batch / t_torch}


def main(argv):
    del argv
    import jax
    import torch

    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    logging.info("jax %s on %s; torch %s with %d threads", jax.__version__,
                 jax.devices()[0].platform, torch.__version__, torch.get_num_threads())
    print(f"{'variant':<16}{'px':>6}{'jaxreg img/s':>15}{'torch img/s':>14}{'ratio':>8}")
    for variant in FLAGS.variants:
        for size in map(int, FLAGS.sizes):
            r = bench(variant, size, batch=FLAGS.batch, repeats=FLAGS.repeats)
            print(f"{variant:<16}{size:>6}{r['jaxreg']:>15.2f}{r['torch']:>14.2f}"
                  f"{r['jaxreg'] / r['torch']:>8.2f}", flush=True)


if __name__ == "__main__":
    app.run(main)
