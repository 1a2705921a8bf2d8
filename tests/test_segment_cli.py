"""experiments.segment and ``jaxreg segment`` end to end on a synthetic volume in a tmp folder
(a tiny random-weight model stands in for LiteMedSAM): segmentation mode writes a uint8
NIfTI with the image's affine, evaluation mode prints and saves Dice / IoU; bad inputs fail
naming the file; both commands are the library's jaxreg.segment.run, which the jaxreg
package reaches without importing experiments."""

import ast
import json
import pathlib

import numpy as np
import pytest
from absl import flags

from experiments import segment as cli
from jaxreg import cli as jaxreg_cli
from jaxreg import io
from jaxreg.segment import predict

nib = pytest.importorskip("nibabel")


@pytest.fixture()
def files(tmp_path):
    vol = np.random.default_rng(0).normal(0.1, 0.05, (20, 24, 8)).astype(np.float32)
    labels = np.zeros(vol.shape, np.int16)
    labels[4:12, 5:15, 2:6] = 3
    labels[13:18, 16:22, 1:7] = 7
    vol[labels > 0] += 1.0
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-10, 5, 3]
    io.save_volume(tmp_path / "img.nii.gz", vol, affine)
    io.save_volume(tmp_path / "lab.nii.gz", labels, affine)
    return tmp_path, affine


@pytest.fixture(autouse=True)
def _process_settings(monkeypatch):
    """The commands' malloc setting is for their own process, not pytest's; the calls of
    prepare_process are recorded (its compilation cache folder)."""
    from jaxreg.segment import run

    calls, real = [], run.prepare_process
    monkeypatch.setattr(run, "keep_freed_memory", lambda: True)
    monkeypatch.setattr(run, "prepare_process",
                        lambda folder: calls.append(folder) or real(folder))
    return calls


def _run(*argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["segment", "--compilation_cache=", *argv])  # no XLA cache in the home
    return cli.run()


def test_segment_and_evaluate(files, tiny_segmenter, monkeypatch, capsys):
    tmp, affine = files
    models = []
    monkeypatch.setattr(predict, "load_segmenter",
                        lambda name, **_: models.append(name) or tiny_segmenter)
    out = tmp / "mask.nii.gz"
    _run(f"--image={tmp / 'img.nii.gz'}", "--box=4,5,2,12,15,6", f"--out={out}",
         "--model=mobilesam")
    assert models == ["mobilesam"]
    img = nib.load(out)
    mask = np.asarray(img.dataobj)
    assert img.get_data_dtype() == np.uint8 and mask.shape == (20, 24, 8)
    np.testing.assert_allclose(img.affine, affine)
    assert set(np.unique(mask)) <= {0, 1} and not mask[..., :2].any() and not mask[..., 6:].any()
    _run(f"--image={tmp / 'img.nii.gz'}", f"--labels={tmp / 'lab.nii.gz'}",
         f"--json={tmp / 's.json'}", f"--out={tmp / 'pred.nii.gz'}")
    printed = capsys.readouterr().out
    assert "label    3" in printed and "label    7" in printed and "mean over 2" in printed
    report = json.loads((tmp / "s.json").read_text())
    assert set(report["structures"]) == {"3", "7"}
    assert report["structures"]["3"]["box"] == [4, 5, 2, 12, 15, 6]
    for s in report["structures"].values():
        assert 0.0 <= s["dice"] <= 1.0 and 0.0 <= s["iou"] <= s["dice"] + 1e-9
    pred = np.asarray(nib.load(tmp / "pred.nii.gz").dataobj)
    assert set(np.unique(pred)) <= {0, 3, 7}


def test_scores_and_boxes():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[:2], b[1:3] = True, True
    s = cli.scores(a, b)
    assert s["dice"] == pytest.approx(0.5) and s["iou"] == pytest.approx(1 / 3)
    labels = np.zeros((5, 6, 7), np.int16)
    labels[1:3, 2:5, 4] = 2
    assert cli.label_box(labels, 2) == (1, 2, 4, 3, 5, 5)


@pytest.mark.parametrize("args, match", [
    (["--box=1,2,3", "--out=x.nii.gz"], "expected 6 integers"),
    (["--box=0,0,0,21,5,5", "--out=x.nii.gz"], "outside the image .*img.nii.gz"),
    (["--box=0,0,5,3,3,5", "--out=x.nii.gz"], "empty or outside"),
    (["--box=0,0,0,3,3,3"], "give --box and --out"),
    (["--labels=MISSING", "--structures=3"], "MISSING"),
    (["--labels=LAB", "--structures=3,4"], r"lab.nii.gz: labels \[4\] are not in"),
])
def test_bad_inputs(files, tiny_segmenter, monkeypatch, args, match):
    tmp, _ = files
    monkeypatch.setattr(predict, "load_segmenter", lambda name, **_: tiny_segmenter)
    args = [a.replace("MISSING", str(tmp / "nope.nii.gz")).replace("LAB", str(tmp / "lab.nii.gz"))
            for a in args]
    with pytest.raises(ValueError, match=match):
        _run(f"--image={tmp / 'img.nii.gz'}", *args)


def test_missing_image(tmp_path):
    with pytest.raises(io.InputError, match="nope.nii.gz"):
        _run(f"--image={tmp_path / 'nope.nii.gz'}", "--box=0,0,0,1,1,1", "--out=x.nii.gz")


def test_jaxreg_segment_command(files, tiny_segmenter, monkeypatch, capsys):
    """``jaxreg segment`` takes experiments.segment's flags and writes the same mask;
    a user error is one line and exit code 2."""
    tmp, affine = files
    monkeypatch.setattr(predict, "load_segmenter", lambda name, **_: tiny_segmenter)
    common = [f"--image={tmp / 'img.nii.gz'}", "--box=4,5,2,12,15,6", "--compilation_cache="]
    _run(*common, f"--out={tmp / 'a.nii.gz'}")
    assert jaxreg_cli.main(["segment", *common, f"--out={tmp / 'b.nii.gz'}",
                            "--nomultimask"]) == 0
    a, b = (nib.load(tmp / f"{n}.nii.gz") for n in "ab")
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_allclose(b.affine, affine)
    assert jaxreg_cli.main(["segment", f"--image={tmp / 'img.nii.gz'}", f"--labels="
                            f"{tmp / 'lab.nii.gz'}", "--structures=3,7", "--compilation_cache=",
                            f"--json={tmp / 's.json'}"]) == 0
    assert set(json.loads((tmp / "s.json").read_text())["structures"]) == {"3", "7"}
    capsys.readouterr()
    assert jaxreg_cli.main(["segment", f"--image={tmp / 'img.nii.gz'}", "--box=0,0,0,99,1,1",
                            f"--out={tmp / 'c.nii.gz'}", "--compilation_cache="]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --box=0,0,0,99,1,1") and "img.nii.gz" in err
    assert not (tmp / "c.nii.gz").exists()


def test_library_does_not_import_experiments():
    """The layering: no module of the jaxreg package imports the commands package."""
    root = pathlib.Path(jaxreg_cli.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(root)}: {n}" for n in names
                          if n.split(".")[0] == "experiments"]
    assert offenders == []


def test_compilation_cache_setting():
    """The commands share one cache folder (jaxreg.compilation.use_caches, tested there)."""
    from jaxreg import compilation
    from jaxreg.segment import run

    assert run.DEFAULT_COMPILATION_CACHE == cli._COMPILATION_CACHE.default
    assert run.DEFAULT_COMPILATION_CACHE == compilation.DEFAULT_CACHE


KEPT = """
import os, sys, threading
import numpy as np
from jaxreg.segment import run
applied = run.keep_freed_memory() if sys.argv[1] == "on" else False
rss = []

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def work():  # XLA's pattern: a large temporary allocated and freed by a worker thread
    before = resident()
    a = np.ones(64 << 20, np.uint8)
    del a
    rss.append(resident() - before)

t = threading.Thread(target=work)
t.start()
t.join()
print(applied, rss[0] >> 20)
"""


def test_keep_freed_memory():
    """With the setting, a worker thread's freed 64 MiB block stays in the process (the
    next one reuses its pages); without it the block is unmapped at once."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("a glibc setting")
    out = {}
    for mode in ("on", "off"):
        proc = subprocess.run([sys.executable, "-c", KEPT, mode], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        applied, kept_mib = proc.stdout.split()
        out[mode] = (applied == "True", int(kept_mib))
    assert out["on"][0] and out["on"][1] >= 60
    assert not out["off"][0] and out["off"][1] < 8


def test_commands_apply_the_process_settings(files, tiny_segmenter, monkeypatch,
                                             _process_settings):
    """Both commands prepare the process (malloc, CPU devices, XLA cache) before segmenting;
    once JAX runs, as in pytest, the CPU is not split again."""
    from jaxreg.segment import run

    tmp, _ = files
    monkeypatch.setattr(predict, "load_segmenter", lambda name, **_: tiny_segmenter)
    args = [f"--image={tmp / 'img.nii.gz'}", "--box=4,5,2,12,15,6", "--compilation_cache="]
    _run(*args, f"--out={tmp / 'a.nii.gz'}")
    assert jaxreg_cli.main(["segment", *args, f"--out={tmp / 'b.nii.gz'}"]) == 0
    assert _process_settings == ["", ""]
    assert run.use_cpu_devices() is False


def test_both_commands_have_the_same_flags():
    """Every flag of python -m experiments.segment is a flag of jaxreg segment, same default."""
    import jaxreg.segment

    defaults = vars(jaxreg_cli._parser().parse_args(["segment"]))
    from experiments import _flags

    ours = {f.name: f.default for module in (cli.__name__, _flags.__name__)
            for f in flags.FLAGS.get_flags_for_module(module)}
    assert set(ours) == set(defaults) - {"command"}
    assert {k: defaults[k] for k in ours} == ours
    assert jaxreg_cli._SEGMENT_MODELS == jaxreg.segment.MODELS == tuple(
        flags.FLAGS["model"].parser.enum_values)


def test_other_commands_do_not_load_flax():
    """jaxreg's parser (every command's) leaves flax unloaded: MIND-SSC runs never load it."""
    import subprocess
    import sys

    code = ("import sys, jaxreg.cli; jaxreg.cli._parser(); "
            "print('flax' in sys.modules, 'jaxreg.segment' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]


def test_both_commands_import_into_one_process():
    """absl allows a flag name once per process: the shared ones live in experiments/_flags."""
    import subprocess
    import sys

    for order in ("breast, segment", "segment, breast"):
        done = subprocess.run([sys.executable, "-c", f"from experiments import {order}"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
