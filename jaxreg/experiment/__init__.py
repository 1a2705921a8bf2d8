"""A registration study over a list of subject pairs: the library behind the CLIs.

``run_study(config, workdir)`` reads the pairs (a CSV, or the built-in breast phantom),
registers each, writes per pair the field (voxels and millimetres), the warped moving
image and warped label maps, and a metrics row, then a summary table. It is what
``python -m experiments.breast`` calls; it can be called from Python the same way.

The modules, by job:

- :mod:`~jaxreg.experiment.pairs`: the pairs CSV (columns, safe pair names, where
  relative paths start) and the built-in phantom.
- :mod:`~jaxreg.experiment.settings`: the ConfigDict checked once and turned into a
  frozen :class:`StudyConfig` (below that edge everything is typed), the settings
  recorded per pair.
- :mod:`~jaxreg.experiment.pipeline`: one pair loaded onto the fixed grid with its label
  maps and masks; :func:`jaxreg.register` registers it (:mod:`jaxreg.registration`).
- :mod:`~jaxreg.experiment.outputs`: a pair's files and scores, the summary table.
- :mod:`~jaxreg.experiment.workdir`: one run per workdir (a lock), pair folders written
  whole (staging, then rename), leftovers of a killed run removed, settings recorded.
- :mod:`~jaxreg.experiment.study`: every pair, one at a time or (``batched``) a bucket
  at a time over devices and hosts; a pair that fails is reported and skipped, the
  others go on.
"""

from jaxreg.experiment.batched import grid_shape
from jaxreg.experiment.outputs import format_summary, write_pair
from jaxreg.experiment.pairs import Pair, check_name, find_pairs_csv, read_pairs
from jaxreg.experiment.pairs import write_phantom_pairs
from jaxreg.experiment.pipeline import LoadedPair, load_pair
from jaxreg.experiment.settings import ENCODERS, PYRAMIDS, ConfigError, MindSettings
from jaxreg.experiment.settings import PhantomSettings, RegistrationConfig, StudyConfig
from jaxreg.experiment.settings import from_configdict
from jaxreg.experiment.study import run_pair, run_study, select_devices
from jaxreg.experiment.workdir import Workdir, WorkdirError
from jaxreg.registration import make_source

__all__ = [
    "ENCODERS", "PYRAMIDS", "ConfigError", "LoadedPair", "MindSettings", "Pair",
    "PhantomSettings", "RegistrationConfig", "StudyConfig", "Workdir", "WorkdirError",
    "check_name", "find_pairs_csv", "format_summary", "from_configdict",
    "grid_shape", "load_pair", "make_source", "read_pairs",
    "run_pair", "run_study", "select_devices",
    "write_pair", "write_phantom_pairs",
]
