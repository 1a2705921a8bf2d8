"""Frozen pretrained 2D encoders ported to Flax NNX, one module per family."""
