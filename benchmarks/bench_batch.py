r"""Throughput of batched registration: pairs per hour against device count.

    python -m benchmarks.bench_batch                                # CPU: 1, 2, 4 host devices
    python -m benchmarks.bench_batch --devices=1,2 --one_thread_per_device     # CPU: sharding cost
    python -m benchmarks.bench_batch --devices=1 --batch_per_device=1,4   # GPU: batch 1 vs 4

Pairs are breast phantoms (:func:`jaxreg.phantom.breast_pair`, task ``--task``, seed =
pair index) of one ``--shape``, registered on MIND-SSC features with
:func:`jaxreg.solver.batching.register_batch` (``vmap`` within a device, the pair axis sharded
over a 1-D mesh of ``--devices`` devices), ``--pairs`` pairs in batches of
``devices * batch_per_device`` (the last one padded with copies).

Each device count runs in its own subprocess (this script re-invoked with ``--_single``),
because the number of CPU host devices (``XLA_FLAGS=--xla_force_host_platform_device_count``)
must be set before jax is imported. In each, the first batch (compilation + one run) is
timed apart; the table's seconds cover all ``--pairs`` pairs after it. Scaling
efficiency is ``(pairs/hour at n devices) / (n * pairs/hour at 1 device)`` for the same
batch per device. CPU host devices share the machine's cores, and one device already
uses several threads, so on a host with few cores more host devices cannot scale
linearly: the core count is printed with the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

_DEVICES = flags.DEFINE_list("devices", "1,2,4", "device counts to measure (CPU: host devices)")
_BATCH = flags.DEFINE_list("batch_per_device", "1",
                           "pairs per device per call; 'auto' = as many as plan_batch allows")
_PAIRS = flags.DEFINE_integer("pairs", 16, "pairs registered per measurement")
_SHAPE = flags.DEFINE_list("shape", "48,48,36", "phantom grid (H, W, D)")
_TASK = flags.DEFINE_string("task", "date", "phantom task")
_ITERATIONS = flags.DEFINE_integer("iterations", 80, "Adam iterations")
_PLATFORM = flags.DEFINE_string("platform", "", "JAX_PLATFORMS for the children ('' keeps it)")
_ONE_THREAD = flags.DEFINE_bool(
    "one_thread_per_device", False, "CPU: run each host device on one thread (XLA's Eigen "
    "thread pool off), so that n host devices use n cores and scaling up to the core count "
    "shows the cost of sharding itself")
_SINGLE = flags.DEFINE_integer("_single", 0, "internal: measure this device count here")


def _measure(devices: int, batch_per_device: str) -> dict:
    """Runs in a child whose XLA_FLAGS already give ``devices`` host devices."""
    import jax
    import numpy as np

    from jaxreg import phantom, solver
    from jaxreg.solver import batching
    from jaxreg.features import sources

    if jax.device_count() < devices:
        raise ValueError(f"asked for {devices} devices, jax sees {jax.devices()}")
    shape = tuple(int(s) for s in _SHAPE.value)
    config = solver.ConvexAdamConfig(iterations=_ITERATIONS.value)
    bucket = batching.plan_buckets([shape], multiple=6)[0].shape
    cap = None if batch_per_device == "auto" else int(batch_per_device)
    device = jax.devices()[0]
    bpd = batching.plan_batch(bucket, config=config, batch_per_device=cap,
                              device_bytes=batching.device_memory_bytes(device))
    bpd = min(bpd, -(-_PAIRS.value // devices))  # no batch beyond the pairs there are
    mesh = jax.make_mesh((devices,), ("pairs",), devices=jax.devices()[:devices])

    source = sources.MindSource()
    fixed, moving = [], []
    for i in range(_PAIRS.value):
        pair = phantom.breast_pair(_TASK.value, shape=shape, seed=i)
        feats = source(pair["fixed"], pair["moving"])
        fixed.append(batching.pad_to(np.asarray(feats.fixed), bucket))
        moving.append(batching.pad_to(np.asarray(feats.moving), bucket))
    fixed, moving = np.stack(fixed), np.stack(moving)
    extents = np.array([shape] * _PAIRS.value)
    step = devices * bpd

    def run(start):
        sl = slice(start, start + step)
        return batching.register_batch(fixed[sl], moving[sl], extents[sl], config=config,
                                       mesh=mesh).block_until_ready()

    t0 = time.perf_counter()
    run(0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for start in range(0, _PAIRS.value, step):
        run(start)
    seconds = time.perf_counter() - t0
    return dict(devices=devices, batch_per_device=bpd, pairs=_PAIRS.value, first_s=first,
                seconds=seconds, pairs_per_hour=_PAIRS.value / seconds * 3600,
                device=str(device.device_kind), bucket=list(bucket))


def main(argv):
    del argv
    if _SINGLE.value:
        result = _measure(_SINGLE.value, _BATCH.value[0])
        print("RESULT " + json.dumps(result), flush=True)
        return
    rows = []
    for batch in _BATCH.value:
        for n in (int(d) for d in _DEVICES.value):
            env = dict(os.environ)
            kept = [f for f in env.get("XLA_FLAGS", "").split()
                    if not f.startswith("--xla_force_host_platform_device_count")]
            kept = [f for f in kept if not f.startswith("--xla_cpu_multi_thread_eigen")]
            if _ONE_THREAD.value:
                kept.append("--xla_cpu_multi_thread_eigen=false")
            env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={n}"])
            if _PLATFORM.value:
                env["JAX_PLATFORMS"] = _PLATFORM.value
            cmd = [sys.executable, "-m", "benchmarks.bench_batch", f"--_single={n}",
                   f"--batch_per_device={batch}", f"--pairs={_PAIRS.value}",
                   f"--shape={','.join(_SHAPE.value)}", f"--task={_TASK.value}",
                   f"--iterations={_ITERATIONS.value}"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(lines[-1][len("RESULT "):]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"jaxreg batched ConvexAdam + MIND-SSC, phantom {_TASK.value} "
          f"{'x'.join(_SHAPE.value)} (bucket {'x'.join(map(str, rows[0]['bucket']))}), "
          f"{_ITERATIONS.value} Adam iterations, device {rows[0]['device']}, "
          f"{cores} CPU cores available"
          + (", one thread per host device" if _ONE_THREAD.value else ""))
    print(f"{'devices':>7} {'batch/dev':>9} {'pairs':>5} {'first call s':>12} {'seconds':>8} "
          f"{'pairs/hour':>10} {'efficiency':>10}")
    for r in rows:
        base = next((b for b in rows if b["devices"] == 1
                     and b["batch_per_device"] == r["batch_per_device"]), None)
        eff = (f"{r['pairs_per_hour'] / (r['devices'] * base['pairs_per_hour']):.2f}"
               if base else "-")
        print(f"{r['devices']:>7} {r['batch_per_device']:>9} {r['pairs']:>5} "
              f"{r['first_s']:>12.1f} {r['seconds']:>8.1f} {r['pairs_per_hour']:>10.0f} "
              f"{eff:>10}")


if __name__ == "__main__":
    app.run(main)
