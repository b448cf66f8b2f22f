"""Scoring triggers against ground truth (pure)."""
import json

import pytest

from broker import report


def truth():
    rows = []
    for i in range(10):   # 0-4 PSPL, 5-9 binary
        rows.append({"diaObjectId": i, "label": int(i >= 5), "t0_mjd": 61100.0, "tE": 20.0,
                     "dchi2": None if i < 5 else [10.0, 100.0, 500.0, 5000.0, 20000.0][i - 5]})
    return rows


def trig(oid, mjd, rule="tdcnn", n=50, lat_us=2000, tid=None):
    return {"triggerId": tid or f"{oid}-{rule}", "diaObjectId": oid, "diaSourceId": oid * 1000 + n,
            "rule": rule, "probability": 0.95, "threshold": 0.9, "nPoints": n, "midpointMjdTai": mjd,
            "alertProducedUs": 1_000_000, "triggerProducedUs": 1_000_000 + lat_us, "modelVersion": "m"}


def test_counts_precision_recall_and_decision_time():
    trs = [trig(0, 61050.0), trig(7, 61090.0, n=40, lat_us=1000), trig(8, 61110.0, n=60, lat_us=3000),
           trig(9, 61100.0, n=50, lat_us=5000),
           trig(9, 61100.0, n=50, lat_us=5000),          # the same trigger id re-delivered
           trig(99, 61000.0)]                           # an event not in this run
    r = report.score(truth(), trs)["rules"]["tdcnn"]
    assert r["triggers"] == 5 and r["events_triggered"] == 4 and r["unmatched_triggers"] == 1
    assert r["true_positives"] == 3 and r["false_positives"] == 1
    assert r["precision"] == pytest.approx(0.75) and r["recall"] == pytest.approx(0.6)
    assert r["pspl_trigger_share"] == pytest.approx(0.2)
    assert r["events_with_multiple_triggers"] == 0
    dt = r["decision_time"]
    assert dt["days_from_t0"]["p50"] == pytest.approx(0.0)
    assert dt["tE_from_t0"]["p10"] < 0 < dt["tE_from_t0"]["p90"]
    assert dt["points_seen"]["p50"] == pytest.approx(50)
    assert dt["share_before_t0"] == pytest.approx(1 / 3)
    bins = r["recall_by_dchi2"]
    assert [b["binaries"] for b in bins] == [1, 1, 1, 2]
    assert [b["triggered"] for b in bins] == [0, 0, 1, 2]
    lat = r["latency_ms"]
    assert lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert lat["max"] == pytest.approx(5.0)


def test_two_triggers_for_one_event_are_flagged_and_the_earliest_counts():
    trs = [trig(6, 61120.0, tid="a"), trig(6, 61080.0, tid="b")]
    r = report.score(truth(), trs)["rules"]["tdcnn"]
    assert r["events_with_multiple_triggers"] == 1 and r["events_triggered"] == 1
    assert r["decision_time"]["days_from_t0"]["p50"] == pytest.approx(-20.0)


def test_rules_are_scored_side_by_side():
    res = report.score(truth(), [trig(5, 61100.0, rule="a"), trig(6, 61100.0, rule="b"),
                                 trig(1, 61100.0, rule="b")])
    assert set(res["rules"]) == {"a", "b"}
    assert res["rules"]["b"]["false_positives"] == 1 and res["rules"]["a"]["false_positives"] == 0


def test_render_and_plots(tmp_path):
    res = report.score(truth(), [trig(7, 61090.0), trig(8, 61110.0), trig(2, 61000.0)])
    text = report.render(res)
    assert "purity" in text and "completeness" in text and "latency" in text
    paths = report.plot(res, tmp_path)
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(report.public(res))  # serialisable


def test_truth_errors(tmp_path):
    with pytest.raises(report.ReportError, match="not found"):
        report.read_truth(tmp_path / "x.jsonl")
    p = tmp_path / "t.jsonl"
    p.write_text('{"diaObjectId": 1}\nnot json\n')
    with pytest.raises(report.ReportError, match="t.jsonl:2"):
        report.read_truth(p)


def test_completeness_against_decision_time_plot_per_rule(tmp_path):
    res = report.score(truth(), [trig(7, 61090.0), trig(8, 61110.0), trig(9, 61120.0, rule="pspl-fit"),
                                 trig(8, 61100.0, rule="pspl-fit")])
    assert res["_n_binary_detectable"] == 3            # Δχ² 500, 5000, 20000
    assert res["rules"]["pspl-fit"]["_dt_te_det"] == [pytest.approx(1.0), pytest.approx(0.0)]
    paths = report.plot(res, tmp_path)
    names = [p.name for p in paths]
    assert "completeness_vs_decision_time.png" in names
    assert (tmp_path / "completeness_vs_decision_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "_n_binary_detectable" not in report.public(res)


def test_processing_cost_per_alert_per_rule(tmp_path):
    a = {"alerts": 1000, "points": 1000, "busy_seconds": 2.0, "rule_seconds": {"tdcnn": 0.5, "pspl-fit": 1.0}}
    b = {"alerts": 3000, "points": 3000, "busy_seconds": 6.0, "rule_seconds": {"tdcnn": 1.5, "pspl-fit": 3.0}}
    f1, f2 = tmp_path / "c1.log", tmp_path / "c2.log"
    f1.write_text("some log line\n" + json.dumps(a) + "\n")
    f2.write_text(json.dumps(b) + "\n")
    got = report.read_consumer_summaries([f1, f2])
    c = report.cost(got)
    assert c["alerts"] == 4000 and c["consumers"] == 2
    assert c["per_rule_us_per_alert"]["tdcnn"] == pytest.approx(500.0)
    assert c["per_rule_us_per_alert"]["pspl-fit"] == pytest.approx(1000.0)
    assert c["shared_us_per_alert"] == pytest.approx(500.0)
    assert c["total_us_per_alert"] == pytest.approx(2000.0)
    res = report.score(truth(), [trig(7, 61090.0), trig(8, 61110.0, rule="pspl-fit")])
    res["cost"] = c
    text = report.render(res)
    assert "processing cost per alert: 500.0 µs" in text and "1000.0 µs" in text
    json.dumps(report.public(res))
    bad = tmp_path / "bad.log"
    bad.write_text("no summary here\n")
    with pytest.raises(report.ReportError, match="no consumer summary"):
        report.read_consumer_summaries([bad])


def test_v1_and_v2_triggers_score_alike_and_late_decisions_have_no_latency():
    from broker import trigger_fields as tf

    v1 = [trig(7, 61090.0, lat_us=1000), dict(trig(8, 61110.0), alertProducedUs=0)]  # 8: decided late
    v2 = [tf.as_latest(t) for t in v1]
    a, b = (report.score(truth(), x)["rules"]["tdcnn"] for x in (v1, v2))
    assert {k: v for k, v in a.items() if not k.startswith("_")} == \
        {k: v for k, v in b.items() if not k.startswith("_")}
    assert a["true_positives"] == 2 and a["latency_ms"]["n"] == 1 and a["latency_ms"]["max"] == 1.0


def test_decision_time_from_the_onset():
    """Binaries 7-9 have an onset at t0 - 5 d (truth v1.1); 8 triggers 10 d after it, 9 two
    days before it; 7 never. t0 + tE = 61120."""
    rows = truth()
    for r in rows:
        r["onset_mjd"] = 61095.0 if r["diaObjectId"] >= 7 else None
    res = report.score(rows, [trig(8, 61105.0), trig(9, 61093.0), trig(5, 61200.0)])
    o = res["rules"]["tdcnn"]["onset"]
    assert o["n_binary_with_onset"] == 3 and o["triggered"] == 2
    assert o["fraction_triggered"] == pytest.approx(2 / 3)
    assert o["fraction_triggered_before_t0_plus_tE"] == pytest.approx(2 / 3)
    assert o["fraction_before_onset"] == pytest.approx(0.5)
    assert o["delay_days"]["p50"] == pytest.approx(4.0)          # median of +10 and -2
    assert "from the detectability onset (3 binaries)" in report.render(res)
    none = report.score(truth(), [trig(8, 61105.0)])["rules"]["tdcnn"]["onset"]
    assert none["n_binary_with_onset"] == 0 and "no binary with an onset" in report.render(
        report.score(truth(), [trig(8, 61105.0)]))
