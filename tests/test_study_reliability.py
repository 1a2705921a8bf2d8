"""The study under bad input: pair names, CSVs, paths, settings, workdirs, crashes, reruns.

Each class of problem found by the input audit has a test here; the CLI's one-line errors
are checked in a subprocess, the rest in memory.
"""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import breast
from jaxreg import experiment
from jaxreg import io
from jaxreg import registration
from jaxreg.experiment import settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir="", **solver):
    c = breast.get_config("mind")
    c.data_dir = data_dir
    c.phantom.tasks = ("date",)
    c.phantom.shape = (40, 32, 24)
    c.solver.iterations = 3
    c.qc = False
    c.metrics.hd95 = False
    c.solver.update(solver)
    return c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One small phantom pair written as files (absolute paths in a CSV are built on it)."""
    folder = tmp_path_factory.mktemp("data")
    experiment.write_phantom_pairs(str(folder), tasks=("date",), shape=(40, 32, 24))
    return folder


def _csv(path, text):
    path.write_text(text)
    return str(path)


# Pair names -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["/../../../tmp/jaxreg_escape", "sub/dir", "../x", "..",
                                  ".hidden", "a b", "x" * 129, "C:\\evil"])
def test_unsafe_pair_names_are_refused_before_anything_is_written(name, data, tmp_path):
    csv_path = _csv(tmp_path / "pairs.csv", "name,mov_volume,fix_volume\n"
                    f"{name},{data}/date_moving.nii.gz,{data}/date_fixed.nii.gz\n")
    with pytest.raises(io.InputError, match=r"line 2: pair name .* is not allowed"):
        experiment.read_pairs(csv_path)
    config = _config()
    config.pairs = csv_path
    with pytest.raises(io.InputError, match="not allowed"):
        experiment.run_study(config, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()  # refused before the workdir was touched
    assert not os.path.exists("/tmp/jaxreg_escape")


def test_names_made_from_file_names_are_sanitised(tmp_path):
    csv_path = _csv(tmp_path / "pairs.csv", "mov_volume,fix_volume\n"
                    "../scans/pat 1 (t1).nii.gz,b.nii.gz\nc.nii.gz,d.nii.gz\n")
    names = [p.name for p in experiment.read_pairs(csv_path)]
    assert names == ["0001_pat_1__t1_", "0002_c"]


def test_duplicate_names_are_refused_ignoring_case(tmp_path):
    csv_path = _csv(tmp_path / "pairs.csv", "name,mov_volume,fix_volume\n"
                    "Case1,a.nii.gz,b.nii.gz\ncase1,c.nii.gz,d.nii.gz\n")
    with pytest.raises(io.InputError, match="line 3: pair name 'case1' is already used on line 2"):
        experiment.read_pairs(csv_path)


# The pairs CSV and where it is looked for -------------------------------------------------

def test_csv_with_a_byte_order_mark_keeps_its_first_column(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes("\ufeffname,mov_volume,fix_volume\nx,a.nii.gz,b.nii.gz\n".encode("utf-8"))
    (pair,) = experiment.read_pairs(str(path))
    assert pair.name == "x" and pair.moving == str(tmp_path / "a.nii.gz")


@pytest.mark.parametrize("text, message", [
    ("", "the CSV is empty"),
    ("mov_volume,fix_volume\n\n", "has a header but no pairs"),
    ("mov_volume,other\na,b\n", "missing column.*fix_volume"),
    ("mov_volume,fix_volume,mov_fgt\na,b,c\n", "without their pair: fgt"),
    ("mov_volume,fix_volume\na.nii.gz,\n", "line 2: mov_volume and fix_volume must both be set"),
    ("mov_volume,fix_volume,mov_volume\na,b,c\n", "mov_volume appear twice"),
])
def test_bad_csvs_name_the_file_and_the_problem(text, message, tmp_path):
    with pytest.raises(io.InputError, match=message):
        experiment.read_pairs(_csv(tmp_path / "pairs.csv", text))


def test_relative_pairs_is_resolved_against_data_dir_and_the_error_says_where(tmp_path,
                                                                              monkeypatch):
    (tmp_path / "d").mkdir()
    _csv(tmp_path / "d" / "list.csv", "mov_volume,fix_volume\na,b\n")
    monkeypatch.chdir(tmp_path)
    assert experiment.find_pairs_csv("list.csv", str(tmp_path / "d")) == str(
        tmp_path / "d" / "list.csv")
    with pytest.raises(io.InputError, match=r"d/other.csv: pairs CSV not found \(pairs="
                                            r"other.csv resolved against data_dir\)"):
        experiment.find_pairs_csv("other.csv", str(tmp_path / "d"))
    with pytest.raises(io.InputError, match="resolved against the current folder"):
        experiment.find_pairs_csv("list.csv", "")
    with pytest.raises(io.InputError, match="data_dir does not exist"):
        experiment.find_pairs_csv("", str(tmp_path / "nowhere"))


def test_a_missing_file_fails_its_pair_only(data, tmp_path):
    csv_path = _csv(tmp_path / "pairs.csv", "name,mov_volume,fix_volume\n"
                    f"good,{data}/date_moving.nii.gz,{data}/date_fixed.nii.gz\n"
                    f"typo,{data}/date_movng.nii.gz,{data}/date_fixed.nii.gz\n")
    config = _config()
    config.pairs = csv_path
    rows, failures = experiment.run_study(config, str(tmp_path / "run"), progress=False)
    assert [r["pair"] for r in rows] == ["good"]
    (failure,) = failures
    assert "date_movng.nii.gz: file not found (mov_volume of pairs.csv line 3)" in failure


def test_a_damaged_true_field_is_reported_not_scored(data, tmp_path):
    """The true field goes through the same verified reader as the images."""
    raw = bytearray((data / "date_true_field.nii.gz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "bad_field.nii.gz").write_bytes(bytes(raw))
    csv_path = _csv(tmp_path / "pairs.csv", "name,mov_volume,fix_volume,true_field\n"
                    f"p,{data}/date_moving.nii.gz,{data}/date_fixed.nii.gz,"
                    f"{tmp_path}/bad_field.nii.gz\n")
    config = _config()
    config.pairs, config.batch.devices = csv_path, "1"
    rows, failures = experiment.run_study(config, str(tmp_path / "run"), progress=False)
    assert rows == []
    (failure,) = failures
    assert "bad_field.nii.gz: file is corrupt" in failure


# Settings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("solver.iterations", -1, "iterations"),
    ("solver.grid_sp", 0, "grid_sp"),
    ("solver.disp_hw", -1, "disp_hw"),
    ("solver.learning_rate", float("nan"), "learning_rate"),
    ("solver.learning_rate", float("inf"), "learning_rate"),
    ("features.pyramid", "jiont", "features.pyramid='jiont': must be one of none, joint"),
    ("features.percentiles", (99.0, 1.0), "features.percentiles"),
    ("features.render", "edges",
     "features.render='edges': must be one of intensity, gradient, auto"),
    ("features.dtype", "float16", "features.dtype"),
    ("features.attention", "flash", "features.attention='flash': must be one of xla, cudnn"),
    ("batch.batch_per_device", 0, "batch.batch_per_device"),
    ("phantom.tasks", ("dates",), "phantom.tasks"),
])
def test_nonsense_settings_are_refused_naming_the_field(field, value, message, tmp_path):
    config = breast.get_config("litemedsam" if field.startswith("features.") else "mind")
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(experiment.ConfigError, match=message.replace("(", r"\(")):
        experiment.run_study(config, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()  # refused before the workdir was made


def test_later_feature_settings_are_recorded_only_off_their_reference():
    config = breast.get_config("litemedsam")
    assert settings.result_settings(experiment.from_configdict(config))["features"][
        "render"] == "auto"  # the encoders' default since it was measured
    config.features.render = "intensity"
    recorded = settings.result_settings(experiment.from_configdict(config))["features"]
    for field in ("render", "shifts", "upsample", "guide_sigma_spatial", "guide_sigma_range"):
        assert field not in recorded, field  # earlier results stay valid
    config.features.render, config.features.shifts = "gradient", 2
    config.features.upsample = "guided"
    study = experiment.from_configdict(config)
    assert study.registration.features.render == "gradient"
    recorded = settings.result_settings(study)["features"]
    assert (recorded["render"], recorded["shifts"], recorded["upsample"]) == (
        "gradient", 2, "guided")


def test_cudnn_attention_off_a_gpu_is_refused_before_loading_weights():
    config = breast.get_config("dinov2")  # no dinov2 weights here: the check comes first
    config.features.attention = "cudnn"
    settings_ = experiment.from_configdict(config).registration
    assert settings_.attention == "cudnn"
    with pytest.raises(experiment.ConfigError, match="features.attention='cudnn' needs an "
                       "NVIDIA GPU and bfloat16 \\(backend cpu, dtype float32\\)"):
        registration.make_source(settings_)


def test_mind_normalisation_follows_features_percentiles(data):
    pair = experiment.read_pairs(str(data / "pairs.csv"))[0]
    config = _config()
    config.features.percentiles = (5.0, 95.0)
    clipped, default = (experiment.from_configdict(c).registration for c in (config, _config()))
    loaded = experiment.load_pair(pair, config=default)
    a = registration.make_source(clipped)(loaded.fixed.data, loaded.moving.data).fixed
    b = registration.make_source(default)(loaded.fixed.data, loaded.moving.data).fixed
    assert float(abs(a - b).max()) > 0.1  # was fixed at (0.5, 99.5) for MIND


# The workdir --------------------------------------------------------------------------------

def test_workdir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(experiment.WorkdirError, match="workdir is a file"):
        experiment.run_study(_config(), str(tmp_path / "file"), progress=False)
    with pytest.raises(experiment.WorkdirError, match="not writable"):
        experiment.run_study(_config(), str(tmp_path / "file" / "below"), progress=False)


def test_a_second_run_on_a_busy_workdir_fails_at_once_naming_the_first(tmp_path):
    with experiment.Workdir(str(tmp_path)):
        with pytest.raises(experiment.WorkdirError, match=rf"in use by another jaxreg run "
                                                          rf"\(pid {os.getpid()} on"):
            experiment.run_study(_config(), str(tmp_path), progress=False)
    with experiment.Workdir(str(tmp_path)):  # released on exit
        pass


def test_the_lock_of_a_dead_run_does_not_block(tmp_path):
    """A process killed while holding the lock: the kernel releases it with the process."""
    script = (f"import fcntl, os; fd = os.open({str(tmp_path / '.jaxreg.lock')!r}, "
              f"os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os._exit(9)")
    subprocess.run([sys.executable, "-c", script], check=False)
    with experiment.Workdir(str(tmp_path)):
        pass


def test_leftovers_of_a_killed_run_are_removed_and_the_pair_redone(data, tmp_path):
    config = _config(str(data))
    experiment.run_study(config, str(tmp_path), progress=False)
    done = tmp_path / "pairs" / "00_date"
    # What kill -9 during writing leaves: a staging folder with partial files (and the
    # hidden folders of earlier versions), and no finished folder.
    os.rename(done, tmp_path / ".staging" / "00_date.x1y2")
    (tmp_path / ".staging" / "00_date.x1y2" / "metrics.json").unlink()
    (tmp_path / "pairs" / ".00_date.old").mkdir()
    rows, failures = experiment.run_study(config, str(tmp_path), progress=False)
    assert failures == [] and [r["pair"] for r in rows] == ["00_date"]
    assert os.listdir(tmp_path / ".staging") == [] and os.listdir(tmp_path / "pairs") == ["00_date"]


def test_rerun_with_other_settings_is_refused_then_redone_with_overwrite(data, tmp_path):
    config = _config(str(data))
    experiment.run_study(config, str(tmp_path), progress=False)
    recorded = json.loads((tmp_path / "pairs" / "00_date" / "settings.json").read_text())
    assert recorded["settings"]["solver"]["iterations"] == 3
    assert recorded["inputs"]["mov_volume"] == str(data / "date_moving.nii.gz")
    first = (tmp_path / "pairs" / "00_date" / "field_voxels.nii.gz").read_bytes()

    config.solver.iterations = 4
    with pytest.raises(experiment.ConfigError,
                       match=r"1 finished pair\(s\) were made with other settings or inputs "
                             r"\(e.g. 00_date: settings.solver.iterations: 3 -> 4\); rerun "
                             r"with --overwrite"):
        experiment.run_study(config, str(tmp_path), progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["registration"]["solver"]["iterations"] == 3

    rows, failures = experiment.run_study(config, str(tmp_path), progress=False, overwrite=True)
    assert failures == [] and len(rows) == 1
    recorded = json.loads((tmp_path / "pairs" / "00_date" / "settings.json").read_text())
    assert recorded["settings"]["solver"]["iterations"] == 4
    assert (tmp_path / "pairs" / "00_date" / "field_voxels.nii.gz").read_bytes() != first

    config.batch.devices, config.qc = "1", True  # speed and pictures do not change results
    experiment.run_study(config, str(tmp_path), progress=False)


# A pair's registration going wrong --------------------------------------------------------

def test_a_non_finite_field_fails_the_pair_and_nothing_is_written(data, tmp_path, monkeypatch):
    def diverged(fixed, moving, **kwargs):
        return np.full(fixed.shape[:-1] + (3,), np.nan, np.float32)

    monkeypatch.setattr(registration.solver, "convex_adam", diverged)
    config = _config(str(data))
    config.batch.devices = "1"  # one pair at a time: the path that calls jaxreg.register
    rows, failures = experiment.run_study(config, str(tmp_path), progress=False)
    assert rows == []
    (failure,) = failures
    assert "00_date" in failure and "NaN" in failure
    assert os.listdir(tmp_path / "pairs") == [] and os.listdir(tmp_path / ".staging") == []


def test_a_bug_in_one_pair_does_not_stop_the_others(data, tmp_path, monkeypatch):
    csv_path = _csv(tmp_path / "pairs.csv", "name,mov_volume,fix_volume\n"
                    f"a,{data}/date_moving.nii.gz,{data}/date_fixed.nii.gz\n"
                    f"b,{data}/date_fixed.nii.gz,{data}/date_moving.nii.gz\n")
    real = registration.register_on_grid
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ZeroDivisionError("integer modulo by zero")
        return real(*args, **kwargs)

    monkeypatch.setattr(registration, "register_on_grid", flaky)
    config = _config()
    config.pairs, config.batch.devices = csv_path, "1"
    rows, failures = experiment.run_study(config, str(tmp_path / "run"), progress=False)
    assert [r["pair"] for r in rows] == ["b"]
    assert failures == ["a: internal error ZeroDivisionError: integer modulo by zero (a bug: "
                        "please report it with the traceback in the log)"]


def test_label_map_covering_part_of_its_image_gives_a_warning(data, tmp_path, caplog):
    fgt = io.load_labels(str(data / "date_fixed_fgt.nii.gz"))
    half = fgt.data[:20]
    io.save_volume(str(tmp_path / "half_fgt.nii.gz"), half, fgt.affine)
    csv_path = _csv(tmp_path / "pairs.csv", "name,mov_volume,fix_volume,mov_fgt,fix_fgt\n"
                    f"p,{data}/date_moving.nii.gz,{data}/date_fixed.nii.gz,"
                    f"{data}/date_moving_fgt.nii.gz,{tmp_path}/half_fgt.nii.gz\n")
    pair = experiment.read_pairs(csv_path)[0]
    with caplog.at_level(logging.WARNING):
        loaded = experiment.load_pair(pair, config=experiment.RegistrationConfig())
    assert "half_fgt.nii.gz: the label map covers only 50% of its image" in caplog.text
    assert loaded.labels["fgt"][1].shape == (40, 32, 24)


# The command line ---------------------------------------------------------------------------

def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "experiments.breast", *args],
                          capture_output=True, encoding="utf-8", errors="replace", cwd=cwd, timeout=300)


def test_cli_user_errors_are_one_line_without_traceback(data, tmp_path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "dup.csv").write_text("name,mov_volume,fix_volume\nx,a,b\nx,c,d\n")
    (tmp_path / "afile").write_text("")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    cases = [
        ([f"--pairs={tmp_path}/none.csv"], "none.csv: pairs CSV not found"),
        ([f"--pairs={tmp_path}/empty.csv"], "empty.csv: the CSV is empty"),
        ([f"--pairs={tmp_path}/dup.csv"], "pair name 'x' is already used"),
        ([f"--data_dir={data}", "--workdir=" + str(tmp_path / "afile")], "workdir is a file"),
        (["--config.solver.iterationz=3"], "config.solver has no field 'iterationz'"),
        (["--config.solver.learning_rate=nan"], "learning_rate"),
        (["--config.solver.iterations=abc"], "--config"),
        (["--encoder=sam", f"--weights={tmp_path}/bad.pth"], "bad.pth"),
    ]
    for args, message in cases:
        proc = _cli(f"--workdir={tmp_path / 'run'}", *args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and message in lines[0], (args, proc.stderr[-2000:])


def test_encoder_flag_keeps_every_config_override(monkeypatch):
    """--encoder=litemedsam --config.solver.iterations=80 used to run 1000 iterations."""
    from absl import flags
    from ml_collections import config_flags

    from experiments import breast as cli

    argv = cli._with_encoder_config(["prog", "--encoder=litemedsam",
                                     "--config.solver.iterations=80"])
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads overrides as it is defined
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", cli._DEFAULT_CONFIG, flag_values=values)
    flags.DEFINE_string("encoder", None, "", flag_values=values)
    values(argv)
    config = values.config
    assert config.encoder == "litemedsam" and config.solver.iterations == 80
    assert config.solver.learning_rate == 3.0  # the rest is litemedsam's defaults
    assert config.features.pyramid == "joint"
