"""Breast MRI registration experiment: every pair of a study, or the built-in phantom.

    python -m experiments.breast --encoder=mind --workdir=/tmp/jaxreg-breast
    python -m experiments.breast --data_dir=/data/pairs --workdir=runs/mind \
        --config.solver.iterations=200
    python -m experiments.breast --encoder=litemedsam --workdir=/tmp/jaxreg-litemedsam
    python -m experiments.breast --encoder=sam --weights=sam_vit_b_01ec64.pth \
        --data_dir=/data/pairs --batch_per_device=4 --devices=0,1
    python -m experiments.breast --distributed ...   # several hosts, see README.md

See ``experiments/configs/breast.py`` for every setting and ``jaxreg.experiment`` for
the pairs CSV and the outputs. Every setting is a config field (``--config.a.b=v``);
``--encoder=X`` selects the config's defaults for method X, and five fields have short
flags: ``--data_dir``, ``--pairs``, ``--weights``, ``--batch_per_device`` and ``--devices``
(``--config.data_dir``, ``--config.pairs``, ``--config.weights``,
``--config.batch.batch_per_device``, ``--config.batch.devices``).

Exit codes: 0 every pair done; 1 some pairs failed (each named on stderr with its file
and problem, the others done); 2 a user error (bad setting, pairs CSV, workdir, weights),
printed as one line ``error: <file or setting>: <problem>``, with nothing registered.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import _flags
from jaxreg import cli
from jaxreg import compilation
from jaxreg import experiment
from jaxreg import io
from jaxreg.encoders import checkpoint as _checkpoint

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "breast.py")

# Errors of the user's files and settings: printed as one line, no traceback.
_USER_ERRORS = (io.InputError, _checkpoint.CheckpointError)


def _with_encoder_config(argv: list[str]) -> list[str]:
    """``--encoder=X`` selects the config file's defaults for X (``--config=...:X``), so
    that every ``--config.a.b=v`` applies on top of that encoder's defaults."""
    encoder, rest = None, []
    args = iter(argv[1:])
    for arg in args:
        if arg.startswith("--encoder="):
            encoder = arg.split("=", 1)[1]
        elif arg == "--encoder":
            encoder = next(args, "")
        else:
            rest.append(arg)
    if encoder is None:
        return argv
    if encoder not in experiment.ENCODERS:
        raise flags.Error(f"--encoder={encoder}: choose from {', '.join(experiment.ENCODERS)}")
    configs = [i for i, a in enumerate(rest) if a == "--config" or a.startswith("--config=")]
    if not configs:
        return [argv[0], f"--config={_DEFAULT_CONFIG}:{encoder}", f"--encoder={encoder}"] + rest
    i = configs[-1]
    value = rest[i].split("=", 1)[1] if "=" in rest[i] else rest[i + 1]
    path, _, given = value.partition(":")
    if given and given != encoder:
        raise flags.Error(f"--encoder={encoder} contradicts --config={value}")
    rest[i:i + (1 if "=" in rest[i] else 2)] = [f"--config={path}:{encoder}"]
    return [argv[0], f"--encoder={encoder}"] + rest


def _check_overrides(argv: list[str]) -> None:
    """Names an unknown ``--config.a.b`` field and the fields that exist there."""
    from experiments.configs import breast

    config = breast.get_config()
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0].split(".")
        node, seen = config, "config"
        for key in path:
            if not hasattr(node, "keys") or key not in node:
                fields = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
                raise flags.Error(f"{arg}: {seen} has no field {key!r} (fields: {fields})")
            node, seen = node[key], f"{seen}.{key}"


def _prepare_argv(argv: list[str]) -> list[str]:
    """The command line with ``--encoder`` folded into ``--config``, overrides checked.

    Runs before the flags are defined: ``DEFINE_config_file`` applies ``--config.a.b=v``
    from ``sys.argv`` as it is defined, and raises a traceback on an unknown field.
    """
    try:
        argv = _with_encoder_config(argv)
        _check_overrides(argv)
    except flags.Error as e:
        sys.exit(_one_line_error(e))
    return argv


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one-line errors (``error: ...``, exit 2)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(_one_line_error(e))
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections' own
        sys.exit(_one_line_error(f"a --config value cannot be used: {e}"))


def _one_line_error(error) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.argv = _prepare_argv(sys.argv)

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG,
    "Experiment config file (path[:encoder]); fields overridable as --config.a.b=v.")
_ENCODER = flags.DEFINE_enum("encoder", None, list(experiment.ENCODERS),
                             "Feature extractor: the config file's defaults for it "
                             "(same as --config=experiments/configs/breast.py:ENCODER).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/breast", "Output folder.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Redo finished pairs whose recorded "
                               "settings or inputs differ; without it such a workdir is "
                               "refused.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Several hosts: call "
                                 "jax.distributed.initialize() (auto-detected on TPU pods, "
                                 "SLURM, Open MPI; else give the three flags below).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_COMPILATION_CACHE = _flags.COMPILATION_CACHE
# Shorthands: --data_dir=X is --config.data_dir=X, and so on. Each is a config field
# (experiments/configs/breast.py), given a short flag because almost every run sets it.
_SHORTHANDS = {
    "data_dir": ("data_dir", "Folder with the volumes and pairs.csv; default: the built-in phantom."),
    "pairs": ("pairs", "Pairs CSV (mov_volume,fix_volume,...); a relative path is resolved "
              "against --data_dir when given, else against the current folder."),
    "weights": ("weights", "Encoder checkpoint (file or Hugging Face folder); default: searched, "
                "see jaxreg/encoders/registry.py."),
    "batch_per_device": ("batch.batch_per_device", "Pairs per device at once (vmap); capped by "
                         "the memory plan."),
    "devices": ("batch.devices", "Local devices to use: all (default), a count ('2'), or ids "
                "('0,3')."),
}
_SHORTHAND_FLAGS = {
    name: (flags.DEFINE_integer if name == "batch_per_device" else flags.DEFINE_string)(
        name, None, f"{text} Shorthand for --config.{field}.")
    for name, (field, text) in _SHORTHANDS.items()}


def _apply_shorthands(config) -> None:
    """Writes each shorthand flag given on the command line into its config field."""
    for name, (field, _) in _SHORTHANDS.items():
        value = _SHORTHAND_FLAGS[name].value
        if value is not None:
            *parents, leaf = field.split(".")
            node = config
            for key in parents:
                node = node[key]
            node[leaf] = value


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    _apply_shorthands(config)
    compilation.use_caches(_COMPILATION_CACHE.value)
    if _DISTRIBUTED.value:
        import jax

        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    try:
        study = experiment.from_configdict(config)  # the one place settings are checked
        rows, failures = experiment.run_study(study, _WORKDIR.value,
                                              overwrite=_OVERWRITE.value)
    except _USER_ERRORS as e:
        sys.exit(_one_line_error(e))
    import jax

    if jax.process_index() == 0:
        print(experiment.format_summary(rows))
        print(f"outputs in {os.path.abspath(_WORKDIR.value)}")
    if failures:
        print(f"{len(failures)} pair(s) failed:", *failures, sep="\n  ", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    try:
        app.run(main, flags_parser=parse_flags)
    except SystemExit as done:
        # Every output is written: skip XLA's teardown (cli.exit_now), except in a
        # jax.distributed job, whose shutdown runs at a normal exit.
        if flags.FLAGS.is_parsed() and _DISTRIBUTED.value:
            raise
        cli.exit_now(done.code)
