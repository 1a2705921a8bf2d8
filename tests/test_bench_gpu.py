"""The accelerator benchmark's command works (on CPU, at --smoke sizes) and its peak table
matches device names as jax reports them."""

import json
import os
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_peak_table():
    # In a child: importing the script defines absl flags (--out, ...) that other
    # experiments' scripts, imported by other tests in this process, define too.
    cases = [("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
             ("NVIDIA H100 80GB HBM3", "float32", 494.7), ("NVIDIA H100 PCIe", "bfloat16", 756.0),
             ("NVIDIA H200", "bfloat16", 989.4), ("TPU v5 lite", "float32", 197.0),
             ("cpu", "bfloat16", None)]
    code = ("import json, sys; from benchmarks import bench_gpu; print(json.dumps("
            f"[bench_gpu.peak_tflops(k, d) for k, d, _ in {cases!r}]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=_REPO, capture_output=True,
                         encoding="utf-8", errors="replace", check=True).stdout
    assert json.loads(out) == [peak for _, _, peak in cases]


def test_every_stage_runs_and_records(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.bench_gpu", "--smoke", f"--out={out}",
           f"--scratch={tmp_path / 'scratch'}", "--encoders=mind,litemedsam", "--dtypes=float32",
           "--warm_process=", "--iterations=5", "--trace"]
    proc = subprocess.run(cmd, cwd=_REPO, capture_output=True, encoding="utf-8", errors="replace",
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # What comes back from a device call: a few small files, the bulky data left in scratch.
    assert sorted(os.listdir(out)) == ["bench_gpu.jsonl", "mind-batch.log", "pairs.log",
                                       "trace.tar.gz"]
    with open(out / "bench_gpu.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    by_stage = {}
    for row in rows:
        assert "error" not in row, row
        by_stage.setdefault(row["stage"], []).append(row)
    assert by_stage["machine"][0]["backend"] == "cpu"
    enc, = by_stage["encoders"]
    assert enc["encoder"] == "litemedsam" and enc["slices_per_s"] > 0
    assert enc["gflop_per_slice"] > 0 and enc["mfu"] is None  # no peak known for a CPU
    pairs = {r["encoder"]: r for r in by_stage["pairs"]}
    assert set(pairs) == {"mind", "litemedsam"}
    for row in pairs.values():
        # Two pairs in one process: the first pays for compiling, the second does not.
        assert row["process"] == "cold" and row["process_s"] > row["first_pair_s"]
        assert row["warm_solving_s"] < row["first_solving_s"]
    assert pairs["litemedsam"]["warm_encoding_s"] > 0
    register, batch = by_stage["mind"]
    assert register["warm_s"] < register["first_s"] and batch["exit"] == 0
    fine, = by_stage["fine"]
    assert all(fine[f"step_{k}_ms"] > 0 for k in ("similarity", "regulariser", "loss",
                                                   "adam_update"))
