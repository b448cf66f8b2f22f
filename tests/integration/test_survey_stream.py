"""A survey profile's dataset through the real stream: `ulens replay` sends each visit with
its own band and difference-imaging fluxes, `--detections-only` sends the survey's 5-sigma
detections, and the broker stores each point with its band (real Kafka and Redis)."""
from __future__ import annotations

import numpy as np

from broker import state as st
from broker.consumer import Broker
from broker.validate import MAX_MAG_ERR
from tests.helpers import unique
from tests.integration.test_consumer import settings_for
from tests.unit.test_broker_inference import make_artifact
from training import simulate as sim
from training import survey as sv
from ulens import cli


def test_lsst_visits_stream_with_their_bands_and_detections(services, topics, redis_client, key_prefix,
                                                            tmp_path, capsys):
    ds = sim.simulate(3, 3, sim.SimulationConfig(survey="lsst", seed=8), workers=0)
    data = ds.save(tmp_path / "lsst.npz")
    art = make_artifact(tmp_path / "model", seed=2)
    for only, prefix in ((False, key_prefix + ":all"), (True, key_prefix + ":det")):
        names = topics("alerts", "triggers", "dlq")
        settings = settings_for(services, prefix, names, 0.99)
        conf = tmp_path / f"c{int(only)}.yaml"
        conf.write_text(f"redis:\n  key_prefix: {prefix}\n")
        args = ["replay", "--no-progress", "--config", str(conf), "--data", str(data), "--topic",
                names["alerts"], "--truth-out", str(tmp_path / f"t{int(only)}" / "truth.jsonl")]
        assert cli.main(args + (["--detections-only"] if only else [])) == 0, capsys.readouterr().err
        s = Broker(settings, art, group=unique("g")).run(until_idle=1.0)
        sent = ds.detected if only else np.ones(len(ds.time), bool)
        # the broker reads magnitudes (today's model): a visit with no flux on the visit
        # image has none, one barely above 0 has an absurd error; each refused and named
        no_flux = sent & (ds.sci_flux <= 0)
        with np.errstate(invalid="ignore"):
            absurd = sent & ~no_flux & (ds.mag_err > MAX_MAG_ERR)
        want = {k: int(v.sum()) for k, v in (("nonpositive_flux", no_flux), ("absurd_value", absurd)) if v.any()}
        ok = sent & ~no_flux & ~absurd
        assert s.alerts == sent.sum() and s.points == ok.sum() and dict(s.dead_letters) == want
        if only:
            assert not want                 # detections are bright enough
        for i in range(ds.n_events):
            a, b = ds.offsets[i], ds.offsets[i + 1]
            keep = ok[a:b]
            view = st.read_event(redis_client, prefix, int(ds.event_id[i]))
            if not keep.any():
                assert view is None
                continue
            np.testing.assert_array_equal(view.points["t"], 57000.0 + ds.time[a:b][keep])   # replay.start_mjd
            want = [st.BANDS.index(sv.BAND_NAMES[c]) for c in ds.band[a:b][keep]]
            assert list(view.points["band"]) == want
            np.testing.assert_array_equal(view.points["mag"], ds.mag[a:b][keep])
        capsys.readouterr()
