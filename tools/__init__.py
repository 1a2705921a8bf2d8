"""Developer tools (not tests, not benchmarks).

* ``code_size``: lines per file and the longest function of jaxreg/ and its subpackages
  (the redesign's size rules), ``python -m tools.code_size``.
"""
