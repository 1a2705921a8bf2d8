"""The JAX side of :func:`jaxreg.finetune.segment.finetune_decoder`: the training boxes
and masks in the decoder's frames (:func:`to_sam_boxes`, :func:`low_res_target`), its
forward split into what stays fixed during training (:func:`features`, computed once by
:func:`precompute`) and what each step runs (:func:`logits`), the loss, the
``hypernetwork`` part's training windows (:func:`prepare`), and the Adam steps
(:func:`train_step`, :func:`fit`).

``trainable`` is one of :data:`jaxreg.finetune.segment.TRAINABLE`; the heads are a
:class:`jaxreg.segment.Segmenter`'s, split by :func:`flax.nnx.split` into ``graphdef``,
the trained ``params`` and the frozen ``rest``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx


def to_sam_boxes(boxes: np.ndarray, shape: tuple[int, int], resized: tuple[int, int]
                 ) -> np.ndarray:
    """``(N, 4)`` ``(r0, c0, r1, c1)`` boxes -> SAM's ``(x0, y0, x1, y1)`` input pixels, as
    :meth:`jaxreg.segment.Segmenter.decode` converts them."""
    sy, sx = resized[0] / shape[0], resized[1] / shape[1]
    r0, c0, r1, c1 = boxes.T
    return np.stack([c0 * sx, r0 * sy, (c1 - 1) * sx, (r1 - 1) * sy], -1).astype(np.float32)


def low_res_target(slice_mask: np.ndarray, resized: tuple[int, int], image_size: int,
                   low: int) -> tuple[np.ndarray, np.ndarray]:
    """A slice's mask in the decoder's ``low x low`` logit frame (the encoder input scaled
    by ``low / image_size``): ``(target, weight)``, weight 0 on the padding."""
    rows = max(1, round(resized[0] * low / image_size))
    cols = max(1, round(resized[1] * low / image_size))
    m = jax.image.resize(jnp.asarray(slice_mask, jnp.float32), (rows, cols), "linear")
    target, weight = np.zeros((low, low), np.float32), np.zeros((low, low), np.float32)
    target[:rows, :cols] = np.asarray(m) >= 0.5
    weight[:rows, :cols] = 1.0
    return target, weight


def prompts(heads, sam_boxes):
    """The prompt encoder's ``(sparse, dense)`` embeddings of ``sam_boxes`` and its dense
    positional encoding."""
    pe = heads.prompt_encoder
    sparse, dense = pe(boxes=sam_boxes)
    return sparse, dense, pe.dense_pe()


def transformer(md, emb, image_pe, sparse, dense):
    """The first half of :class:`~jaxreg.segment.MaskDecoder`: ``(hs, keys (B, h, w, C))``."""
    b, _, dim = sparse.shape
    out_tokens = jnp.concatenate([md.iou_token.embedding[...], md.mask_tokens.embedding[...]])
    tokens = jnp.concatenate([jnp.broadcast_to(out_tokens, (b,) + out_tokens.shape), sparse], 1)
    src = jnp.broadcast_to(emb, dense.shape) + dense
    pe = jnp.broadcast_to(image_pe, src.shape)
    hs, keys = md.transformer(src, pe, tokens)
    return hs, keys.reshape(src.shape)


def masks(md, token, up):
    """Mask 0's logits ``(B, H, W)`` from its output token ``(B, C)`` and upscaled map."""
    hyper = md.output_hypernetworks_mlps[0](token)
    return jnp.einsum("bc,bhwc->bhw", hyper.astype(jnp.float32), up)


def features(heads, trainable, emb, sam_boxes):
    """What stays fixed during training, per sample (``emb (B, h, w, C)``, one per box)."""
    md = heads.mask_decoder
    sparse, dense, image_pe = prompts(heads, sam_boxes)
    if trainable == "decoder":
        return {"emb": emb, "sparse": sparse, "dense": dense}
    hs, keys = transformer(md, emb, image_pe, sparse, dense)
    if trainable == "output":
        return {"token": hs[:, 1], "keys": keys}
    up = md.output_upscaling(keys).astype(jnp.float32)
    return {"token": hs[:, 1], "up": up}


def logits(heads, trainable, f):
    """Low-resolution logits ``(B, 4h, 4w)`` of mask 0 from :func:`features`' output."""
    md = heads.mask_decoder
    if trainable == "decoder":
        hs, keys = transformer(md, f["emb"], heads.prompt_encoder.dense_pe(), f["sparse"],
                               f["dense"])
        token, up = hs[:, 1], md.output_upscaling(keys).astype(jnp.float32)
    elif trainable == "output":
        token, up = f["token"], md.output_upscaling(f["keys"]).astype(jnp.float32)
    else:
        token, up = f["token"], f["up"]
    return masks(md, token, up)


def loss(logits, target, weight):
    """Per-sample BCE (mean over the weighted pixels) + soft Dice loss, averaged."""
    bce = optax.sigmoid_binary_cross_entropy(logits, target)
    bce = (bce * weight).sum((1, 2)) / weight.sum((1, 2))
    p = jax.nn.sigmoid(logits) * weight
    dice = 1.0 - (2.0 * (p * target).sum((1, 2)) + 1.0) / (
        p.sum((1, 2)) + target.sum((1, 2)) + 1.0)
    return jnp.mean(bce + dice)


@functools.partial(jax.jit, static_argnames=("graphdef", "trainable", "window"))
def precompute(params, rest, emb, sam_boxes, corners, *, graphdef, trainable, window):
    """:func:`features` of every sample, the ``hypernetwork`` part's upscaled map cut to
    the ``window x window`` square at each sample's ``corners`` (row, column)."""
    heads = nnx.merge(graphdef, params, rest)
    feats = features(heads, trainable, emb, sam_boxes)
    if trainable == "hypernetwork":  # only the window around the box is trained
        crop = lambda a, rc: jax.lax.dynamic_slice(  # noqa: E731
            a, (rc[0], rc[1], 0), (window, window, a.shape[-1]))
        feats["up"] = jax.vmap(crop)(feats["up"], corners)
    return feats


def windows(sam_boxes: np.ndarray, image_size: int, low: int) -> tuple[int, np.ndarray]:
    """The training window of the ``hypernetwork`` part: its side (the largest box in the
    ``low`` frame plus 16 pixels per side, a multiple of 16, at most ``low``) and each
    sample's top-left corner (the window centred on its box, inside the frame)."""
    b = sam_boxes * (low / image_size)  # (x0, y0, x1, y1)
    extent = float(np.max(b[:, 2:] - b[:, :2])) + 1.0 + 32.0
    window = int(min(low, 16 * np.ceil(extent / 16)))
    centre = (b[:, :2] + b[:, 2:]) / 2.0  # (x, y)
    corner = np.clip(np.round(centre[:, ::-1] - window / 2.0), 0, low - window)
    return window, corner.astype(np.int32)


def prepare(params, rest, emb, sam_boxes: np.ndarray, target: np.ndarray,
            weight: np.ndarray, *, graphdef, trainable: str, image_size: int):
    """What :func:`fit` trains on: ``(feats, target, weight, window)``, :func:`precompute`'s
    features of the samples (``emb`` one per box, ``sam_boxes`` in input pixels) and their
    targets and weights (``(N, low, low)``), all cut to each sample's :func:`windows` for
    the ``hypernetwork`` part (``window``: the side, else ``low``)."""
    low = target.shape[-1]
    window, corners = low, np.zeros((len(sam_boxes), 2), np.int32)
    if trainable == "hypernetwork":
        window, corners = windows(sam_boxes, image_size, low)
        target = np.stack([t[r:r + window, c:c + window] for t, (r, c) in zip(target, corners)])
        weight = np.stack([w[r:r + window, c:c + window] for w, (r, c) in zip(weight, corners)])
    target, weight = jnp.asarray(target), jnp.asarray(weight)
    feats = precompute(params, rest, emb, jnp.asarray(sam_boxes), jnp.asarray(corners),
                       graphdef=graphdef, trainable=trainable, window=window)
    return feats, target, weight, window


def optimiser(learning_rate) -> optax.GradientTransformation:
    """The training's optimiser: optax's Adam at ``learning_rate``."""
    return optax.adam(learning_rate)


@functools.partial(jax.jit, static_argnames=("graphdef", "trainable"), donate_argnums=(0, 1))
def train_step(params, opt_state, rest, feats, target, weight, idx, learning_rate, *,
               graphdef, trainable):
    """One Adam step on samples ``idx`` (None: all); the learning rate is traced, so that
    one program serves every rate."""
    if idx is not None:  # a minibatch; None: all samples, nothing gathered
        feats, target, weight = jax.tree.map(lambda a: a[idx], (feats, target, weight))

    def loss_fn(p):
        heads = nnx.merge(graphdef, p, rest)
        return loss(logits(heads, trainable, feats), target, weight)

    value, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimiser(learning_rate).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


def fit(params, rest, feats, target, weight, *, graphdef, trainable: str, steps: int,
        learning_rate: float, batch: int, rng: np.random.Generator, progress: bool
        ) -> tuple[dict, np.ndarray]:
    """``steps`` :func:`train_step` s from ``params`` (not changed), each on ``batch``
    samples drawn by ``rng`` (all of them, nothing drawn, when ``batch`` is their number):
    ``(params, losses)``, the loss of each step; ``progress``: logged every tenth."""
    n = target.shape[0]
    opt_state = optimiser(learning_rate).init(params)
    lr = jnp.float32(learning_rate)
    params = jax.tree.map(jnp.copy, params)  # donated by the steps: not the segmenter's
    losses = []
    for step in range(steps):
        pick = None if batch == n else jnp.asarray(rng.choice(n, batch, replace=False))
        params, opt_state, value = train_step(params, opt_state, rest, feats, target, weight,
                                              pick, lr, graphdef=graphdef, trainable=trainable)
        losses.append(value)
        if progress and (step + 1) % max(1, steps // 10) == 0:
            logging.info("step %d/%d: loss %.4f", step + 1, steps, float(value))
    return params, np.asarray(jax.device_get(losses), float)
