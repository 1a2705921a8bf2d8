"""jaxreg registers without torch: torch is only a converter and a test reference."""

import subprocess
import sys

SCRIPT = """
import sys
sys.modules["torch"] = None  # any 'import torch' now raises ImportError
import numpy as np
import jaxreg
img = np.zeros((24, 24, 24), np.float32)
img[6:18, 8:16, 5:20] = 1.0
u = jaxreg.register_mind(img, np.roll(img, 1, 0), config=jaxreg.ConvexAdamConfig(iterations=3))
assert u.shape == (24, 24, 24, 3)
print("ok")
"""


def test_register_without_torch():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, encoding="utf-8", errors="replace",
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
