"""Config of the breast registration experiment.

Run (built-in phantom, four task types, a few minutes on a 2-core CPU):

    python -m experiments.breast --encoder=mind --workdir=/tmp/jaxreg-breast

Override any field: ``--config.solver.iterations=200``. Select another file:
``--config=experiments/configs/breast.py:mind``. The expected result (BUILD.md): Dice of
breast and FGT masks rising on every phantom task, no folding.
"""

import ml_collections

# Fine-stage settings per encoder. "mind" uses the convexadam package's defaults;
# foundation features use the reference paper's Adam settings (REFERENCE.md).
_SOLVER = {
    "mind": dict(lambda_weight=1.25, iterations=80, learning_rate=1.0,
                 smooth_kernel=3, smooth_num=3),
}


def get_config(encoder: str = "mind") -> ml_collections.ConfigDict:
    """The experiment's settings as plain values."""
    if encoder not in _SOLVER:
        raise ValueError(f"unknown encoder {encoder!r}; choose from {sorted(_SOLVER)}")
    c = ml_collections.ConfigDict()
    c.encoder = encoder
    c.data_dir = ""  # folder of the pairs CSV (pairs.csv) and volumes; "" = phantom
    c.pairs = ""  # explicit pairs CSV; relative paths are resolved against data_dir

    c.phantom = ml_collections.ConfigDict()
    c.phantom.tasks = ("date", "sequence", "modality", "lesion")
    c.phantom.shape = (112, 80, 48)
    c.phantom.seed = 0

    c.mind = ml_collections.ConfigDict()
    c.mind.radius = 1
    c.mind.dilation = 2

    c.solver = ml_collections.ConfigDict()
    c.solver.grid_sp = 6
    c.solver.disp_hw = 4
    c.solver.ic = True
    c.solver.ic_iterations = 15
    c.solver.grid_sp_adam = 2
    c.solver.similarity_weight = 12.0
    c.solver.final_smooth = 0
    c.solver.update(_SOLVER[encoder])

    c.metrics = ml_collections.ConfigDict()
    c.metrics.hd95 = True
    return c
