"""A feature adapter: a small MLP over a frozen encoder's tokens, trained on synthetic
contrasts so that corresponding places agree across contrasts and differ from other places.

Where it sits: :func:`jaxreg.features.pair_features` encodes the slices, then (with
``FeatureConfig.adapter`` set) maps each token of the adapter's output maps through
:func:`apply_adapter` before the PCA. The encoder stays frozen; the cached tokens are the
encoder's own, so an adapter costs nothing at encoding time.

The adapter, per output map: standardise the ``C`` token channels (their mean and spread
over the training tokens), a hidden layer of ``hidden`` GELU units, ``dims`` outputs,
L2-normalised (``hidden=0``: one linear projection).

Training (:func:`train`):

* Data: random contrasts of the MNI 2009a template's axial slices, with a skull and scalp
  added and known random in-plane deformations (:mod:`jaxreg.finetune.synthetic`).
* Loss: InfoNCE. Per step, anchors are foreground tokens of deformed images; each one's
  positive is image 0's adapted map sampled (bilinearly) where the anchor's place lies;
  the other anchors' positives of the same pair are its negatives, except those within
  ``exclusion`` tokens of its own (near-duplicates). Optimised with optax's Adam.

What a test on real images then measures: generalisation to real contrasts the adapter
never saw (the training images are synthetic remaps of tissue maps), on anatomy close to
the training template (the ICBM 2009c templates share the 2009a anatomy almost exactly).
It never sees the test images.

Training is seeded and resumable: the encoded tokens are kept in a
:class:`jaxreg.features.FeatureCache` folder, and a checkpoint (parameters, optimiser
state, the random state) is written every 250 steps beside the output and
resumed from when the settings match; the adapter file (:mod:`jaxreg.finetune.io`,
kind ``"feature_adapter"``) is written at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
import zlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxreg.finetune import io as adapter_io
from jaxreg.finetune import synthetic

__all__ = ["AdapterConfig", "FeatureAdapter", "init_adapter", "apply_adapter",
           "load_adapter", "train"]

KIND = "feature_adapter"


# ----------------------------------------------------------------------------- the adapter

def init_adapter(key: jax.Array, channels: int, *, hidden: int, dims: int,
                 mean: np.ndarray | None = None, std: np.ndarray | None = None) -> dict:
    """Parameters of one map's adapter: ``mean``/``std`` (fixed), ``w1``/``b1`` (absent
    when ``hidden=0``), ``w2``/``b2``; He-scaled normal weights, zero biases."""
    k1, k2 = jax.random.split(key)
    params = {"mean": jnp.zeros(channels) if mean is None else jnp.asarray(mean, jnp.float32),
              "std": jnp.ones(channels) if std is None else jnp.asarray(std, jnp.float32)}
    width = channels
    if hidden:
        params["w1"] = jax.random.normal(k1, (channels, hidden)) * np.sqrt(2.0 / channels)
        params["b1"] = jnp.zeros(hidden)
        width = hidden
    params["w2"] = jax.random.normal(k2, (width, dims)) * np.sqrt(1.0 / width)
    params["b2"] = jnp.zeros(dims)
    return params


def apply_adapter(params: Mapping[str, jax.Array], tokens: jax.Array) -> jax.Array:
    """``(..., C)`` tokens -> ``(..., dims)`` adapted, unit-length features."""
    x = (jnp.asarray(tokens, jnp.float32) - params["mean"]) / params["std"]
    if "w1" in params:
        x = jax.nn.gelu(x @ params["w1"] + params["b1"])
    y = x @ params["w2"] + params["b2"]
    return y / (jnp.linalg.norm(y, axis=-1, keepdims=True) + 1e-6)


_apply = jax.jit(apply_adapter)


@dataclasses.dataclass(frozen=True)
class FeatureAdapter:
    """A loaded adapter: per output map its parameters, and what it was trained for.

    Attributes:
      path: the file.
      params: ``{map name: parameters}``.
      info: the training record (``encoder``, ``render``, the settings, the loss).
    """

    path: str
    params: Mapping[str, Mapping[str, jax.Array]]
    info: Mapping

    @property
    def encoder(self) -> str:
        return str(self.info.get("encoder", ""))

    @property
    def render(self) -> str:
        """What the encoder saw in training (``render="auto"`` uses this)."""
        return str(self.info.get("render", "intensity"))

    def __call__(self, layer: str, tokens: np.ndarray) -> np.ndarray:
        """Map ``layer``'s ``(..., C)`` tokens adapted; other maps unchanged."""
        if layer not in self.params:
            return tokens
        p = self.params[layer]
        if tokens.shape[-1] != p["mean"].shape[0]:
            raise ValueError(f"{self.path}: the adapter of map {layer!r} takes "
                             f"{p['mean'].shape[0]} channels, the tokens have "
                             f"{tokens.shape[-1]}")
        return np.asarray(_apply(p, tokens))


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float) -> FeatureAdapter:
    del mtime  # part of the cache key only: an edited file is read again
    tree, info = adapter_io.load(path, kind=KIND)
    params = {layer: {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
              for layer, p in tree.items()}
    return FeatureAdapter(path=path, params=params, info=info)


def load_adapter(path: str | os.PathLike, *, encoder: str | None = None) -> FeatureAdapter:
    """Reads an adapter file (kept in memory per path and modification time).

    Args:
      path: the ``.safetensors`` file :func:`train` wrote.
      encoder: when given, the encoder it must have been trained for (the registry name,
        e.g. ``"litemedsam"``).

    Raises:
      FileNotFoundError, ValueError: no such file, not an adapter, or another encoder's;
        each message starts with the path.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such adapter file (FeatureConfig.adapter)")
    adapter = _load_cached(os.path.abspath(path), os.path.getmtime(path))
    if encoder is not None and adapter.encoder != encoder:
        raise ValueError(f"{path}: an adapter for encoder {adapter.encoder!r}, not "
                         f"{encoder!r}")
    return adapter


# ----------------------------------------------------------------------------- training

@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """How an adapter is trained (every field is recorded in the adapter file).

    Attributes:
      encoder: the registry encoder (its weights found as the registration's are).
      layers: output maps to adapt (empty: every map of the encoder's pyramid,
        ``jaxreg.encoders.registry``; the registration uses those its settings name).
      hidden: hidden GELU units (0: a linear projection).
      dims: output channels.
      temperature: InfoNCE temperature.
      exclusion: negatives within this many tokens of the positive are left out.
      steps: optimiser steps per map.
      learning_rate: Adam's.
      pairs: image pairs per step.
      anchors: anchor tokens per pair.
      slices, variants, max_disp: the synthetic data (:func:`jaxreg.finetune.synthetic.synthetic_slices`).
      render: what the encoder sees, in training and then in registration:
        ``"intensity"`` or ``"gradient"`` (:func:`jaxreg.features.render`).
      seed: of the data, the initial weights and the sampling.
    """

    encoder: str = "litemedsam"
    layers: tuple[str, ...] = ()
    hidden: int = 64
    dims: int = 16
    temperature: float = 0.1
    exclusion: float = 1.0
    steps: int = 1500
    learning_rate: float = 2e-3
    pairs: int = 4
    anchors: int = 256
    slices: int = 48
    variants: int = 3
    max_disp: float = 4.0
    render: str = "intensity"
    seed: int = 0

    def __post_init__(self):
        for name in ("dims", "steps", "pairs", "anchors", "slices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if self.hidden < 0 or self.temperature <= 0 or self.variants < 2:
            raise ValueError(f"hidden={self.hidden}, temperature={self.temperature}, "
                             f"variants={self.variants}: need hidden >= 0, temperature > 0, "
                             "variants >= 2")
        if self.render not in ("intensity", "gradient"):
            raise ValueError(f"render={self.render!r}: must be intensity or gradient")


def _sample_bilinear(maps: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """``maps`` ``(h, w, C)`` at fractional ``(rows, cols)`` (edge values outside)."""
    h, w = maps.shape[:2]
    r = jnp.clip(rows, 0.0, h - 1.0)
    c = jnp.clip(cols, 0.0, w - 1.0)
    r0, c0 = jnp.floor(r).astype(jnp.int32), jnp.floor(c).astype(jnp.int32)
    r1, c1 = jnp.minimum(r0 + 1, h - 1), jnp.minimum(c0 + 1, w - 1)
    fr, fc = (r - r0)[:, None], (c - c0)[:, None]
    return ((1 - fr) * (1 - fc) * maps[r0, c0] + (1 - fr) * fc * maps[r0, c1]
            + fr * (1 - fc) * maps[r1, c0] + fr * fc * maps[r1, c1])


def _pair_loss(params, reference, moved, anchor_idx, target_rc, *, temperature, exclusion):
    """InfoNCE of one pair: ``moved`` tokens at ``anchor_idx`` against ``reference``'s
    adapted map at ``target_rc`` (token coordinates)."""
    c = reference.shape[-1]
    ref = apply_adapter(params, reference)
    positives = _sample_bilinear(ref, target_rc[:, 0], target_rc[:, 1])
    positives = positives / (jnp.linalg.norm(positives, axis=-1, keepdims=True) + 1e-6)
    anchors = apply_adapter(params, moved.reshape(-1, c)[anchor_idx])
    logits = anchors @ positives.T / temperature
    dist = jnp.linalg.norm(target_rc[:, None] - target_rc[None], axis=-1)
    near = (dist < exclusion) & ~jnp.eye(dist.shape[0], dtype=bool)
    logits = jnp.where(near, -1e9, logits)
    labels = jnp.arange(logits.shape[0])
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def _make_step(optimiser, temperature: float, exclusion: float):
    def loss_fn(trainable, fixed, refs, moveds, idx, rc):
        params = {**fixed, **trainable}
        losses = jax.vmap(lambda r, m, i, t: _pair_loss(
            params, r, m, i, t, temperature=temperature, exclusion=exclusion))(refs, moveds,
                                                                              idx, rc)
        return losses.mean()

    @jax.jit
    def step(trainable, opt_state, fixed, refs, moveds, idx, rc):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, fixed, refs, moveds, idx, rc)
        updates, opt_state = optimiser.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def _settings_hash(config: AdapterConfig) -> str:
    text = json.dumps([dataclasses.asdict(config), adapter_io.FORMAT_VERSION], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _train_map(layer: str, tokens: np.ndarray, rc: np.ndarray, on: np.ndarray,
               config: AdapterConfig, key: jax.Array, checkpoint: str, progress) -> tuple:
    """One map's adapter: ``(params, losses)``; resumes from ``checkpoint`` when present."""
    n, v, th, tw, c = tokens.shape
    head = tokens[:, 0][on[:, 0]]
    mean, std = head.mean(0), head.std(0) + 1e-6
    params = init_adapter(key, c, hidden=config.hidden, dims=config.dims, mean=mean, std=std)
    fixed = {k: params[k] for k in ("mean", "std")}
    trainable = {k: val for k, val in params.items() if k not in fixed}
    optimiser = optax.adam(config.learning_rate)
    opt_state = optimiser.init(trainable)
    rng = np.random.default_rng([config.seed, 7, zlib.crc32(layer.encode())])
    start, losses = 0, []
    if os.path.isfile(checkpoint):
        tree, info = adapter_io.load(checkpoint, kind="checkpoint",
                                     like={"trainable": trainable, "opt": opt_state})
        if info.get("layer") == layer:
            trainable, opt_state = tree["trainable"], tree["opt"]
            start, losses = int(info["step"]), list(info["losses"])
            rng.bit_generator.state = info["rng"]
            logging.info("adapter %s: resumed at step %d from %s", layer, start, checkpoint)
    step_fn = _make_step(optimiser, config.temperature, config.exclusion)
    candidates = [np.flatnonzero(on[i, j].ravel()) for i in range(n) for j in range(v)]
    flat_rc = rc.reshape(n * v, th * tw, 2)
    for step in range(start, config.steps):
        pick = rng.integers(0, n, config.pairs), rng.integers(1, v, config.pairs)
        idx = np.stack([rng.choice(candidates[i * v + j], config.anchors,
                                   replace=candidates[i * v + j].size < config.anchors)
                        for i, j in zip(*pick)])
        targets = np.stack([flat_rc[i * v + j][k] for (i, j), k in zip(zip(*pick), idx)])
        trainable, opt_state, loss = step_fn(trainable, opt_state, fixed,
                                             tokens[pick[0], 0], tokens[pick[0], pick[1]],
                                             idx, targets)
        losses.append(float(loss))
        progress(layer, step + 1, losses[-1])
        if (step + 1) % 250 == 0 and step + 1 < config.steps:
            adapter_io.save(checkpoint, {"trainable": trainable, "opt": opt_state},
                            kind="checkpoint",
                            info={"layer": layer, "step": step + 1, "losses": losses,
                                  "rng": rng.bit_generator.state})
    return {**fixed, **trainable}, losses


def train(config: AdapterConfig, out: str, *, workdir: str = "", weights: str = "",
          progress: bool = True) -> dict:
    """Trains an adapter and writes it to ``out`` (see the module docstring).

    Args:
      config: the settings.
      out: the adapter file to write (``.safetensors``).
      workdir: folder for the encoded synthetic slices (default: beside ``out``); a rerun
        with the same settings reads them instead of encoding again.
      weights: the encoder's checkpoint (``""``: searched as the registration does).
      progress: a progress bar on standard error.

    Returns:
      The training record written into the file's info (also ``seconds``).
    """
    from jaxreg import features
    from jaxreg.encoders import registry

    started = time.perf_counter()
    layers = config.layers or tuple(registry.ENCODERS[config.encoder].pyramid)
    model, spec = registry.load_encoder(config.encoder, weights or None)
    encoder = features.SliceEncoder(model, spec, layers=layers, name=config.encoder)
    data = synthetic.synthetic_slices(slices=config.slices, variants=config.variants,
                                      max_disp=config.max_disp, seed=config.seed,
                                      render=config.render)
    n, v, h, w = data.images.shape
    bar = _bar(progress, total=config.steps * len(layers))
    folder = workdir or os.path.join(os.path.dirname(os.path.abspath(out)), ".adapter_tokens")
    bar.set_description(f"encoding {n * v} slices")  # or reading them from a rerun's cache
    tokens = features.FeatureCache(folder).encode(data.images.reshape(n * v, h, w), encoder)
    encoded_at = time.perf_counter()
    digest = _settings_hash(config)
    checkpoint = f"{out}.{digest}.{{layer}}.checkpoint.safetensors"
    key = jax.random.key(config.seed)
    params, record = {}, {}

    def report(layer, step, loss):
        bar.set_description(f"{layer} loss {loss:.3f}")
        bar.update(1)

    for i, layer in enumerate(layers):
        t = tokens[layer].reshape(n, v, *tokens[layer].shape[1:])
        rc, on = synthetic.token_places(data, encoder.token_scale((h, w), layer), t.shape[2:4])
        params[layer], losses = _train_map(layer, t, rc, on, config,
                                           jax.random.fold_in(key, i),
                                           checkpoint.format(layer=layer), report)
        record[layer] = {"first_loss": float(np.mean(losses[:50])),
                         "last_loss": float(np.mean(losses[-50:])), "tokens": list(t.shape)}
    bar.close()
    info = {"encoder": config.encoder, "spec": spec.name, "render": config.render,
            "layers": list(layers), "config": dataclasses.asdict(config),
            "data": "synthetic contrasts of nilearn's MNI ICBM152 2009a tissue maps",
            "maps": record, "slices": [n, v, h, w],
            "encoding_seconds": round(encoded_at - started, 1),
            "seconds": round(time.perf_counter() - started, 1)}
    adapter_io.save(out, params, kind=KIND, info=info)
    for layer in layers:
        if os.path.isfile(checkpoint.format(layer=layer)):
            os.unlink(checkpoint.format(layer=layer))
    return info


def _bar(enabled: bool, total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="step", disable=not enabled, dynamic_ncols=True)
