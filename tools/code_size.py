"""Lines per file and the longest function of a source tree (the redesign's size rules).

    python -m experiments.code_size                 # jaxreg/ of this checkout
    python -m experiments.code_size --root=/tmp/old/jaxreg --over

A function's length runs from its ``def`` line to its last line (``ast``'s
``end_lineno - lineno + 1``); nested functions count on their own too. ``--over`` lists
only files over --max_lines or with a function over --max_function.
"""

import ast
import pathlib

from absl import app
from absl import flags

_ROOT = flags.DEFINE_string("root", "jaxreg", "Folder to measure (every *.py below it).")
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
    broken = 0
    for path in sorted(root.rglob("*.py")):
        lines, longest, name = measure(path)
        over = lines > _MAX_LINES.value or longest > _MAX_FUNCTION.value
        broken += over
        if over or not _OVER.value:
            print(f"{str(path.relative_to(root)):36s} {lines:5d} lines  longest {longest:3d} "
                  f"{name}{'  <-- over' if over else ''}")
    print(f"{broken} file(s) over {_MAX_LINES.value} lines or with a function over "
          f"{_MAX_FUNCTION.value}")


if __name__ == "__main__":
    app.run(main)
