"""Breast MRI registration experiment: every pair of a study, or the built-in phantom.

    python -m experiments.breast --encoder=mind --workdir=/tmp/jaxreg-breast
    python -m experiments.breast --data_dir=/data/pairs --workdir=runs/mind \
        --config.solver.iterations=200
    python -m experiments.breast --encoder=litemedsam --workdir=/tmp/jaxreg-litemedsam
    python -m experiments.breast --encoder=sam --weights=sam_vit_b_01ec64.pth \
        --data_dir=/data/pairs --batch_per_device=4 --devices=0,1
    python -m experiments.breast --distributed ...   # several hosts, see README.md

See ``experiments/configs/breast.py`` for every setting and ``jaxreg.experiment`` for
the pairs CSV and the outputs.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from jaxreg import experiment
from jaxreg.encoders import registry

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "breast.py"),
    "Experiment config file (path[:encoder]); fields overridable as --config.a.b=v.")
_ENCODER = flags.DEFINE_enum("encoder", None, list(experiment.ENCODERS),
                             "Feature extractor; overrides config.encoder.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder with pairs.csv; default: phantom.")
_PAIRS = flags.DEFINE_string("pairs", None, "Pairs CSV (mov_volume,fix_volume,...).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/breast", "Output folder.")
_BATCH = flags.DEFINE_integer("batch_per_device", None, "Pairs per device at once (vmap); "
                              "capped by the memory plan. Overrides config.batch.")
_DEVICES = flags.DEFINE_string("devices", None, "Local devices to use: all (default), a "
                               "count ('2'), or ids ('0,3').")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Several hosts: call "
                                 "jax.distributed.initialize() (auto-detected on TPU pods, "
                                 "SLURM, Open MPI; else give the three flags below).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_WEIGHTS = flags.DEFINE_string("weights", None, "Encoder checkpoint (file or Hugging Face "
                               "folder); default: searched, see jaxreg/encoders/registry.py.")


def _apply_changes(config, changed, default):
    """Copies into ``config`` the fields where ``changed`` differs from ``default``."""
    for key, value in changed.items():
        if key == "encoder":
            continue
        if hasattr(value, "items"):
            _apply_changes(config[key], value, default[key])
        elif value != default[key]:
            config[key] = value


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if _ENCODER.value and _ENCODER.value != config.encoder:
        # The encoder's own defaults, keeping every field set on the command line.
        from experiments.configs import breast
        overrides = config
        config = breast.get_config(_ENCODER.value)
        _apply_changes(config, overrides, breast.get_config(overrides.encoder))
    if _DATA_DIR.value is not None:
        config.data_dir = _DATA_DIR.value
    if _PAIRS.value is not None:
        config.pairs = _PAIRS.value
    if _WEIGHTS.value is not None:
        config.weights = _WEIGHTS.value
    if _BATCH.value is not None:
        config.batch.batch_per_device = _BATCH.value
    if _DEVICES.value is not None:
        config.batch.devices = _DEVICES.value
    if _DISTRIBUTED.value:
        import jax

        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    try:
        rows, failures = experiment.run_study(config, _WORKDIR.value)
    except registry.WeightsNotFoundError as e:
        sys.exit(f"error: {e}")
    import jax

    if jax.process_index() == 0:
        print(experiment.format_summary(rows))
        print(f"outputs in {os.path.abspath(_WORKDIR.value)}")
    if failures:
        print(f"{len(failures)} pair(s) failed:", *failures, sep="\n  ", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
