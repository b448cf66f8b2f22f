"""The follow-up view without services: `ulens events plot` of an archival file and of a
dataset event (the shipped model scores them), the figure's panels, the causal PSPL fit,
a Redis view turned into a light curve, and `ulens dashboard`'s option checks."""
from __future__ import annotations

import argparse
import socket

import numpy as np
import pytest

from followup import lightcurve as lcm
from training import event_figure as ef
from training.event_figure import light_curve_figure
from training import pspl
from ulens import cli

PNG = b"\x89PNG\r\n\x1a\n"
T0, U0, TE, BASE = 56400.0, 0.15, 25.0, 19.0


def pspl_curve(n=160, seed=3):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(T0 - 120, T0 + 80, n))
    err = np.full(n, 0.02)
    mag = BASE - 2.5 * np.log10(pspl.magnification(t, T0, U0, TE)) + rng.normal(0, 0.02, n)
    return t, mag, err


def write_archival(path, t, mag, err):
    """An OGLE-like table: HJD mag err, a header and a comment."""
    path.write_text("# an archival light curve\nHJD mag err\n" + "".join(
        f"{x + 2_400_000.5:.5f} {m:.4f} {e:.4f}\n" for x, m, e in zip(t, mag, err)))
    return path


def test_events_plot_of_an_archival_file_writes_a_png(tmp_path, capsys):
    f = write_archival(tmp_path / "ogle-2026-blg-0001.dat", *pspl_curve())
    out = tmp_path / "plots" / "archival.png"
    assert cli.main(["events", "plot", "--photometry", str(f), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 20_000
    said = capsys.readouterr().out
    assert f"wrote {out}: 160 points" in said and "PSPL fit of the first 160 points" in said


def test_archival_figure_has_the_three_panels_and_the_fit(tmp_path):
    from followup.cli_events import photometry_curve
    import config

    f = write_archival(tmp_path / "ev.dat", *pspl_curve())
    lc = photometry_curve(f, None, config.load())
    from replay.photometry_files import object_id_for

    assert lc.object_id == object_id_for(f) and len(lc) == 160 and lc.detected is None
    assert np.isfinite(lc.p_binary).all() and lc.threshold is not None
    # scored as the broker scores the replayed file: in band i (the default model reads
    # the band; scored without one, OGLE-2003-BLG-235's trigger moved by 420 days)
    from replay.photometry_files import read_table
    from training.artifact import load_artifact

    art = load_artifact(config.load().model.resolved)
    t, mag, err, _ = read_table(f)
    want = art.predict(art.inputs(t, mag, err, band=np.full(len(t), 3, np.uint8))[None])[0]
    np.testing.assert_allclose(lc.p_binary, want, atol=1e-6)
    fit = ef.fit_pspl(lc)
    assert fit.t0 == pytest.approx(T0, abs=1.0) and fit.tE == pytest.approx(TE, rel=0.15)
    fig = light_curve_figure(lc, fit)
    lc_ax, res_ax, p_ax = fig.axes
    assert [a.get_ylabel() for a in fig.axes] == ["magnitude", "data − PSPL\n[mag]", "P(binary)"]
    assert p_ax.get_xlabel() == "MJD (TAI)" and lc_ax.yaxis_inverted()
    assert "PSPL fit of the first 160 points" in lc_ax.get_title(loc="left")
    assert "no detection flag" in lc_ax.get_title(loc="left")
    # the residuals of a PSPL from its own fit are noise (0.02 mag here)
    assert np.abs(ef.series(lc, fit).bands[0].residual).max() < 0.12
    assert res_ax.yaxis_inverted() and len(res_ax.lines) >= 1
    assert any("threshold" in t.get_text() for t in p_ax.get_legend().get_texts())


def test_events_plot_of_a_dataset_event_tells_detections_from_forced_points(tmp_path):
    data = tmp_path / "ev.npz"
    assert cli.main(["simulate", "--survey", "lsst", "--n-pspl", "1", "--n-binary", "1", "--seed", "5",
                     "--workers", "1", "--quiet", "--output", str(data)]) == 0
    from training import dataset

    ds = dataset.load(data)
    oid = int(ds.event_id[1])
    out = tmp_path / "ds.png"
    assert cli.main(["events", "plot", str(oid), "--data", str(data), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    from followup.cli_events import dataset_curve
    import config

    lc = dataset_curve(data, oid, config.load())
    assert lc.detected is not None and lc.detected.any() and (~lc.detected).any()
    labels = [t.get_text() for t in light_curve_figure(lc, ef.fit_pspl(lc)).axes[0].get_legend().get_texts()]
    assert any("detections" in x for x in labels) and any("forced" in x for x in labels)


def test_an_event_missing_from_the_dataset_is_named(tmp_path, capsys):
    data = tmp_path / "ev.npz"
    assert cli.main(["simulate", "--n-pspl", "1", "--n-binary", "0", "--seed", "5", "--workers", "1",
                     "--quiet", "--output", str(data)]) == 0
    assert cli.main(["events", "plot", "12345", "--data", str(data)]) == cli.EXIT_BAD_INPUT
    assert "no event with event_id 12345" in capsys.readouterr().err


def redis_view(n=40, triggered=True):
    t, mag, err = pspl_curve(n)
    # every third point forced photometry (a Rubin packet's prvDiaForcedSources)
    pts = [{"index": 5 + i, "diaSourceId": 100 + i, "midpointMjdTai": float(t[i]), "band": "r",
            "forced": i % 3 == 0, "mag": float(mag[i]), "mag_err": float(err[i]),
            "p_binary": None if i >= n - 2 else 0.01 * i}
           for i in range(n)]
    trig = {"midpointMjdTai": float(t[30]), "nPoints": 36, "probability": 0.5, "threshold": 0.31,
            "rule": "tdcnn", "summary": "binary candidate"} if triggered else None
    return {"diaObjectId": 7, "points": pts, "trigger": trig, "n_dropped": 5}


def test_a_redis_view_becomes_a_light_curve_with_its_trigger_threshold():
    lc = lcm.from_event_view(redis_view(), "Redis 'x'", {"threshold": 0.9, "smooth_window": 5, "min_points": 10})
    assert lc.threshold == 0.31                          # the trigger's own threshold wins
    assert lc.first_index == 5 and lc.trigger.index == 35
    assert list(lc.detected) == [i % 3 != 0 for i in range(40)]          # Redis keeps the kind
    assert np.isnan(lc.p_binary[-2:]).all() and np.isfinite(lc.score()[:-2]).all()
    assert any("dropped" in x for x in lc.notes) and not any("flag" in x for x in lc.notes)
    s = ef.series(lc, ef.fit_pspl(lc))
    assert len(s.prob_t) == 38 and s.bands[0].band == "r" and s.bands[0].model_t is not None
    assert list(s.bands[0].detected) == list(lc.detected)
    fig = light_curve_figure(lc, ef.fit_pspl(lc))
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "r detections (26)" in labels and "r forced (14)" in labels      # filled and open
    plain = lcm.from_event_view(redis_view(triggered=False), "Redis 'x'", None)
    assert plain.threshold is None and plain.trigger is None


def test_the_fit_is_causal_and_refuses_too_few_points():
    lc = lcm.from_event_view(redis_view(), "r", None)
    assert ef.fit_pspl(lc, n_points=3) is None
    part = ef.fit_pspl(lc, n_points=20)
    assert part.n_points == 20 and part.t_last == lc.t[19]


def test_the_web_figure_has_every_point_and_the_threshold():
    from followup.web_figure import light_curve_plotly

    lc = lcm.from_event_view(redis_view(), "r", None)
    fig = light_curve_plotly(lc, ef.fit_pspl(lc))
    points = [tr for tr in fig["data"] if tr.get("mode") == "markers" and tr.get("yaxis", "y") == "y"]
    assert sum(len(tr["x"]) for tr in points) == len(lc)
    assert any("threshold" in str(a.get("text")) for a in fig["layout"]["annotations"])


def bumped_curve(n=200, seed=5):
    """A well-sampled PSPL with a caustic-crossing-like bump (1 mag, 4 points) after its peak."""
    t, mag, err = pspl_curve(n, seed)
    j = int(np.searchsorted(t, T0 + 8.0))
    mag = mag.copy()
    mag[j:j + 4] -= 1.0
    return t, mag, err, j


def test_a_pspl_fit_trigger_is_drawn_with_the_rules_statistic():
    from followup.web_figure import light_curve_plotly
    from training import psplfit

    t, mag, err, j = bumped_curve()
    D = psplfit.run_curves([(t, mag, err, np.full(len(t), 2, np.uint8))], psplfit.Params())[0]
    k = psplfit.first_trigger(D, psplfit.Params().threshold)
    assert k is not None and j <= k < j + 4                   # the rule fires on the bump
    pts = [{"index": i, "diaSourceId": 100 + i, "midpointMjdTai": float(t[i]), "band": "r", "forced": False,
            "mag": float(mag[i]), "mag_err": float(err[i]), "p_binary": None} for i in range(len(t))]
    rec = {"midpointMjdTai": float(t[k]), "nPoints": k + 1, "probability": float(D[k]),
           "threshold": psplfit.Params().threshold, "rule": "pspl-fit", "summary": "anomaly"}
    lc = lcm.from_event_view({"diaObjectId": 9, "points": pts, "trigger": rec, "n_dropped": 0}, "r")
    # the trigger's rule needs no settings: its statistic is recomputed as the broker did
    np.testing.assert_array_equal(lc.statistic, D)
    assert lc.statistic_threshold == rec["threshold"] and lc.trigger.rule == "pspl-fit"
    fig = light_curve_plotly(lc, ef.fit_pspl(lc))
    names = [str(tr.get("name")) for tr in fig["data"]]
    assert "PSPL-fit D (active points)" in names and f"trigger MJD {t[k]:.3f} (D {D[k]:.1f})" in names
    assert any(x.startswith("PSPL-fit threshold") for x in names)
    assert fig["layout"]["yaxis3"]["type"] == "log"           # no model ran: D on the panel's own axis
    p_ax = light_curve_figure(lc, ef.fit_pspl(lc)).axes[2]
    assert p_ax.get_ylabel() == "PSPL-fit D" and p_ax.get_yscale() == "log"


def test_offline_curves_are_decided_by_the_brokers_rules():
    from training import psplfit

    t, mag, err, j = bumped_curve()
    probs = np.zeros(len(t))                                  # a model that never fires
    rule = {"threshold": 0.5, "smooth_window": 5, "min_points": 10}
    band = np.full(len(t), "r", dtype=object)
    quiet = ef.decide_offline(ef.offline(1, "x", t, mag, err, band, None, probs, rule), ("tdcnn",))
    assert quiet.trigger is None and quiet.statistic is None
    lc = ef.add_pspl_statistic(ef.offline(1, "x", t, mag, err, band, None, probs, rule), psplfit.Params())
    for rules in (("pspl-fit",), ("tdcnn", "pspl-fit")):
        got = ef.decide_offline(lc, rules).trigger
        assert got.rule == "pspl-fit" and j <= got.index < j + 4 and got.probability >= psplfit.Params().threshold


# ------------------------------------------------------------------------- dashboard
def test_dashboard_help_explains_every_option(capsys):
    from followup import dashboard

    p = cli.build_parser("dashboard", dashboard)
    for action in p._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help and len(action.help) > 20, action.dest
    with pytest.raises(SystemExit):
        cli.main(["dashboard", "--help"])
    text = capsys.readouterr().out
    for opt in ("--host", "--port", "--topic", "--refresh", "--max-triggers", "--config"):
        assert opt in text
    assert "127.0.0.1" in text


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.4", "::", "example.org"])
def test_dashboard_listens_on_loopback_only(host, capsys):
    assert cli.main(["dashboard", "--host", host]) == cli.EXIT_BAD_INPUT
    assert host in capsys.readouterr().err


def test_a_port_in_use_is_named():
    from followup.dashboard import DashboardUnavailable, bind

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(DashboardUnavailable, match=f"127.0.0.1:{port}.*--port"):
            bind("127.0.0.1", port)
    finally:
        taken.close()
    assert DashboardUnavailable.exit_code == cli.EXIT_UNAVAILABLE


def test_events_show_prints_each_points_kind():
    from broker import state as st
    from followup.cli_events import format_event

    recs = np.zeros(2, dtype=st.RECORD)
    recs["t"], recs["mag"], recs["err"] = [61000.5, 61001.5], [19.0, 19.1], [0.05, 0.06]
    recs["band"] = st.band_codes("ri", forced=[False, True])
    recs["p"] = st.PROB_UNSCORED
    h = st.parse_header(st.HEADER_FIXED.pack(st.VERSION, 5, 0, 0, 2, 0, 0, 1, 1, 61001.5, 0)
                        + st.BANDS_BLOCK.pack(*[float("nan")] * st.N_SLOTS, *[0] * st.N_SLOTS) + bytes(20))
    rows = format_event(st.EventView(3, h, 0, recs, 60, None, None).to_dict()).splitlines()[-3:]
    assert rows[0].split()[4] == "kind"
    assert rows[1].split()[3:5] == ["r", "det"] and rows[2].split()[3:5] == ["i", "forced"]
