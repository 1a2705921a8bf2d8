r"""jaxreg measured on an accelerator: encoders, one pair end to end, MIND batching, the fine stage.

    python -m benchmarks.bench_gpu --out=/tmp/bench_gpu                     # every stage
    python -m benchmarks.bench_gpu --stages=encoders --encoders=sam,dinov2 --dtypes=bfloat16
    python -m benchmarks.bench_gpu --smoke --out=/tmp/smoke        # CPU: checks the command

Each stage prints its rows and appends them as JSON lines to ``--out``/bench_gpu.jsonl as
soon as they are measured, so a run cut short keeps what it finished; ``--out`` gets only
that file, ``pairs.log``, ``mind-batch.log`` and ``trace.tar.gz`` (the bulky data goes to
``--scratch``). Weights are random at the reference sizes: speed needs no real weights.

Stages (``--stages``):
  encoders: each encoder family at its reference input (SAM ViT-B 1024 px, DINOv2 ViT-L/14
    with registers 1792, DINOv3 ViT-B/16 1536, BiomedCLIP 224, LiteMedSAM 256, MobileSAM
    1024, SAM2.1 Hiera-T 1024), in each of ``--dtypes``, at the batch the pipeline's memory
    plan picks (``jaxreg.features.encoding.SliceEncoder``'s chunk; ``--batch`` overrides): slices/s,
    TFLOP/s from XLA's cost analysis, MFU against the chip's dense peak (float32 against
    its TF32 peak on NVIDIA GPUs, which is how jax runs float32 matmuls there by default),
    and the compiled program's memory.
  pairs: ``python -m experiments.breast`` as a user runs it, in a fresh process per
    encoder of ``--encoders`` (``mind`` included), on two phantom pairs of ``--shape`` with random
    weights written to a checkpoint: the process's wall time with a cold compilation
    cache, the first pair's stages (compilation included) and the second pair's (warm);
    for ``--warm_process`` encoders the whole process again on the warm cache.
  mind: ``register_mind`` on one phantom pair of ``--shape``: first call and warm median;
    then pairs/hour at batch 1 against the memory plan's batch, by ``benchmarks.bench_batch``.
  fine: the solver's parts on that pair (MIND-SSC, coarse stage, fine stage), and one
    fine-stage iteration split into the similarity's value and gradient (the warp's
    gathers), the regulariser with the smoothing, and the Adam update, each run
    ``--iterations`` times in one ``lax.scan``; ``--trace`` also writes a profiler trace.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ALL_ENCODERS = ["sam", "dinov2", "dinov3", "medclip", "litemedsam", "mobilesam", "sam2"]

_STAGES = flags.DEFINE_list("stages", "encoders,pairs,mind,fine", "what to measure")
_ENCODERS = flags.DEFINE_list("encoders", ["mind"] + _ALL_ENCODERS,
                              "encoders (jaxreg.encoders.registry); 'mind' counts for pairs only")
_DTYPES = flags.DEFINE_list("dtypes", "bfloat16,float32", "encoder compute dtypes")
_ATTENTION = flags.DEFINE_list("attention", "xla", "encoders: ViT attention kernels to "
                                "compare (xla, cudnn: NVIDIA GPUs, bfloat16 only)")
_BATCH = flags.DEFINE_integer("batch", 0, "encoder slices per call (0: the memory plan)")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed calls after the warm-up (median)")
_SHAPE = flags.DEFINE_list("shape", "192,224,184", "pair grid for pairs, mind and fine")
_WARM_PROCESS = flags.DEFINE_list("warm_process", "mind,dinov2,sam",
                                  "pairs: encoders whose CLI process runs again on a warm cache")
_MIND_PAIRS = flags.DEFINE_integer("mind_pairs", 16, "mind: pairs per batching measurement")
_ITERATIONS = flags.DEFINE_integer("iterations", 80, "fine: steps per timed scan")
_TRACE = flags.DEFINE_bool("trace", False, "fine: write a jax.profiler trace to --out/trace")
_OUT = flags.DEFINE_string("out", "/tmp/jaxreg-bench-gpu", "folder for results and logs (a "
                           "few small files)")
_SCRATCH = flags.DEFINE_string("scratch", "/tmp/jaxreg-bench-gpu-scratch", "folder for the "
                               "phantom data, random weights, workdirs and XLA caches")
_SMOKE = flags.DEFINE_bool("smoke", False, "tiny sizes, one repeat: checks the command on CPU")

# Dense peak TFLOP/s per chip as (bfloat16, float32 at jax's default precision: TF32 on
# NVIDIA tensor cores, bfloat16 passes on TPU), from the vendors' data sheets; matched
# in order against jax's device_kind.
_PEAKS = (("H100 PCIe", 756.0, 378.0), ("H100", 989.4, 494.7), ("H200", 989.4, 494.7),
          ("A100", 312.0, 156.0), ("TPU v4", 275.0, 275.0), ("TPU v5 lite", 197.0, 197.0),
          ("TPU v5p", 459.0, 459.0), ("TPU v6 lite", 918.0, 918.0))


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The chip's dense peak for ``dtype`` matmuls (None: not in the table, e.g. a CPU)."""
    for name, bf16, f32 in _PEAKS:
        if name.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else f32
    return None


def _record(row: dict) -> None:
    """Prints ``row`` and appends it to the results file."""
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in row.items()), flush=True)
    with open(os.path.join(_OUT.value, "bench_gpu.jsonl"), "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _median_seconds(fn) -> tuple[float, float]:
    """(first call, median of ``--repeats`` more, one with ``--smoke``) in seconds; ``fn``
    must block."""
    repeats = 1 if _SMOKE.value else _REPEATS.value
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def _shape() -> tuple[int, int, int]:
    return (48, 40, 36) if _SMOKE.value else tuple(int(s) for s in _SHAPE.value)


def _encoder_input(name: str) -> tuple[object, object, int]:
    """(registry entry, spec, input side): the reference side, or a small one for --smoke."""
    from jaxreg.encoders import registry

    entry = registry.ENCODERS[name]
    spec = entry.spec
    size = spec.preprocessing.image_size
    if _SMOKE.value:  # the smallest side every family takes (Hiera and TinyViT want 32-multiples)
        size = max(64, 4 * spec.patch_size)
    return entry, spec, size


def bench_encoder(name: str, dtype_name: str, attention: str = "xla") -> dict | None:
    """One encoder's throughput at its reference input in one compute dtype and ViT
    attention kernel (None: ``attention`` does not apply to this encoder)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxreg.features import encoding
    from jaxreg.encoders import vit

    entry, spec, size = _encoder_input(name)
    dtype = jnp.dtype(dtype_name)
    if attention != "xla" and dtype_name == "float32":  # cuDNN's kernel: bf16/fp16 only
        return None
    model = entry.module.create(entry.variant, rngs=nnx.Rngs(0), dtype=dtype)
    if attention != "xla" and not vit.set_attention(model, attention):
        return None
    graphdef, state = nnx.split(model)
    batch = _BATCH.value or (1 if _SMOKE.value else encoding.plan_chunk(spec, size))
    x = jnp.asarray(np.random.RandomState(0).rand(batch, size, size, 3), jnp.float32)
    forward = jax.jit(lambda s, images: nnx.merge(graphdef, s)(images)["features"])
    t = time.perf_counter()
    compiled = forward.lower(state, x).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", float("nan")))
    memory = compiled.memory_analysis()
    temp_gib = getattr(memory, "temp_size_in_bytes", float("nan")) / 2**30
    _, seconds = _median_seconds(lambda: jax.block_until_ready(compiled(state, x)))
    device = jax.devices()[0]
    tflops = flops / seconds / 1e12
    peak = peak_tflops(device.device_kind, dtype_name)
    return dict(stage="encoders", encoder=name, variant=entry.variant, dtype=dtype_name,
                attention=attention, input=size, batch=batch, compile_s=compile_s,
                seconds_per_call=seconds,
                slices_per_s=batch / seconds, gflop_per_slice=flops / batch / 1e9,
                tflops=tflops, mfu=(tflops / peak if peak else None), peak_tflops=peak,
                temp_gib=temp_gib, device=device.device_kind)


def stage_encoders() -> None:
    for name in [e for e in _ENCODERS.value if e != "mind"]:
        for dtype_name in _DTYPES.value:
            for attention in _ATTENTION.value:
                try:
                    row = bench_encoder(name, dtype_name, attention)
                except Exception as e:  # one failure (e.g. out of memory) must not stop the rest
                    row = dict(stage="encoders", encoder=name, dtype=dtype_name,
                               attention=attention, error=f"{type(e).__name__}: {str(e)[:300]}")
                if row is not None:
                    _record(row)


def _write_random_weights(name: str, folder: str) -> str:
    """A jaxreg-layout checkpoint of random weights for encoder ``name`` (float32)."""
    from flax import nnx

    from jaxreg.encoders import registry
    from jaxreg.encoders import checkpoint as _checkpoint

    entry = registry.ENCODERS[name]
    path = os.path.join(folder, f"{name}-random.safetensors")
    if not os.path.exists(path):
        model = entry.module.create(entry.variant, rngs=nnx.Rngs(0))
        _checkpoint.write_safetensors(_checkpoint.flat_params(model), path)
    return path


def _cli(name: str, data: str, weights: str | None, run: str, cache: str) -> dict:
    """One ``experiments.breast`` process on the pairs in ``data``: wall time and the
    per-stage seconds of each pair (from its metrics.json)."""
    work = os.path.join(_SCRATCH.value, "pairs", f"{name}-{run}")
    cmd = [sys.executable, "-m", "experiments.breast", f"--encoder={name}",
           f"--data_dir={data}", f"--workdir={work}", f"--compilation_cache={cache}",
           "--config.features.cache=False", "--overwrite", "--devices=1"]
    if weights:
        cmd.append(f"--weights={weights}")
    if _SMOKE.value and name != "mind":
        cmd += ["--config.solver.iterations=20", f"--config.features.image_size="
                f"{_encoder_input(name)[2]}"]
    log_path = os.path.join(_SCRATCH.value, f"pairs-{name}-{run}.log")
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    with open(log_path, "w") as log:
        t = time.perf_counter()
        status = subprocess.call(cmd, cwd=_REPO, env=env, stdout=log, stderr=log)
        wall = time.perf_counter() - t
    with open(log_path) as fh, open(os.path.join(_OUT.value, "pairs.log"), "a") as out:
        out.write(f"==== {name} {run} (exit {status}, {wall:.1f} s): {' '.join(cmd[1:])}\n")
        out.writelines(fh.readlines()[-60:])
    row = dict(stage="pairs", encoder=name, process=run, process_s=wall)
    if status != 0:
        with open(log_path) as fh:
            return dict(row, error=f"exit {status}: {fh.read()[-600:]}")
    for i, pair in enumerate(sorted(os.listdir(os.path.join(work, "pairs")))):
        with open(os.path.join(work, "pairs", pair, "metrics.json")) as fh:
            metrics = json.load(fh)
        label = "first" if i == 0 else "warm"
        row.update({f"{label}_{k.removeprefix('seconds_') if k != 'seconds' else 'pair'}_s": v
                    for k, v in metrics.items() if k.startswith("seconds")})
    return row


def stage_pairs() -> None:
    from jaxreg.experiment import pairs

    data = os.path.join(_SCRATCH.value, "pairs", "data")
    pairs.write_phantom_pairs(data, tasks=("date", "sequence"), shape=_shape())
    for name in _ENCODERS.value:
        cache = os.path.join(_SCRATCH.value, "pairs", f"xla-{name}")
        try:
            weights = None if name == "mind" else _write_random_weights(
                name, os.path.join(_SCRATCH.value, "pairs", "weights"))
            _record(_cli(name, data, weights, "cold", cache))
            if name in _WARM_PROCESS.value:
                _record(_cli(name, data, weights, "warm", cache))
        except Exception as e:
            _record(dict(stage="pairs", encoder=name, error=f"{type(e).__name__}: {e}"[:400]))


def _mind_pair():
    from jaxreg import phantom

    p = phantom.breast_pair("date", shape=_shape())
    return p["fixed"], p["moving"]


def stage_mind() -> None:
    import jax

    from jaxreg import solver

    fixed, moving = _mind_pair()
    config = solver.ConvexAdamConfig()
    run = lambda: jax.block_until_ready(solver.register_mind(fixed, moving, config=config))
    first, warm = _median_seconds(run)
    _record(dict(stage="mind", what="register_mind", shape="x".join(map(str, _shape())),
                 first_s=first, warm_s=warm, pairs_per_hour=3600 / warm,
                 device=jax.devices()[0].device_kind))
    cmd = [sys.executable, "-m", "benchmarks.bench_batch", "--devices=1",
           "--batch_per_device=1,auto", f"--shape={','.join(map(str, _shape()))}",
           f"--pairs={2 if _SMOKE.value else _MIND_PAIRS.value}",
           f"--iterations={config.iterations}"]
    proc = subprocess.run(cmd, cwd=_REPO, capture_output=True, text=True)
    with open(os.path.join(_OUT.value, "mind-batch.log"), "w") as fh:
        fh.write(proc.stdout + proc.stderr)
    _record(dict(stage="mind", what="bench_batch", exit=proc.returncode,
                 table=proc.stdout.strip().splitlines()[-6:]))


def _scan_seconds(step, init, iterations: int) -> float:
    """Warm median seconds per step of ``step`` (carry -> carry) run in one ``lax.scan``."""
    import jax

    run = jax.jit(lambda c: jax.lax.scan(lambda c, _: (step(c), None), c, None,
                                         length=iterations)[0])
    _, seconds = _median_seconds(lambda: jax.block_until_ready(run(init)))
    return seconds / iterations


def stage_fine() -> None:
    """The solver's parts, and one fine-stage iteration split into its terms."""
    import jax
    import optax

    from jaxreg import filters, losses, regularisers, solver
    from jaxreg.solver import convexadam
    from jaxreg.features import mind

    config = solver.ConvexAdamConfig()
    fixed, moving = _mind_pair()
    parts = dict(
        mind=jax.jit(lambda a, b: (mind.mind_ssc(a), mind.mind_ssc(b))),
        coarse=jax.jit(lambda f, m: solver.coarse_stage(f, m, config=config)),
        fine=jax.jit(lambda f, m, u: solver.fine_stage(f, m, u, config=config)))
    t = {}

    def timed(name, *args):
        """``parts[name](*args)``, its warm median seconds kept in ``t``."""
        _, t[name] = _median_seconds(lambda: jax.block_until_ready(parts[name](*args)))
        return parts[name](*args)

    f, m = timed("mind", fixed, moving)
    u = timed("coarse", f, m)
    timed("fine", f, m, u)
    g = config.grid_sp_adam
    pf, pm = filters.avg_pool(f, g), filters.avg_pool(m, g)
    p0 = filters.resize(u, pf.shape[:3]) / g
    smooth = lambda p: convexadam._smooth(p, config)
    data = lambda p: config.similarity_weight * losses.warped_ssd(pm, smooth(p), pf)
    reg = lambda p: config.lambda_weight * regularisers.diffusion(smooth(p))
    full = lambda p: data(p) + reg(p)
    opt = optax.adam(config.learning_rate)
    step_of = lambda loss: (lambda p: p - 1e-3 * jax.grad(loss)(p))
    n = _ITERATIONS.value
    per_step = {name: _scan_seconds(step_of(loss), p0, n)
                for name, loss in (("similarity", data), ("regulariser", reg), ("loss", full))}
    grad = jax.grad(full)(p0)

    def adam_only(carry):
        p, state = carry
        updates, state = opt.update(grad, state, p)
        return optax.apply_updates(p, updates), state

    per_step["adam_update"] = _scan_seconds(adam_only, (p0, opt.init(p0)), n)
    _record(dict(stage="fine", shape="x".join(map(str, _shape())), grid=list(pf.shape),
                 **{f"{k}_s": v for k, v in t.items()},
                 **{f"step_{k}_ms": 1e3 * v for k, v in per_step.items()},
                 iterations=config.iterations, device=jax.devices()[0].device_kind))
    if _TRACE.value:
        import shutil

        trace = os.path.join(_SCRATCH.value, "trace")
        with jax.profiler.trace(trace):
            jax.block_until_ready(parts["fine"](f, m, u))
        shutil.make_archive(os.path.join(_OUT.value, "trace"), "gztar", trace)


def main(argv):
    del argv
    import jax

    os.makedirs(_OUT.value, exist_ok=True)
    os.makedirs(_SCRATCH.value, exist_ok=True)
    device = jax.devices()[0]
    _record(dict(stage="machine", backend=jax.default_backend(), device=device.device_kind,
                 devices=jax.device_count(), jax=jax.__version__,
                 memory_gib=_device_gib(device), smoke=_SMOKE.value))
    stages = dict(encoders=stage_encoders, pairs=stage_pairs, mind=stage_mind, fine=stage_fine)
    for name in _STAGES.value:
        if name not in stages:
            raise app.UsageError(f"--stages: unknown stage {name!r}; choose from {list(stages)}")
    for name in _STAGES.value:
        t = time.perf_counter()
        stages[name]()
        print(f"# stage {name}: {time.perf_counter() - t:.1f} s", flush=True)


def _device_gib(device) -> float | None:
    try:
        return device.memory_stats()["bytes_limit"] / 2**30
    except Exception:  # CPU: no memory stats
        return None


if __name__ == "__main__":
    app.run(main)
