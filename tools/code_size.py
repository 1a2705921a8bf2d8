"""Lines per file and the longest function of a source tree (the redesign's size rules).

    python -m tools.code_size                 # jaxreg/ of this checkout
    python -m tools.code_size --root=/tmp/old/jaxreg --over

Every ``*.py`` below ``--root`` is measured, subpackages included (jaxreg's solver/,
features/, losses/, io/, kernels/, encoders/, segment/, experiment/); a summary per
subpackage (files, lines, files over a limit) follows the per-file lines, ``.`` for the
modules directly in the root. A function's length runs from its ``def`` line to its
last line (``ast``'s ``end_lineno - lineno + 1``); nested functions count on their own
too. ``--over`` lists only files over --max_lines or with a function over
--max_function.
"""

import ast
import collections
import pathlib

from absl import app
from absl import flags

_DEFAULT_ROOT = pathlib.Path(__file__).resolve().parent.parent / "jaxreg"

_ROOT = flags.DEFINE_string("root", str(_DEFAULT_ROOT),
                            "Folder to measure (every *.py below it, subfolders included).")
_OVER = flags.DEFINE_bool("over", False, "Only the files that break a limit.")
_MAX_LINES = flags.DEFINE_integer("max_lines", 400, "Most lines a file may have.")
_MAX_FUNCTION = flags.DEFINE_integer("max_function", 60, "Most lines a function may have.")


def measure(path: pathlib.Path) -> tuple[int, int, str]:
    """(lines, longest function's lines, its name) of one Python file."""
    source = path.read_text()
    functions = [(node.end_lineno - node.lineno + 1, node.name)
                 for node in ast.walk(ast.parse(source))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    longest, name = max(functions, default=(0, ""))
    return source.count("\n"), longest, name


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    root = pathlib.Path(_ROOT.value)
    if not root.is_dir():
        raise app.UsageError(f"--root={root}: not a folder")
    broken = 0
    packages = collections.defaultdict(lambda: [0, 0, 0])  # files, lines, over
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        lines, longest, name = measure(path)
        over = lines > _MAX_LINES.value or longest > _MAX_FUNCTION.value
        broken += over
        package = packages[relative.parts[0] if len(relative.parts) > 1 else "."]
        package[0] += 1
        package[1] += lines
        package[2] += over
        if over or not _OVER.value:
            print(f"{str(relative):36s} {lines:5d} lines  longest {longest:3d} "
                  f"{name}{'  <-- over' if over else ''}")
    print()
    for package, (files, lines, over) in sorted(packages.items()):
        print(f"{package + ('' if package == '.' else '/'):16s} {files:3d} files {lines:6d} lines"
              f"  {over} over")
    print(f"{broken} file(s) over {_MAX_LINES.value} lines or with a function over "
          f"{_MAX_FUNCTION.value}")


if __name__ == "__main__":
    app.run(main)
