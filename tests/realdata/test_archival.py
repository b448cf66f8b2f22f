"""Real archival photometry of known events through the broker (real Kafka and Redis),
with the default configuration: the single lenses must not trigger on their baseline;
every event's outcome is written down (README.md in this folder: the files and sources).

The baseline of an event: the times at which the best PSPL fit to its whole light curve
(``training.pspl.fit_pspl``, in flux relative to the file's 75th-percentile magnitude,
the replay's template) magnifies the source by less than ``BASELINE_A - 1`` (1%: u > 3.9
Einstein radii, more than 3.9 t_E from t0 for a small u0): where a single lens is a
constant star at these errors (OGLE's best, 0.004 mag, is 0.4%).
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from broker.consumer import Broker, load_model
from replay.photometry_files import load_files, object_id_for
from tests.helpers import unique
from tests.integration.test_consumer import triggers_in
from training.photometry import K_MAG
from training.pspl import fit_pspl, magnification
from ulens import cli

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
FILES = sorted((HERE / "photometry").glob("*.dat"))
SINGLE = {"OGLE-2014-BLG-0939", "OGLE-2005-BLG-086"}
BASELINE_A = 1.01


def pspl_fit(t, mag, err):
    base = np.percentile(mag, 75)
    flux = 10.0 ** (-0.4 * (mag - base))
    return fit_pspl(t, flux, flux * K_MAG * err)


def on_baseline(fit, mjd: float) -> bool:
    return float(magnification(np.array([mjd]), fit.t0, fit.u0, fit.tE)[0]) < BASELINE_A


def outcome_file() -> Path:
    root = Path(os.environ.get("ULENS_RUN_DIR") or
                Path("runs") / f"realdata_{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
    root.mkdir(parents=True, exist_ok=True)
    return root / "outcomes.json"


@pytest.fixture(scope="module")
def replayed(services, tmp_path_factory):
    """Every file replayed once and consumed by the default broker (config/default.yaml's
    model) running both rules, the default pspl-fit and the TD-CNN (each event's outcome
    per rule); its triggers and the files' PSPL windows."""
    import dataclasses

    from confluent_kafka.admin import AdminClient, NewTopic

    tmp = tmp_path_factory.mktemp("realdata")
    prefix = unique("real")
    names = {k: unique(k) for k in ("alerts", "triggers", "dlq")}
    admin = AdminClient(services.kafka.client_config())
    for f in admin.create_topics([NewTopic(n, num_partitions=1, replication_factor=1)
                                  for n in names.values()], operation_timeout=30).values():
        f.result(timeout=60)
    topics = dataclasses.replace(services.kafka.topics, alerts=names["alerts"], triggers=names["triggers"],
                                 dead_letter=names["dlq"])
    settings = services.replace(kafka={"topics": topics}, redis={"key_prefix": prefix},
                                consumer={"rule": "both"})
    conf = tmp / "c.yaml"
    conf.write_text(f"redis:\n  key_prefix: {prefix}\n")
    args = ["replay", "--no-progress", "--config", str(conf), "--photometry", *map(str, FILES),
            "--topic", names["alerts"], "--truth-out", str(tmp / "truth.jsonl")]
    assert cli.main(args) == 0
    summary = Broker(settings, load_model(settings), group=unique("g")).run(until_idle=1.5)
    lc = load_files(FILES)
    windows = {}
    for e, f in enumerate(FILES):
        a, b = lc.offsets[e], lc.offsets[e + 1]
        windows[f.stem] = (lc.mjd[a:b], pspl_fit(lc.mjd[a:b], lc.mag[a:b].astype(float),
                                                 lc.mag_err[a:b].astype(float)))
    trig = triggers_in(settings, names["triggers"])
    admin.delete_topics(list(names.values()))
    return {"settings": settings, "summary": summary, "triggers": trig, "windows": windows}


def test_every_point_is_stored_and_every_event_has_an_outcome(replayed):
    from broker.validate import MAX_MAG_ERR

    s = replayed["summary"]
    lc = load_files(FILES)
    absurd = int((lc.mag_err > MAX_MAG_ERR).sum())      # MOA's faintest points: 1-3 mag errors
    assert dict(s.dead_letters) == ({"absurd_value": absurd} if absurd else {})
    assert s.points == len(lc.mjd) - absurd
    out = {}
    by_id = {}
    for t in replayed["triggers"]:
        by_id.setdefault((int(t["diaObjectId"]), t["rule"]), []).append(t)
    rules = sorted({t["rule"] for t in replayed["triggers"]}) or [replayed["settings"].consumer.rule]
    for f in FILES:
        t, fit = replayed["windows"][f.stem]
        t0, tE = fit.t0, fit.tE
        row = {"lens": "single" if f.stem in SINGLE else "binary", "points": int(len(t)),
               "pspl_fit_t0_mjd": round(float(t0), 2), "pspl_fit_tE_d": round(float(tE), 2),
               "pspl_fit_u0": round(float(fit.u0), 4), "rules": {}}
        for rule in rules:
            trs = sorted(by_id.get((object_id_for(f), rule), []), key=lambda x: x["midpointMjdTai"])
            if not trs:
                row["rules"][rule] = {"triggered": False}
                continue
            first = trs[0]
            row["rules"][rule] = {"triggered": True, "mjd": round(first["midpointMjdTai"], 3),
                                  "points_seen": int(first["nPoints"]),
                                  "tE_from_t0": round((first["midpointMjdTai"] - t0) / tE, 2),
                                  "on_baseline": on_baseline(fit, first["midpointMjdTai"])}
        out[f.stem] = row
    path = outcome_file()
    path.write_text(json.dumps({"model": str(replayed["settings"].model.resolved),
                                "rule": replayed["settings"].consumer.rule, "events": out}, indent=2) + "\n")
    print(f"outcomes: {path}")
    assert set(out) == {f.stem for f in FILES}


def test_no_single_lens_triggers_on_its_baseline(replayed):
    for name in SINGLE:
        t, fit = replayed["windows"][name]
        oid = object_id_for(HERE / "photometry" / f"{name}.dat")
        early = [x for x in replayed["triggers"] if int(x["diaObjectId"]) == oid
                 and on_baseline(fit, x["midpointMjdTai"])]
        assert not early, (f"{name}: triggered on its baseline (PSPL t0 {fit.t0:.1f}, u0 {fit.u0:.3f}, "
                           f"tE {fit.tE:.1f} d; A < {BASELINE_A}): "
                           + ", ".join(f"{x['rule']} at MJD {x['midpointMjdTai']:.1f} after "
                                       f"{x['nPoints']} points" for x in early))
