"""Feature sources: the MIND-SSC + encoder hybrid's objective and its settings."""

import numpy as np
import pytest

from experiments.configs import breast
from jaxreg import experiment
from jaxreg import losses
from jaxreg import phantom
from jaxreg import solver
from jaxreg.experiment import settings
from jaxreg.features import sources


class _FakeEncoderSource:
    """Stands in for an EncoderSource: fixed random channels, a pair's worth."""

    name = "fake"

    def __init__(self, channels, coarse=False, seed=0):
        self.channels, self.coarse, self.seed = channels, coarse, seed

    def __call__(self, fixed, moving, *, fixed_mask=None, moving_mask=None, timings=None):
        rng = np.random.default_rng(self.seed)
        shape = np.shape(fixed) + (self.channels,)
        f, m = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
        if self.coarse:
            return sources.PairFeatures(f, m, f[..., :2], m[..., :2])
        return sources.PairFeatures(f, m)


@pytest.fixture(scope="module")
def pair():
    p = phantom.breast_pair("date", shape=(32, 24, 18), seed=0)
    return p["fixed"], p["moving"]


def test_hybrid_objective_is_mind_plus_weight_times_the_feature_mse(pair):
    fixed, moving = pair
    mind_src, fake = sources.MindSource(), _FakeEncoderSource(5)
    hybrid = sources.HybridSource(mind_src, fake, weight=0.7)
    h = hybrid(fixed, moving)
    m, e = mind_src(fixed, moving), fake(fixed, moving)
    assert h.fixed.shape[-1] == hybrid.channels == 17
    # What the solver minimises: similarity_weight (12, MIND-SSC's) x the channel mean.
    got = 12.0 * float(losses.ssd(h.fixed, h.moving))
    want = 12.0 * float(losses.ssd(m.fixed, m.moving)) + 0.7 * float(losses.ssd(e.fixed, e.moving))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_hybrid_with_weight_zero_registers_as_mind_alone(pair):
    fixed, moving = pair
    config = solver.ConvexAdamConfig(iterations=20)
    mind_only = sources.MindSource()(fixed, moving)
    hybrid = sources.HybridSource(sources.MindSource(), _FakeEncoderSource(4), weight=0.0)
    h = hybrid(fixed, moving)
    a = np.asarray(solver.convex_adam(mind_only.fixed, mind_only.moving, config=config))
    b = np.asarray(solver.convex_adam(h.fixed, h.moving, config=config))
    assert np.abs(a).max() > 0.1  # the pair does move
    np.testing.assert_allclose(a, b, atol=2e-3)


def _assert_mind_beside_features(hybrid, mind, features, weight):
    """``hybrid`` (fixed, moving) is ``mind``'s channels times one factor followed by
    ``features``' channels times another, and 12 x its channel-mean squared difference
    (the solver's objective at MIND-SSC's similarity_weight) is MIND-SSC's plus ``weight``
    x the features' mean squared difference."""
    mc = mind[0].shape[-1]
    assert hybrid[0].shape[-1] == mc + features[0].shape[-1]
    for part, ref in ((slice(None, mc), mind), (slice(mc, None), features)):
        got = [np.asarray(h[..., part], np.float64) for h in hybrid]
        ref = [np.asarray(r, np.float64) for r in ref]
        factor = sum(np.vdot(g, r) for g, r in zip(got, ref)) / sum(np.vdot(r, r) for r in ref)
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, factor * r, rtol=1e-5, atol=1e-6)
    msd = lambda pair: float(losses.ssd(*pair))  # noqa: E731
    np.testing.assert_allclose(12.0 * msd(hybrid), 12.0 * msd(mind) + weight * msd(features),
                               rtol=1e-5)


def test_hybrid_coarse_pair_is_mind_beside_the_encoders_coarse_map(pair):
    """With an encoder that has a coarse map, the solver's coarse stage gets MIND-SSC beside
    that map (not the fine maps), weighted as the fine pair is. Catches the fine maps passed
    to the coarse stage, MIND-SSC left out of it, the parts in the other order, and the
    coarse map scaled for the fine maps' channel count (its weight would be off)."""
    fixed, moving = pair
    mind_src, fake = sources.MindSource(), _FakeEncoderSource(4, coarse=True)
    h = sources.HybridSource(mind_src, fake, weight=0.7)(fixed, moving)
    m, e = mind_src(fixed, moving), fake(fixed, moving)
    _assert_mind_beside_features((h.fixed, h.moving), (m.fixed, m.moving),
                                 (e.fixed, e.moving), 0.7)
    _assert_mind_beside_features((h.coarse_fixed, h.coarse_moving), (m.fixed, m.moving),
                                 (e.coarse_fixed, e.coarse_moving), 0.7)


def test_hybrid_refuses_a_negative_weight():
    with pytest.raises(ValueError, match="weight"):
        sources.HybridSource(sources.MindSource(), _FakeEncoderSource(2), weight=-1.0)


def test_config_names_a_hybrid_and_checks_its_weight():
    c = breast.get_config("litemedsam+mind")
    r = settings.from_configdict(c).registration
    assert (r.encoder, r.model, r.uses_mind) == ("litemedsam+mind", "litemedsam", True)
    assert r.solver.similarity_weight == 12.0 and r.solver.iterations == 80  # MIND-SSC's
    assert r.hybrid_weight == c.hybrid_weight > 0
    assert settings.result_settings(settings.from_configdict(c))["hybrid_weight"] == r.hybrid_weight
    c.hybrid_weight = -0.5
    with pytest.raises(settings.ConfigError, match="hybrid_weight"):
        settings.from_configdict(c)
    alone = breast.get_config("litemedsam")
    alone.hybrid_weight = 1.0
    with pytest.raises(settings.ConfigError, match="hybrid encoder only"):
        settings.from_configdict(alone)
    with pytest.raises(ValueError, match="unknown encoder"):
        breast.get_config("mind+mind")
    assert "mind+mind" not in settings.ENCODERS


def test_make_source_builds_the_hybrid_from_its_parts(pair):
    """``make_source`` of a hybrid config: MIND-SSC with the config's radius and dilation
    beside the config's encoder and feature settings, at the config's weight. Catches any
    of those settings dropped for a default (all differ from the defaults here) and a plain
    encoder or MIND-SSC source returned for a hybrid name."""
    from helpers import patch_encoder
    from jaxreg.encoders import registry

    c = breast.get_config("litemedsam+mind")
    c.mind.radius, c.mind.dilation, c.hybrid_weight, c.features.pca_dims = 2, 1, 0.3, 2
    r = settings.from_configdict(c).registration
    source = experiment.make_source(r)
    assert isinstance(source, sources.HybridSource), source
    assert source.encoder.encoder.spec == registry.ENCODERS[r.model].spec
    # Run with a small linear encoder in LiteMedSAM's place (it takes seconds a slice here).
    small = patch_encoder()
    source.encoder.encoder = small
    fixed, moving = pair
    h = source(fixed, moving)
    m = sources.MindSource(radius=2, dilation=1)(fixed, moving)
    e = sources.EncoderSource(small, r.features)(fixed, moving)  # r.features.pca_dims == 2
    _assert_mind_beside_features((h.fixed, h.moving), (m.fixed, m.moving),
                                 (e.fixed, e.moving), 0.3)
