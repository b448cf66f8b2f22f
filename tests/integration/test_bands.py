"""Light curves per band, through the real Kafka and Redis with the shipped model.

A constant source observed alternately in two bands differs by its colour between them,
not in time. Each band is now compared only with itself (per-band reference,
``training.features``), so 20 constant sources seen in g and i in turn (g - i = 1.5 mag, a
red bulge star; 150 visits each) must not trigger; the stored curve keeps every point's
band and both bands' references. The same stream labelled as one band (what the broker
did before it kept bands apart) triggers on (nearly) every source: the test can fail.

Errors are 5%, the shipped thesis model's own regime (its training set has 0.05 mag
errors throughout): with 1% errors that model fires on a constant source in a single band
too (its mag_err input is out of range), which is the model's issue, not the bands'.
"""
from __future__ import annotations

import numpy as np
import pytest

from broker import state as st
from broker.consumer import Broker, load_model
from tests.helpers import mock_alert, unique
from tests.integration.test_consumer import produce, settings_for, triggers_in
from training.features import REFERENCE_POINTS
from training.photometry import mag_to_njy

N_SOURCES, N_VISITS = 20, 150
G_MAG, I_MAG, ERR = 20.0, 18.5, 0.05


def two_band_constants(seed: int, label_bands: bool = True):
    """(key, alert) of N_SOURCES constant sources seen in g and i in turn, in time order;
    ``label_bands`` False: every alert says band i (the colour then looks like variation)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(N_SOURCES):
        oid = 880_000 + s
        t = 61000.0 + np.cumsum(rng.uniform(0.5, 3.0, N_VISITS))
        for i, ti in enumerate(t):
            band = "g" if i % 2 == 0 else "i"
            mag = (G_MAG if band == "g" else I_MAG) + rng.normal(0.0, ERR)
            flux, ferr = mag_to_njy(mag, ERR)
            out.append((float(ti), mock_alert(
                diaObjectId=oid, diaSourceId=oid * 1000 + i, midpointMjdTai=float(ti),
                band=band if label_bands else "i",
                scienceFlux=float(flux), scienceFluxErr=float(ferr), psfFlux=float(flux) * 0.01,
                psfFluxErr=float(ferr))))
    out.sort(key=lambda x: x[0])
    return [(str(r["diaObjectId"]).encode(), r) for _, r in out]


@pytest.mark.parametrize("model_name", ["tdcnn-baseline"])
def test_a_constant_source_in_two_bands_never_triggers(services, topics, redis_client, key_prefix,
                                                       model_name):
    art = load_model(services, path=f"models/{model_name}")
    names = topics("alerts", "triggers", "dlq", partitions=2)
    settings = settings_for(services, key_prefix, names, None)
    alerts = two_band_constants(3)
    produce(settings, names["alerts"], alerts)
    s = Broker(settings, art, group=unique("g")).run(until_idle=1.0)
    assert (s.alerts, s.points, sum(s.dead_letters.values())) == (len(alerts), len(alerts), 0)
    assert triggers_in(settings, names["triggers"]) == []
    g, i = st.band_codes("gi")
    for k in range(N_SOURCES):
        view = st.read_event(redis_client, key_prefix, 880_000 + k)
        assert view.header.n_scored == N_VISITS
        assert list(view.points["band"][:4]) == [g, i, g, i]
        refs = view.header.references
        assert refs[g] == pytest.approx(G_MAG, abs=3 * ERR) and refs[i] == pytest.approx(I_MAG, abs=3 * ERR)
        assert view.header.band_counts[g] == view.header.band_counts[i] == N_VISITS // 2
        # every point was scored, and no score came near the model's threshold
        p = st.dequantize_probs(view.points["p"])
        assert np.isfinite(p).all() and p[REFERENCE_POINTS:].max() < art.threshold


def test_the_same_colours_in_one_band_look_like_variation(services, topics, key_prefix):
    """The control: without band labels the 1.5-mag steps fire on (nearly) every source."""
    art = load_model(services, path="models/tdcnn-baseline")
    names = topics("alerts", "triggers", "dlq", partitions=2)
    settings = settings_for(services, key_prefix, names, None)
    produce(settings, names["alerts"], two_band_constants(3, label_bands=False))
    Broker(settings, art, group=unique("g")).run(until_idle=1.0)
    assert len(triggers_in(settings, names["triggers"])) >= N_SOURCES - 2
