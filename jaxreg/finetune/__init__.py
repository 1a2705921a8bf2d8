"""Fine-tuning with optax on top of the frozen encoders.

* :mod:`jaxreg.finetune.io`: the adapter file (safetensors plus what it was trained for),
  shared by every fine-tuned part and by training checkpoints.
* :mod:`jaxreg.finetune.features`: a small adapter over an encoder's tokens, trained on
  synthetic contrasts so that corresponding places agree across contrasts
  (``FeatureConfig.adapter``); its training images come from
  :mod:`jaxreg.finetune.synthetic`.
* :mod:`jaxreg.finetune.segment`: few-shot tuning of the LiteMedSAM mask decoder on a few
  labelled slices of a structure.

``python -m experiments.finetune`` trains either and writes the file.
"""
