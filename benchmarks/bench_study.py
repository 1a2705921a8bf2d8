r"""A study's fixed cost per pair: what a pair costs before its registration starts.

    python -m benchmarks.bench_study                       # 5000 failing, 40 running pairs
    python -m benchmarks.bench_study --failing=500 --running=10

Two measurements, each printed with its command line and the machine:

- **Pairs that fail early.** ``--failing`` pairs whose files do not exist, registered by
  ``python -m experiments.breast --encoder=mind --pairs=...`` in a fresh process, against
  the same command with one such pair; the difference divided by ``failing - 1`` is the
  cost of one failing pair (reading its CSV row, its settings record, its attempt, its
  message). Median of ``--repeats`` processes each.
- **Pairs that run.** ``--running`` copies of one small phantom pair (``--shape``) in one
  ``jaxreg.experiment.run_study`` call, in this process. For each pair, the seconds from
  the study picking it up (``Workdir.write_pair`` called) to ``jaxreg.register`` being
  called, less the time spent reading its images (``pipeline.load_pair``): the study's
  own bookkeeping before registration. Median and largest over the pairs (the first
  pair, which compiles, is left out).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import common

_FAILING = flags.DEFINE_integer("failing", 5000, "pairs whose files do not exist")
_RUNNING = flags.DEFINE_integer("running", 40, "copies of one small phantom pair")
_SHAPE = flags.DEFINE_list("shape", ["32", "24", "16"], "the running pairs' grid")
_REPEATS = flags.DEFINE_integer("repeats", 3, "processes per failing-pairs measurement")


def _failing_csv(folder: str, n: int) -> str:
    path = os.path.join(folder, f"missing_{n}.csv")
    with open(path, "w") as f:
        f.write("name,mov_volume,fix_volume\n")
        f.writelines(f"p{i},/nonexistent/m{i}.nii.gz,/nonexistent/f{i}.nii.gz\n"
                     for i in range(n))
    return path


def _process_seconds(csv_path: str, workdir: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "experiments.breast", "--encoder=mind",
                    f"--pairs={csv_path}", f"--workdir={workdir}"], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def failing(folder: str, n: int, repeats: int) -> tuple[float, float, float]:
    """(seconds for n pairs, seconds for 1 pair, ms per extra pair), medians."""
    big, one = _failing_csv(folder, n), _failing_csv(folder, 1)
    times = {big: [], one: []}
    for r in range(repeats):  # alternate, so that drift in the machine hits both
        for path in (big, one):
            work = os.path.join(folder, f"w{r}_{os.path.basename(path)}")
            times[path].append(_process_seconds(path, work))
    t_big, t_one = statistics.median(times[big]), statistics.median(times[one])
    return t_big, t_one, 1000.0 * (t_big - t_one) / max(n - 1, 1)


def running(folder: str, n: int, shape: tuple[int, ...]) -> list[float]:
    """Per pair: seconds of study bookkeeping before registration (loading excluded)."""
    from jaxreg import registration
    from experiments.configs import breast
    from jaxreg.experiment import pairs, pipeline, study, workdir

    phantom_dir = os.path.join(folder, "phantom")
    csv_one = pairs.write_phantom_pairs(phantom_dir, tasks=("date",), shape=shape)
    with open(csv_one) as f:
        header, row = f.readline(), f.readline()
    csv_path = os.path.join(phantom_dir, "many.csv")
    with open(csv_path, "w") as f:
        f.write(header)
        f.writelines(row.replace("00_date", f"p{i:04d}", 1) for i in range(n))

    marks: dict[str, float] = {}
    out: list[float] = []
    originals = (workdir.Workdir.write_pair, pipeline.load_pair, registration.register)

    def write_pair(self, name, settings, work):
        marks.clear()
        marks["start"], marks["load"] = time.perf_counter(), 0.0
        return originals[0](self, name, settings, work)

    def load_pair(*args, **kwargs):
        start = time.perf_counter()
        try:
            return originals[1](*args, **kwargs)
        finally:
            marks["load"] += time.perf_counter() - start

    def register(*args, **kwargs):
        out.append(time.perf_counter() - marks["start"] - marks["load"])
        return originals[2](*args, **kwargs)

    workdir.Workdir.write_pair, pipeline.load_pair, registration.register = (
        write_pair, load_pair, register)
    try:
        config = breast.get_config("mind")
        config.pairs, config.qc, config.batch.devices = csv_path, False, "1"
        config.solver.iterations = 10
        study.run_study(config, os.path.join(folder, "run"), progress=False)
    finally:
        workdir.Workdir.write_pair, pipeline.load_pair, registration.register = originals
    return out[1:]  # the first pair compiles


def main(argv):
    del argv
    print("command:", " ".join(["python -m benchmarks.bench_study"] + sys.argv[1:]))
    print(common.machine_line())
    with tempfile.TemporaryDirectory() as folder:
        t_big, t_one, per_pair = failing(folder, _FAILING.value, _REPEATS.value)
        print(f"failing pairs: {_FAILING.value} pairs {t_big:.2f} s, 1 pair {t_one:.2f} s "
              f"(whole process, median of {_REPEATS.value}): {per_pair:.2f} ms per pair")
        shape = tuple(int(s) for s in _SHAPE.value)
        before = running(folder, _RUNNING.value, shape)
        print(f"running pairs ({_RUNNING.value} x {'x'.join(map(str, shape))}): study "
              f"bookkeeping before registration, loading excluded: median "
              f"{1000 * statistics.median(before):.2f} ms, largest {1000 * max(before):.2f} ms")


if __name__ == "__main__":
    app.run(main)
