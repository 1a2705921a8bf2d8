r"""Fingerprints of jaxreg's behaviour, to check that a refactoring changed nothing.

    python -m tools.fingerprint                 # prints JSON: a SHA-256 per item
    python -m tools.fingerprint --out=a.json    # and writes it

Compare the output of two checkouts (e.g. ``git worktree add /tmp/old REV``, then run
this file from the new checkout with ``PYTHONPATH=/tmp/old``) with ``diff``. Items:

- ``convex_adam_stablehlo``: the StableHLO text of ``jax.jit(convex_adam)`` on a
  48x40x32x12 pair at the default :class:`~jaxreg.solver.ConvexAdamConfig`, source
  locations stripped (file paths change when modules move);
- ``phantom_register``, ``phantom_register_mind``: the fields of ``jaxreg.register`` and
  ``register_mind`` on the phantom's "sequence" pair;
- ``mni_k2_register_mind``, ``mni_full_register_mind``: ``register_mind`` on the MNI
  benchmark pair (``benchmarks/bench_mni.py``) block-averaged by 2, and at full size;
- ``mni_pair``: the full-size pair's moving image and true field.

Fields are compared bitwise: the same program on the same machine gives the same bits.
The MNI items need nilearn (the test extra); about 35 s on two cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from absl import app, flags

_OUT = flags.DEFINE_string("out", "", "also write the JSON here")
_MNI = flags.DEFINE_bool("mni", True, "include the MNI benchmark pair (nilearn)")


def _sha(*arrays) -> str:
    import numpy as np

    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return digest.hexdigest()


def _stablehlo() -> str:
    import jax
    import jax.numpy as jnp

    from jaxreg import solver

    config = solver.ConvexAdamConfig()
    fixed = jnp.zeros((48, 40, 32, 12), jnp.float32)
    moving = jnp.ones((48, 40, 32, 12), jnp.float32)
    text = jax.jit(lambda a, b: solver.convex_adam(a, b, config=config)).lower(
        fixed, moving).as_text()
    text = re.sub(r"loc\([^)]*\)", "", text)
    return "\n".join(line for line in text.splitlines() if not line.startswith("#loc"))


def _mni_pair(k: int) -> dict:
    import jaxreg

    root = os.path.dirname(os.path.dirname(os.path.abspath(jaxreg.__file__)))
    if os.path.exists(os.path.join(root, "benchmarks", "common.py")):
        from benchmarks.common import make_mni_pair
    else:  # the checkout of jaxreg in use predates benchmarks/ (commit a4d9fd8 and older)
        from experiments.bench_mni import make_pair as make_mni_pair
    return make_mni_pair((192, 224, 184), k, 6.0, 24, 0)


def fingerprints(mni: bool = True) -> dict[str, str]:
    import jaxreg
    from jaxreg import phantom, solver

    out = {"convex_adam_stablehlo": hashlib.sha256(_stablehlo().encode()).hexdigest()}
    pair = phantom.breast_pair("sequence")
    transform = jaxreg.register(pair["fixed"], pair["moving"], method="mind")
    out["phantom_register"] = _sha(transform.field)
    out["phantom_register_mind"] = _sha(solver.register_mind(pair["fixed"], pair["moving"]))
    if mni:
        for k, name in ((2, "mni_k2_register_mind"), (1, "mni_full_register_mind")):
            p = _mni_pair(k)
            out[name] = _sha(solver.register_mind(p["fixed"], p["moving"]))
        out["mni_pair"] = _sha(p["moving"], p["true"])
    return out


def main(argv):
    del argv
    text = json.dumps(fingerprints(_MNI.value), indent=1)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
