"""The breast experiment end to end on a tiny phantom, in a temporary folder."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import breast
from jaxreg import experiment
from jaxreg import io


def _config(tasks=("date", "lesion")):
    c = breast.get_config("mind")
    c.phantom.tasks = tasks
    c.phantom.shape = (40, 32, 24)
    c.solver.iterations = 20
    return c


def test_phantom_study_writes_outputs_and_improves_dice(tmp_path):
    rows, failures = experiment.run_study(_config(), str(tmp_path), progress=False)
    assert failures == [] and len(rows) == 2
    for row in rows:
        out = tmp_path / "pairs" / row["pair"]
        for name in ("field_voxels", "field_mm", "warped", "warped_breast", "warped_fgt"):
            assert (out / f"{name}.nii.gz").is_file()
        assert row["fgt_after_dice_1"] > row["fgt_before_dice_1"]
        assert row["field_error_mm"] > 0 and row["field_error_mm_before"] > 0
        assert row["folding_percent"] < 1.0
        warped_fgt = io.load_labels(str(out / "warped_fgt.nii.gz"))
        assert set(np.unique(warped_fgt.data)) <= {0, 1}  # nearest neighbour kept labels
    assert json.loads((tmp_path / "config.json").read_text())["registration"]["encoder"] == "mind"
    assert (tmp_path / "summary.csv").read_text().count("\n") == 3
    assert "fgt_after_dice_1" in experiment.format_summary(rows)


def test_known_phantom_deformation_is_recovered_at_default_size():
    from jaxreg import metrics, phantom, solver
    p = phantom.breast_pair("date")
    u = np.asarray(solver.register_mind(p["fixed"], p["moving"]))
    mask = p["fixed_breast"] > 0
    before = metrics.field_error(0 * p["true_field"], p["true_field"], mask=mask)
    after = metrics.field_error(u, p["true_field"], mask=mask)
    assert after < 0.7 * before, (before, after)  # measured 3.53 -> 1.98 mm


def test_rerun_skips_finished_pairs(tmp_path):
    config = _config(tasks=("date",))
    experiment.run_study(config, str(tmp_path), progress=False)
    metrics_file = tmp_path / "pairs" / "00_date" / "metrics.json"
    stamp = metrics_file.stat().st_mtime_ns
    rows, _ = experiment.run_study(config, str(tmp_path), progress=False)
    assert metrics_file.stat().st_mtime_ns == stamp and len(rows) == 1


def _write_csv(directory, header, rows):
    path = os.path.join(directory, "pairs.csv")
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join(r) + "\n")
    return path


def test_bad_pair_is_reported_and_skipped_others_finish(tmp_path):
    data = tmp_path / "data"
    csv_path = experiment.write_phantom_pairs(str(data), tasks=("date",), shape=(40, 32, 24))
    io.save_volume(str(data / "flat.nii.gz"), np.ones((40, 32, 24), np.float32), np.eye(4))
    (data / "truncated.nii.gz").write_bytes((data / "date_fixed.nii.gz").read_bytes()[:200])
    _write_csv(str(data), ["name", "mov_volume", "fix_volume"], [
        ["good", "date_moving.nii.gz", "date_fixed.nii.gz"],
        ["constant", "flat.nii.gz", "date_fixed.nii.gz"],
        ["broken", "date_moving.nii.gz", "truncated.nii.gz"],
    ])
    config = _config()
    config.data_dir = str(data)
    rows, failures = experiment.run_study(config, str(tmp_path / "run"), progress=False)
    assert [r["pair"] for r in rows] == ["good"]
    assert len(failures) == 2
    assert any("flat.nii.gz" in f for f in failures)
    assert any("truncated.nii.gz" in f for f in failures)
    left = sorted(os.listdir(tmp_path / "run" / "pairs"))
    assert left == ["good"]  # nothing half-written for the failed pairs
    del csv_path


def test_pairs_csv_errors_name_the_problem(tmp_path):
    path = _write_csv(str(tmp_path), ["mov_volume", "other"], [["a.nii.gz", "b"]])
    with pytest.raises(io.InputError, match="missing column.*fix_volume"):
        experiment.read_pairs(path)
    path = _write_csv(str(tmp_path), ["mov_volume", "fix_volume", "mov_fgt"], [])
    with pytest.raises(io.InputError, match="without their pair: fgt"):
        experiment.read_pairs(path)


def test_moving_on_another_grid_is_resampled_through_the_affines(tmp_path):
    data = tmp_path / "data"
    experiment.write_phantom_pairs(str(data), tasks=("date",), shape=(40, 32, 24))
    moving = io.load_volume(str(data / "date_moving.nii.gz"))
    flipped = moving.affine @ np.array([[-1, 0, 0, 39], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    io.save_volume(str(data / "flipped.nii.gz"), moving.data[::-1], flipped)
    fgt = io.load_labels(str(data / "date_moving_fgt.nii.gz"))
    io.save_volume(str(data / "flipped_fgt.nii.gz"), fgt.data[::-1], flipped)
    _write_csv(str(data), ["name", "mov_volume", "fix_volume", "mov_fgt", "fix_fgt"],
               [["flip", "flipped.nii.gz", "date_fixed.nii.gz", "flipped_fgt.nii.gz",
                 "date_fixed_fgt.nii.gz"]])
    config = _config()
    config.data_dir = str(data)
    rows, failures = experiment.run_study(config, str(tmp_path / "run"), progress=False)
    assert failures == []
    assert rows[0]["fgt_before_dice_1"] > 0.8  # the flip was undone before registering
    assert rows[0]["fgt_after_dice_1"] > rows[0]["fgt_before_dice_1"]


def test_cli_exits_non_zero_when_a_pair_fails(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    io.save_volume(str(data / "flat.nii.gz"), np.ones((24, 24, 24), np.float32), np.eye(4))
    _write_csv(str(data), ["mov_volume", "fix_volume"], [["flat.nii.gz", "flat.nii.gz"]])
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.breast", f"--data_dir={data}",
         f"--workdir={tmp_path / 'run'}", "--config.solver.iterations=2"],
        capture_output=True, encoding="utf-8", errors="replace", cwd=os.path.dirname(os.path.dirname(__file__)),
        timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "flat.nii.gz" in proc.stderr and "1 pair(s) failed" in proc.stderr


def test_cli_keeps_compiled_programs_for_the_next_run(tmp_path):
    cache = tmp_path / "xla"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.breast", f"--workdir={tmp_path / 'run'}",
         f"--compilation_cache={cache}", "--config.phantom.tasks=('date',)",
         "--config.phantom.shape=(40,32,24)", "--config.solver.iterations=2",
         "--config.qc=False"],
        capture_output=True, encoding="utf-8", errors="replace", cwd=os.path.dirname(os.path.dirname(__file__)),
        env={k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"},
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(name.endswith("-cache") for name in os.listdir(cache))
