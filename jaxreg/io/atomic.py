"""Files written all or nothing: the one helper every writer in jaxreg uses.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "out.txt")
>>> with atomic_path(path) as tmp:
...     with open(tmp, "w") as f:
...         _ = f.write("done")
>>> open(path).read()
'done'
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

__all__ = ["atomic_path", "write_text"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[str]:
    """A temporary file beside ``path`` to write; renamed over ``path`` on success.

    The temporary name starts with a dot, lies in ``path``'s folder (so the rename is
    atomic) and ends with ``suffix`` (for writers that choose the format by extension).
    On any exception it is removed and an existing ``path`` is left untouched. The final
    file gets the permissions of a newly created file (``0o666`` less the umask), not
    the ``0o600`` of a temporary file.

    Args:
      path: the file to write.
      suffix: the temporary file's extension, e.g. ``".nii.gz"``.

    Yields:
      The temporary file's path (the file exists and is empty).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                               suffix=suffix or ".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` all or nothing."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
