r"""Fine-tunes a small part on top of a frozen encoder, with optax, and writes it as an
adapter file (safetensors with its training record, :mod:`jaxreg.finetune.io`).

A feature adapter for registration (:mod:`jaxreg.finetune.features`), trained on
synthetic contrasts of the MNI 2009a template (nilearn) only::

    python -m experiments.finetune features --encoder=litemedsam --out=litemedsam.adapter.safetensors
    python -m experiments.breast --encoder=litemedsam \
        --config.features.adapter=litemedsam.adapter.safetensors ...

A mask decoder tuned on a few labelled slices of one structure
(:mod:`jaxreg.finetune.segment`)::

    python -m experiments.finetune segment --image=t1.nii.gz --labels=labels.nii.gz \
        --label=21 --shots=3 --out=putamen.decoder.safetensors
    python -m experiments.segment --image=t1.nii.gz --box=... --decoder=putamen.decoder.safetensors

Both are seeded (``--seed``) and show a progress bar. The feature adapter is resumable: a
rerun with the same settings reads the encoded synthetic slices from ``--workdir`` and
continues from the last checkpoint (written every 250 steps beside ``--out``). Every file
is written whole or not at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

__all__ = ["parse_args", "main"]


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _feature_flags(sub: argparse.ArgumentParser) -> None:
    from jaxreg.finetune.features import AdapterConfig

    helps = {"encoder": "registry encoder", "layers": "output maps (default: every map of "
             "the encoder's pyramid)", "hidden": "hidden GELU units (0: linear)",
             "dims": "output channels", "temperature": "InfoNCE temperature",
             "exclusion": "negatives within this many tokens are left out",
             "steps": "Adam steps per map", "learning_rate": "Adam's learning rate",
             "pairs": "image pairs per step", "anchors": "anchor tokens per pair",
             "slices": "synthetic axial slices", "variants": "contrasts per slice",
             "max_disp": "longest synthetic in-plane displacement, pixels",
             "render": "what the encoder sees: intensity or gradient (the render the "
             "registration must then use, which render=auto does)",
             "seed": "seed of the data, the weights and the sampling"}
    for field in dataclasses.fields(AdapterConfig):
        default = field.default
        kind = _csv if isinstance(default, tuple) else type(default)
        shown = ",".join(default) if isinstance(default, tuple) else default
        sub.add_argument(f"--{field.name}", type=kind, default=default,
                         help=f"{helps[field.name]} (default: {shown})")
    sub.add_argument("--weights", default="", help="encoder checkpoint ('' searches)")
    sub.add_argument("--workdir", default="", help="encoded synthetic slices (default: "
                     "a .adapter_tokens folder beside --out)")


def _segment_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--image", required=True, help="the volume (.nii, .nii.gz, .nrrd)")
    sub.add_argument("--labels", required=True, help="its label map (same grid)")
    sub.add_argument("--label", type=int, required=True, help="the structure's value")
    sub.add_argument("--shots", type=int, default=3, help="labelled slices to train on")
    sub.add_argument("--model", default="litemedsam", help="segmenter")
    sub.add_argument("--axis", type=int, default=2, help="slicing axis (0, 1 or 2)")
    sub.add_argument("--steps", type=int, default=0, help="Adam steps (0: the default)")
    sub.add_argument("--learning_rate", type=float, default=0.0,
                     help="Adam's learning rate (0: the default)")
    sub.add_argument("--seed", type=int, default=0, help="seed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.finetune",
                                     description=__doc__.split("\n\n")[0])
    subs = parser.add_subparsers(dest="task", required=True)
    features = subs.add_parser("features", help="a feature adapter for registration")
    _feature_flags(features)
    segment = subs.add_parser("segment", help="a few-shot mask decoder")
    _segment_flags(segment)
    for sub in (features, segment):
        sub.add_argument("--out", required=True, help="the adapter file to write")
        sub.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.task == "features":
        from jaxreg.finetune import features

        names = {f.name for f in dataclasses.fields(features.AdapterConfig)}
        try:
            config = features.AdapterConfig(**{k: v for k, v in vars(args).items()
                                               if k in names})
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        record = features.train(config, args.out, workdir=args.workdir,
                                weights=args.weights, progress=not args.quiet)
    else:
        from jaxreg.finetune import segment

        options = {k: getattr(args, k) for k in ("steps", "learning_rate") if getattr(args, k)}
        record = segment.finetune_files(args.image, args.labels, args.label, out=args.out,
                                        shots=args.shots, model=args.model, axis=args.axis,
                                        seed=args.seed, **options)
    print(json.dumps(record, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from jaxreg.cli import exit_now

    exit_now(main())
