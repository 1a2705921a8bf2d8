"""The one atomic-write helper: all or nothing, and ordinary file permissions."""

import os
import stat

import pytest

from jaxreg.io import atomic


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed while writing")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_written_file_gets_the_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o027)
    try:
        atomic.write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o640


def test_temporary_keeps_the_suffix_for_format_sniffing_writers(tmp_path):
    with atomic.atomic_path(tmp_path / "v.nii.gz", suffix=".nii.gz") as tmp:
        assert tmp.endswith(".nii.gz") and os.path.dirname(tmp) == str(tmp_path)
        open(tmp, "wb").close()
