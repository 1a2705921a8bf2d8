"""The experiment over several devices and hosts: buckets, sharded batches, memory plan."""

import dataclasses
import os
import socket
import subprocess
import sys
import unittest.mock

import numpy as np
import pytest

from experiments.configs import breast
from jaxreg import experiment
from jaxreg import io
from jaxreg.encoders import registry
from jaxreg.solver import batching

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mixed_pairs_csv(tmp_path):
    """Phantom pairs of two grid sizes in one pairs CSV (absolute paths)."""
    lines = []
    for shape, tasks in (((40, 32, 24), ("date", "lesion", "sequence")),
                         ((34, 30, 18), ("date",))):
        folder = tmp_path / f"data_{shape[0]}"
        csv_path = experiment.write_phantom_pairs(str(folder), tasks=tasks, shape=shape)
        rows = open(csv_path).read().splitlines()
        header = rows[0]
        for row in rows[1:]:
            cells = row.split(",")
            cells[0] = f"{cells[0]}_{shape[0]}"
            cells[1:] = [str(folder / c) for c in cells[1:]]
            lines.append(",".join(cells))
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join([header] + lines) + "\n")
    return str(path)


def _config(csv_path, encoder="mind"):
    c = breast.get_config(encoder)
    c.pairs = csv_path
    c.solver.iterations = 5
    c.qc = False
    c.metrics.hd95 = False
    return c


def test_sharded_study_of_mixed_sizes_equals_the_sequential_study(tmp_path):
    csv_path = _mixed_pairs_csv(tmp_path)
    pairs = experiment.read_pairs(csv_path)
    buckets = batching.plan_buckets([experiment.grid_shape(p.fixed) for p in pairs], multiple=6)
    assert len(buckets) == 2  # the two sizes are not merged (too much padding)
    c = _config(csv_path)
    c.batch.batch_per_device = 2  # 2 host devices in the test session: 4 pairs at once
    rows, failures = experiment.run_study(c, str(tmp_path / "batched"), progress=False)
    assert failures == [] and len(rows) == 4
    c.batch.batch_per_device, c.batch.devices = 1, "1"  # one pair at a time, unpadded
    plain_rows, failures = experiment.run_study(c, str(tmp_path / "plain"), progress=False)
    assert failures == [] and len(plain_rows) == 4
    for pair in pairs:
        got, expected = (io.load_field(
            str(tmp_path / run / "pairs" / pair.name / "field_voxels.nii.gz"))
            for run in ("batched", "plain"))
        assert got.shape == expected.shape
        assert np.abs(expected).max() > 0.5  # the pairs really move
        np.testing.assert_allclose(got, expected, atol=1e-5)
    key = lambda rows: {r["pair"]: r for r in rows}
    for name, row in key(rows).items():
        for metric, value in row.items():
            if metric.startswith(("dice", "jac", "err")):
                assert value == pytest.approx(key(plain_rows)[name][metric], abs=1e-4), metric


def test_feature_encoder_study_runs_batched_over_two_devices(tmp_path):
    from flax import nnx

    from jaxreg.encoders import dinov3
    from jaxreg.encoders import checkpoint as _checkpoint

    weights = tmp_path / "dinov3_vits16.safetensors"
    _checkpoint.write_safetensors(
        _checkpoint.flat_params(dinov3.create("dinov3_vits16", rngs=nnx.Rngs(0))), weights)
    csv_path = _mixed_pairs_csv(tmp_path)
    c = _config(csv_path, encoder="dinov3")
    c.weights = str(weights)
    c.features.gap = 4
    c.features.image_size = 32
    c.batch.batch_per_device = 1
    small = dataclasses.replace(registry.ENCODERS["dinov3"], variant="dinov3_vits16")
    with unittest.mock.patch.dict(registry.ENCODERS, {"dinov3": small}):  # ViT-S: quicker
        rows, failures = experiment.run_study(c, str(tmp_path / "run"), progress=False)
    assert failures == [] and len(rows) == 4
    assert all(np.isfinite(r["field_error_mm"]) for r in rows)


def test_pair_too_large_for_the_memory_plan_fails_with_a_clear_message(tmp_path, monkeypatch):
    csv_path = _mixed_pairs_csv(tmp_path)
    c = _config(csv_path)
    monkeypatch.setattr(batching, "device_memory_bytes", lambda device=None: 2**20)
    rows, failures = experiment.run_study(c, str(tmp_path / "run"), progress=False)
    assert rows == [] and len(failures) == 4
    assert all("needs ~" in f and "GiB" in f for f in failures), failures


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_hosts_split_the_pairs_and_host_0_writes_the_summary(tmp_path):
    csv_path = _mixed_pairs_csv(tmp_path)
    workdir = tmp_path / "run"
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "experiments.breast", "--encoder=mind", f"--pairs={csv_path}",
         f"--workdir={workdir}", "--config.solver.iterations=5", "--config.qc=False",
         "--distributed", f"--coordinator_address=localhost:{port}", "--num_processes=2",
         f"--process_id={i}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
        for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "outputs in" in outs[0][0] and "outputs in" not in outs[1][0]  # host 0 prints
    names = sorted(os.listdir(workdir / "pairs"))
    assert len(names) == 4 and all((workdir / "pairs" / n / "metrics.json").is_file()
                                   for n in names)
    assert (workdir / "summary.csv").read_text().count("\n") == 5
