"""Few-shot tuning of a SAM-family mask decoder on a few labelled slices of a structure.

The image encoder stays frozen: the ``k`` labelled slices are encoded once, with the
segmenter's own encoder and preprocessing (:meth:`jaxreg.segment.Segmenter.encode`), and
part of the mask decoder is trained with optax's Adam on them, so that
:func:`jaxreg.segment.segment_3d` (unchanged) segments the structure's other slices with
the tuned decoder.

Training pairs: the ``shots`` slices are spread evenly over the structure's extent
along the slicing axis (:func:`choose_slices`; one shot is the middle slice, the key
slice :func:`~jaxreg.segment.segment_3d` starts from). Each slice gets :data:`BOXES`
box prompts, drawn once (seeded): its ground-truth mask's box widened by the
propagation's margin (what ``segment_3d`` prompts a slice with when the previous mask
was right), that box with each side moved by up to ``jitter`` pixels of the 256 px input
either way (a previous mask a little too small or too large), and the structure's 3D box
across the slice (the key slice's prompt). The loss is binary cross-entropy plus soft
Dice of the single-mask output's low-resolution logits (256x256 for every SAM-family
model) against the slice's mask resized into that frame (the padded part of the input
left out), averaged over a minibatch; a fixed number of Adam steps, minibatches drawn
from the seed.

What is trained (``trainable``):

* ``"hypernetwork"`` (the default): the single-mask output's hypernetwork MLP (3 Linear
  layers, 0.14 M parameters), which turns the mask token into the 32 weights of the
  mask's logits over the upscaled image features. Everything before it is frozen, so
  the transformer's mask token and the upscaled features of each training prompt are
  computed once; each step only trains the MLP, on a window of the logit frame around
  each box (the largest training box plus 16 pixels per side, a multiple of 16 pixels;
  the logits outside the windows are not trained);
* ``"output"``: that MLP and the output upscaling (two 2x2 transposed convolutions,
  74 k parameters), each step running the upscaling forward and back on the
  precomputed transformer output;
* ``"decoder"``: the whole mask decoder (4.1 M parameters), each step running the
  two-way transformer and the upscaling forward and back.

Measured on the 2-core CPU (another process beside it), putamen R of the MNI T1
(``benchmarks/bench_fewshot.py``'s data), 3 shots, Dice on the other slices: zero-shot
0.732; ``output`` (100 steps, rate 1e-4, minibatch 8) 0.822 in 168 s of training
(1.46 s a step); ``hypernetwork`` (200 steps, rate 1e-3) 0.856 in 33 s over the whole
frame, 0.853 in 9.5 s on the windows; a ``decoder`` step took 3.4 s (not tried for
quality). Hence the default: ``hypernetwork``, 200 steps, rate 1e-3, minibatch 8.

The result is ``params``: the trained part's arrays as nested dicts;
:func:`save_decoder` writes them in the adapter file format (:mod:`jaxreg.finetune.io`,
kind ``"mask_decoder"``), :func:`load_decoder` puts them into a segmenter's heads,
:func:`finetune_files` does it all from NIfTI files; the JAX side (the decoder's split
forward, the loss, the Adam steps) is in :mod:`jaxreg.finetune._decoder_parts`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxreg.features import encoding
from jaxreg.finetune import _decoder_parts as parts
from jaxreg.finetune import io as adapter_io
from jaxreg.segment import predict

__all__ = ["TRAINABLE", "BOXES", "choose_slices", "training_boxes", "finetune_decoder",
           "tuned_segmenter", "save_decoder", "load_decoder", "finetune_files"]

TRAINABLE = ("output", "hypernetwork", "decoder")
"""The parts :func:`finetune_decoder` can train (see the module docstring)."""
BOXES = 8
"""Box prompts per training slice."""
_KIND = "mask_decoder"


# ----------------------------------------------------------------------------- the data

def choose_slices(mask: np.ndarray, shots: int, *, axis: int = -1) -> list[int]:
    """The ``shots`` training slices of a 3D ``mask``: spread evenly over its extent along
    ``axis``, slice ``i`` of ``k`` at ``lo + floor((2i + 1) n / (2k) - 1/2)`` (``n`` slices
    from ``lo``); one shot is the middle slice ``(lo + hi) // 2`` (``hi`` the last), as
    :func:`jaxreg.segment.segment_3d`'s key slice. A chosen slice without mask voxels is
    replaced by the nearest one with some; repeats are dropped.

    Raises:
      ValueError: an empty mask, or ``shots`` < 1.
    """
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    m = np.moveaxis(np.asarray(mask, bool), axis, -1)
    present = np.flatnonzero(m.any(axis=(0, 1)))
    if present.size == 0:
        raise ValueError("the mask is empty")
    lo, hi = int(present[0]), int(present[-1])
    n = hi - lo + 1
    out = []
    for i in range(shots):
        z = lo + int(np.floor((2 * i + 1) * n / (2 * shots) - 0.5))
        z = int(present[np.argmin(np.abs(present - z))])
        if z not in out:
            out.append(z)
    return out


def training_boxes(slice_mask: np.ndarray, box3d: Sequence[int], *, count: int = BOXES,
                   margin: float = 3.0, jitter: float = 4.0,
                   rng: np.random.Generator) -> np.ndarray:
    """``count`` box prompts ``(r0, c0, r1, c1)`` (float, ends exclusive) for one slice's
    mask (module docstring): the mask's box widened by ``margin``, the in-plane part
    ``box3d = (r0, c0, r1, c1)`` of the structure's 3D box, and ``count - 2`` boxes with
    each side of the first moved by up to ``jitter`` either way (uniform); ``margin`` and
    ``jitter`` in pixels of a 256 px input, as :func:`jaxreg.segment.segment_3d`'s
    ``margin``. Clipped to the slice, at least one pixel wide."""
    shape = np.shape(slice_mask)
    b = predict.mask_box(slice_mask)
    if b is None:
        raise ValueError("the slice's mask is empty")
    px = max(shape) / 256.0
    grown = np.array([b[0] - margin * px, b[1] - margin * px, b[2] + margin * px,
                      b[3] + margin * px])
    boxes = [grown, np.asarray(box3d, float)]
    for _ in range(count - 2):
        boxes.append(grown + rng.uniform(-jitter, jitter, 4) * px)
    boxes = np.stack(boxes)[:count]
    hi = np.array([shape[0], shape[1]] * 2, float)
    boxes = np.clip(boxes, 0.0, hi)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1.0)
    return np.minimum(boxes, hi).astype(np.float32)


# ----------------------------------------------------------------------------- the model

def _filter(trainable: str):
    """An nnx filter on the heads' paths: the parameters ``trainable`` names."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable={trainable!r}: must be one of {', '.join(TRAINABLE)}")

    def chosen(path, _):
        path = tuple(str(p) for p in path)
        if path[:1] != ("mask_decoder",):
            return False
        if trainable == "decoder":
            return True
        if path[1:4] == ("output_hypernetworks_mlps", "0", "layers"):
            return True
        return trainable == "output" and path[1:2] == ("output_upscaling",)
    return chosen


def _pure(heads, trainable: str) -> dict:
    """The ``trainable`` part of ``heads``' parameters as nested dicts of arrays."""
    return nnx.to_pure_dict(nnx.split(heads, _filter(trainable), ...)[1])



# ----------------------------------------------------------------------------- training

def finetune_decoder(segmenter: predict.Segmenter, volume: np.ndarray, mask: np.ndarray, *,
                     shots: int = 3, axis: int = -1, steps: int = 200,
                     learning_rate: float = 1e-3, batch: int = 8,
                     trainable: str = "hypernetwork", margin: float = 3.0, jitter: float = 4.0,
                     seed: int = 0, normalise: bool = False,
                     embeddings: dict | None = None, progress: bool = False
                     ) -> tuple[dict, dict]:
    """Tunes ``segmenter``'s mask decoder on ``shots`` labelled slices (module docstring).

    Args:
      segmenter: from :func:`jaxreg.segment.load_segmenter`; not changed.
      volume: the 3D image, normalised as :func:`jaxreg.segment.segment_3d` expects with
        ``normalise=False`` (:func:`jaxreg.segment.normalise_intensity`), unless
        ``normalise``.
      mask: the structure's 3D mask on the volume's grid (only the chosen slices are read).
      shots: labelled slices (:func:`choose_slices`).
      axis: the slicing axis.
      steps: Adam steps.
      learning_rate: Adam's.
      batch: samples (slice and box) per step (at most all of them).
      trainable: which parameters (:data:`TRAINABLE`).
      margin, jitter: of the training boxes (:func:`training_boxes`), 256 px input pixels.
      seed: the boxes and the minibatches.
      normalise: apply :func:`jaxreg.segment.normalise_intensity` to ``volume`` first.
      embeddings: slice index -> embedding, used and filled (a ``segment_3d`` cache of
        the same volume, axis and normalisation).
      progress: log the loss every tenth of the steps (absl, INFO).

    Returns:
      ``(params, info)``: the trained parameters (nested dicts of arrays, paths of the
      segmenter's heads) and what :func:`save_decoder` records: ``model``, ``shots``,
      ``slices``, ``axis``, ``steps``, ``learning_rate``, ``batch``, ``trainable``,
      ``margin``, ``jitter``, ``seed``, ``loss_first``, ``loss_final`` (mean of the last
      tenth of the steps), ``seconds_encode``, ``seconds_train``.

    Raises:
      ValueError: a volume and mask of different shapes, an empty mask, bad settings.
    """
    vol, m = _volume_and_mask(volume, mask, axis=axis, normalise=normalise, steps=steps,
                              learning_rate=learning_rate, batch=batch)
    slices = choose_slices(m, shots)
    t0 = time.perf_counter()
    emb = _encoded(segmenter, vol, slices, embeddings)
    t_encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    params, stats = _tune(segmenter, emb, m, slices, trainable=trainable, margin=margin,
                          jitter=jitter, seed=seed, steps=steps, learning_rate=learning_rate,
                          batch=batch, progress=progress)
    t_train = time.perf_counter() - t0
    info = {"model": segmenter.spec.name, "shots": int(shots), "slices": slices,
            "axis": int(axis), "steps": int(steps), "learning_rate": float(learning_rate),
            "batch": stats.pop("batch"), "trainable": trainable, "margin": float(margin),
            "jitter": float(jitter), "seed": int(seed), **stats,
            "seconds_encode": round(t_encode, 3), "seconds_train": round(t_train, 3)}
    return params, info


def _volume_and_mask(volume, mask, *, axis: int, normalise: bool, steps: int,
                     learning_rate: float, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`finetune_decoder`'s checks; its volume (normalised if ``normalise``) and
    mask with the slicing ``axis`` moved last."""
    vol = np.asarray(volume, np.float32)
    m = np.asarray(mask, bool)
    if vol.ndim != 3 or m.shape != vol.shape:
        raise ValueError(f"need a 3D volume and a mask of its shape, got {vol.shape} and "
                         f"{m.shape}")
    if steps < 1 or learning_rate <= 0 or batch < 1:
        raise ValueError(f"steps {steps}, learning_rate {learning_rate}, batch {batch}: "
                         "must be positive")
    if normalise:
        vol = predict.normalise_intensity(vol)
    return np.moveaxis(vol, axis, -1), np.moveaxis(m, axis, -1)


def _encoded(segmenter: predict.Segmenter, vol: np.ndarray, slices: list[int],
             embeddings: dict | None) -> jax.Array:
    """The embeddings ``(k, h, w, C)`` of ``slices`` of ``vol`` (slicing axis last), those
    not in ``embeddings`` encoded and added to it."""
    cache = {} if embeddings is None else embeddings
    todo = [z for z in slices if z not in cache]
    if todo:
        for z, e in zip(todo, segmenter.encode(np.stack([vol[..., z] for z in todo]))):
            cache[z] = e
    return jnp.stack([cache[z] for z in slices])


def _samples(segmenter: predict.Segmenter, m: np.ndarray, slices: list[int], *,
             margin: float, jitter: float, rng: np.random.Generator):
    """The training samples of mask ``m`` (slicing axis last): :data:`BOXES` boxes per
    slice, ``(sam_boxes (N, 4), target (N, low, low), weight, which)``, ``which`` the
    index in ``slices`` of each sample's slice."""
    shape = m.shape[:2]
    idx = np.nonzero(m)
    box3d = (idx[0].min(), idx[1].min(), idx[0].max() + 1, idx[1].max() + 1)
    resized, _ = encoding.token_geometry(shape, segmenter.spec.preprocessing,
                                         image_size=segmenter.image_size, patch_size=1)
    low = 4 * segmenter.heads.config.embedding_size
    boxes, targets, weights, which = [], [], [], []
    for i, z in enumerate(slices):
        b = training_boxes(m[..., z], box3d, margin=margin, jitter=jitter, rng=rng)
        t, w = parts.low_res_target(m[..., z], resized, segmenter.image_size, low)
        boxes.append(parts.to_sam_boxes(b, shape, resized))
        targets += [t] * len(b)
        weights += [w] * len(b)
        which += [i] * len(b)
    return np.concatenate(boxes), np.stack(targets), np.stack(weights), which


def _tune(segmenter: predict.Segmenter, emb: jax.Array, m: np.ndarray, slices: list[int], *,
          trainable: str, margin: float, jitter: float, seed: int, steps: int,
          learning_rate: float, batch: int, progress: bool) -> tuple[dict, dict]:
    """:func:`finetune_decoder`'s training on the slices' embeddings ``emb``: ``(params,
    stats)``, ``stats`` its ``batch``, ``samples``, ``window``, ``loss_first`` and
    ``loss_final``."""
    rng = np.random.default_rng(seed)
    sam_boxes, target, weight, which = _samples(segmenter, m, slices, margin=margin,
                                                jitter=jitter, rng=rng)
    graphdef, params, rest = nnx.split(segmenter.heads, _filter(trainable), ...)
    feats, target, weight, window = parts.prepare(
        params, rest, emb[np.asarray(which)], sam_boxes, target, weight, graphdef=graphdef,
        trainable=trainable, image_size=segmenter.image_size)
    n = sam_boxes.shape[0]
    batch = min(batch, n)
    params, losses = parts.fit(params, rest, feats, target, weight, graphdef=graphdef,
                               trainable=trainable, steps=steps, learning_rate=learning_rate,
                               batch=batch, rng=rng, progress=progress)
    return nnx.to_pure_dict(params), {
        "batch": int(batch), "samples": int(n), "window": int(window),
        "loss_first": float(losses[0]),
        "loss_final": float(losses[-max(1, steps // 10):].mean())}


# ----------------------------------------------------------------------------- files

def tuned_segmenter(segmenter: predict.Segmenter, params: dict) -> predict.Segmenter:
    """A segmenter whose heads take ``params`` (from :func:`finetune_decoder` or a file);
    the encoder is shared, ``segmenter`` is not changed.

    Raises:
      ValueError: ``params`` names parameters the heads lack, or of other shapes.
    """
    graphdef, state = nnx.split(segmenter.heads)
    flat_new = adapter_io.flatten(params)
    flat_old = adapter_io.flatten(nnx.to_pure_dict(state))
    unknown = sorted(set(flat_new) - set(flat_old))
    if unknown:
        raise ValueError(f"parameters not in the {segmenter.spec.name} heads: {unknown[:5]}")
    bad = [k for k, v in flat_new.items() if v.shape != flat_old[k].shape]
    if bad:
        raise ValueError(f"parameters of other shapes than the {segmenter.spec.name} heads': "
                         f"{bad[:5]}")
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return segmenter.with_heads(nnx.merge(graphdef, state))


def save_decoder(path: str | os.PathLike, params: dict, info: dict) -> None:
    """Writes tuned parameters and their ``info`` (from :func:`finetune_decoder`, plus
    e.g. ``label``) as an adapter file of kind ``"mask_decoder"``, atomically."""
    if "model" not in info or "trainable" not in info:
        raise ValueError("info must name the model and the trainable part "
                         "(finetune_decoder's info)")
    adapter_io.save(path, params, kind=_KIND, info=info)


def load_decoder(path: str | os.PathLike, segmenter: predict.Segmenter) -> predict.Segmenter:
    """``segmenter`` with the mask decoder tuned in file ``path`` (see
    :func:`tuned_segmenter`), usable by :func:`jaxreg.segment.segment_3d` unchanged.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a mask decoder file, one tuned for another model, or tensors that
        do not fit; each message starts with the path.
    """
    path = os.fspath(path)
    info = adapter_io.read_info(path, kind=_KIND)
    model = info.get("model")
    if model != segmenter.spec.name:
        raise ValueError(f"{path}: a mask decoder tuned for the {model!r} model, not for "
                         f"{segmenter.spec.name!r}")
    trainable = info.get("trainable")
    if trainable not in TRAINABLE:
        raise ValueError(f"{path}: unknown trainable part {trainable!r} in its info")
    params, _ = adapter_io.load(path, kind=_KIND, like=_pure(segmenter.heads, trainable))
    try:
        return tuned_segmenter(segmenter, params)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def finetune_files(image: str, labels: str, label: int, *, out: str, shots: int = 3,
                   model: str = "litemedsam", axis: int = -1, steps: int = 200,
                   learning_rate: float = 1e-3, seed: int = 0,
                   segmenter: predict.Segmenter | None = None, **kwargs) -> dict:
    """Tunes the decoder on label ``label`` of a label map and writes the file ``out``.

    Args:
      image: the volume (read by :func:`jaxreg.io.load_volume`, normalised as the segment
        command does).
      labels: a label map on its grid (:func:`jaxreg.io.load_labels`).
      label: the structure's value.
      out: the adapter file to write (atomically).
      shots, axis, steps, learning_rate, seed: as :func:`finetune_decoder`; ``kwargs``
        its other settings.
      model: one of :data:`jaxreg.segment.MODELS`.
      segmenter: a loaded model to use instead of loading ``model``.

    Returns:
      ``{"out", "label", "slices", "seconds", "seconds_train", "loss_first",
      "loss_final"}``.

    Raises:
      InputError: a missing or unfit file, a label not in the map.
    """
    from jaxreg import io
    from jaxreg.segment import run

    start = time.perf_counter()
    volume = io.load_volume(image)
    lab = run.labels_on_grid(labels, volume, image)
    run.choose_structures(lab.data, [str(label)], 0, labels)  # InputError if absent
    mask = np.asarray(lab.data) == int(label)
    if segmenter is None:
        segmenter = predict.load_segmenter(model)
    params, info = finetune_decoder(segmenter, volume.data, mask, shots=shots, axis=axis,
                                    steps=steps, learning_rate=learning_rate, seed=seed,
                                    normalise=True, **kwargs)
    info.update(label=int(label), image=os.fspath(image), labels=os.fspath(labels))
    save_decoder(out, params, info)
    seconds = time.perf_counter() - start
    logging.info("%s: label %d, slices %s, loss %.4f -> %.4f, %.1f s", out, label,
                 info["slices"], info["loss_first"], info["loss_final"], seconds)
    return {"out": os.fspath(out), "label": int(label), "slices": info["slices"],
            "seconds": round(seconds, 2), "seconds_train": info["seconds_train"],
            "loss_first": info["loss_first"], "loss_final": info["loss_final"]}
