"""jaxreg.segment.predict: the 3D propagation (a deterministic stand-in model), 2D/3D
segmentation with a tiny random-weight model, and LiteMedSAM's real weights on a synthetic
bright block (box prompts, rows vs columns)."""

import numpy as np
import pytest
from flax import nnx

from jaxreg.segment import heads as H
from jaxreg.segment import predict


class _Oracle:
    """Stands in for a Segmenter: "embeds" a slice as itself, and "decodes" the pixels above
    0.5 inside the prompt box (so propagation follows the object exactly)."""

    chunk = ahead = 3

    def __init__(self):
        self.encoded = []
        self.boxes = []

    def encode(self, slices, **_):
        self.encoded.append(len(slices))
        return np.asarray(slices)

    def decode(self, embedding, shape, *, box=None, multimask=False, **_):
        r0, c0, r1, c1 = box
        self.boxes.append(tuple(box))
        rr, cc = np.mgrid[: shape[0], : shape[1]]
        inside = (rr >= r0) & (rr < r1) & (cc >= c0) & (cc < c1)
        return np.where(inside & (embedding > 0.5), 1.0, -1.0), 1.0


def _ball(shape=(24, 20, 16), centre=(12, 9, 8), radius=5.0):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return (np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius).astype(np.float32)


def test_propagation_follows_object_and_stops():
    vol = _ball()
    vol[3:6, 3:6, 0:3] = 1.0  # a second object the propagation must not reach
    truth = _ball() > 0.5
    oracle = _Oracle()
    # box around the ball's middle slices only, slice range 5..12 (ball spans 3..13)
    box = (7, 4, 5, 18, 15, 12)
    got = predict.segment_3d(oracle, vol, box, normalise=False, margin=0.0)
    expected = truth.copy()
    expected[..., :5] = False
    expected[..., 12:] = False
    np.testing.assert_array_equal(got, expected)
    assert max(oracle.encoded) <= oracle.chunk
    # whole range: stops at the first empty slice on each side, leaving the other object
    oracle = _Oracle()
    got = predict.segment_3d(oracle, vol, (7, 4, 0, 18, 15, 16), normalise=False,
                             margin=256 / 24)  # 1 voxel: the ball grows from the key slice 7
    np.testing.assert_array_equal(got, truth)
    assert sum(oracle.encoded) < 16  # slices past the empty ones are not all encoded


def test_propagation_axis_and_mask_start():
    vol = _ball()
    truth = vol > 0.5
    moved = np.moveaxis(vol, 2, 0)  # slicing axis first
    got = predict.segment_3d(_Oracle(), moved, (3, 7, 4, 14, 18, 15), axis=0, normalise=False,
                             margin=256 / 24)
    np.testing.assert_array_equal(got, np.moveaxis(truth, 2, 0))
    got = predict.propagate_from_mask(_Oracle(), vol, truth[..., 8], 8, normalise=False,
                                      margin=1.0, limits=(6, 16))
    expected = truth.copy()
    expected[..., :6] = False
    np.testing.assert_array_equal(got, expected)


def test_bad_inputs():
    vol = _ball()
    with pytest.raises(ValueError, match="outside the volume"):
        predict.segment_3d(_Oracle(), vol, (0, 0, 0, 30, 5, 5))
    with pytest.raises(ValueError, match="box of 6"):
        predict.segment_3d(_Oracle(), vol, (0, 0, 0, 3))
    with pytest.raises(ValueError, match="not a slice"):
        predict.propagate_from_mask(_Oracle(), vol, np.ones((3, 3)), 2)
    assert predict.mask_box(np.zeros((4, 4))) is None
    assert predict.mask_box(np.pad(np.ones((2, 3)), ((1, 1), (0, 2)))) == (1, 0, 3, 3)


def test_tiny_model_shapes(tiny_segmenter):
    seg = tiny_segmenter
    rng = np.random.default_rng(0)
    slices = rng.random((5, 30, 20))
    emb = seg.encode(slices)  # two padded calls of 4
    assert emb.shape == (5, 16, 16, 32)
    np.testing.assert_allclose(seg.encode(slices[1:], pad_to=4), emb[1:], rtol=1e-4, atol=1e-5)
    img = rng.random((30, 20)).astype(np.float32)
    m = predict.segment_2d(seg, img, box=(3, 4, 20, 15))
    assert m.shape == (30, 20) and m.dtype == bool
    m2 = predict.segment_2d(seg, img, points=[(10, 5), (20, 12)], labels=[1, 0], multimask=True)
    assert m2.shape == (30, 20)
    with pytest.raises(ValueError, match="box or points"):
        predict.segment_2d(seg, img)
    vol = rng.random((30, 20, 6)).astype(np.float32)
    out = predict.segment_3d(seg, vol, (3, 4, 1, 20, 15, 5))
    assert out.shape == vol.shape and not out[..., 0].any() and not out[..., 5].any()


def test_heads_size_must_match_encoder(tiny_segmenter):
    cfg = H.HeadsConfig(input_image_size=128, embedding_size=16, dim=32, num_heads=2, mlp_dim=32,
                        iou_head_hidden_dim=32)
    heads = nnx.eval_shape(lambda: H.create(cfg, rngs=nnx.Rngs(1)))
    with pytest.raises(ValueError, match="do not fit"):
        predict.Segmenter(nnx.Module(), tiny_segmenter.spec, heads)


class _Counting(_Oracle):
    """The oracle, recording which slice of ``vol`` each encoded slice is."""

    def __init__(self, vol, chunk):
        super().__init__()
        self.vol, self.chunk, self.ahead, self.slices = vol, chunk, chunk, []

    def encode(self, slices, **kw):
        for s in np.asarray(slices):
            self.slices += [k for k in range(self.vol.shape[2])
                            if np.array_equal(s, self.vol[..., k])]
        return super().encode(slices, **kw)


def test_only_reached_slices_are_encoded():
    """One slice per encoder call (a CPU's chunk): the key slice first, then each slice the
    propagation reaches, once; nothing outside the box, nothing past a slice whose mask
    came out empty."""
    k = np.arange(16, dtype=np.float32)
    vol = _ball() * (1.0 + k / 100) + k / 1000  # every slice different, all below 0.5 but the ball
    vol[3:6, 3:6, 0:2] = 1.0  # a second object beyond the first's empty slices
    model = _Counting(vol, chunk=1)
    predict.segment_3d(model, vol, (7, 4, 5, 18, 15, 12), normalise=False, margin=0.0)
    assert model.slices[0] == 8 and sorted(model.slices) == list(range(5, 12))
    assert model.encoded == [1] * 7
    model = _Counting(vol, chunk=1)
    got = predict.segment_3d(model, vol, (7, 4, 0, 18, 15, 16), normalise=False,
                             margin=256 / 24)
    assert got[..., 3:14].any(axis=(0, 1)).all() and not got[..., [2, 14]].any()
    # the ball spans slices 3..13: 2 and 14 are encoded, found empty, and end the run
    assert sorted(model.slices) == list(range(2, 15)) and model.encoded == [1] * 13


def test_cpu_encodes_one_slice_per_call(tiny_segmenter):
    """The default chunk on a CPU is 1 (batches run slower there, and encode slices the
    propagation may never reach); a single slice's embedding is the batched one."""
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("the CPU default")
    seg = predict.Segmenter(nnx.merge(*tiny_segmenter._enc), tiny_segmenter.spec,
                            nnx.merge(*tiny_segmenter._heads))
    assert seg.chunk == 1
    slices = np.random.default_rng(1).random((3, 30, 20)).astype(np.float32)
    np.testing.assert_allclose(seg.encode(slices[1:2]), tiny_segmenter.encode(slices)[1:2],
                               rtol=1e-4, atol=1e-5)


def test_two_devices_encode_at_once(tiny_segmenter):
    """On two devices, calls alternate between them, the embeddings are the one device's
    and land on the first device; a 3D propagation encodes ``chunk`` slices on each."""
    import jax

    devices = jax.local_devices()[:2]
    if len(devices) < 2:
        pytest.skip("needs two devices (tests/conftest.py makes two CPU devices)")
    enc, heads = nnx.merge(*tiny_segmenter._enc), nnx.merge(*tiny_segmenter._heads)
    one = predict.Segmenter(enc, tiny_segmenter.spec, heads, chunk=1, devices=devices[:1])
    two = predict.Segmenter(enc, tiny_segmenter.spec, heads, chunk=1, devices=devices)
    assert (one.ahead, two.ahead) == (1, 2)
    slices = np.random.default_rng(2).random((3, 30, 20)).astype(np.float32)
    got = two.encode(slices, pad_to=1)
    assert got.devices() == {devices[0]}
    np.testing.assert_allclose(got, one.encode(slices, pad_to=1), rtol=1e-5, atol=1e-6)
    vol = np.random.default_rng(3).random((30, 20, 7)).astype(np.float32)
    np.testing.assert_array_equal(predict.segment_3d(two, vol, (3, 4, 1, 20, 15, 6)),
                                  predict.segment_3d(one, vol, (3, 4, 1, 20, 15, 6)))


def test_ahead_two_encodes_pairs():
    """Two slices per step: each step encodes the next pair in the direction of travel, so
    a propagation that stops early encodes at most one slice past its last."""
    k = np.arange(16, dtype=np.float32)
    vol = _ball() * (1.0 + k / 100) + k / 1000
    model = _Counting(vol, chunk=1)
    model.ahead = 2
    predict.segment_3d(model, vol, (7, 4, 0, 18, 15, 16), normalise=False, margin=256 / 24)
    # key 7 with 8; 9-10, 11-12, 13-14 (14 empty: stop); down 6-5, 4-3, 2-1 (2 empty: stop)
    assert sorted(model.slices) == list(range(1, 15))
    assert len(model.encoded) == 7 and model.slices[:2] == [7, 8]
