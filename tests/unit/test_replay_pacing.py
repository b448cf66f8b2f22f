"""Replay pacing (survey time -> wall time, rate cap) and the command's options, no Kafka."""
from __future__ import annotations

import argparse

import pytest

import config as cfg
from replay import cli
from replay.producer import Delivery, Outcome, Pacer
from replay.stream import ReplayError


def test_speed_maps_survey_days_to_wall_seconds():
    p = Pacer(speed=86400.0, rate=None, mjd0=61000.0, t0=100.0)   # one survey day per second
    assert p.due(61000.0, now=100.0) == 100.0
    assert p.due(61002.5, now=100.1) == pytest.approx(102.5)
    assert p.due(61001.0, now=105.0) == 105.0                      # late: send now, no waiting
    p2 = Pacer(speed=3600.0, rate=None, mjd0=0.0, t0=0.0)           # one survey hour per second
    assert p2.due(1.0, now=0.0) == pytest.approx(24.0)


def test_rate_cap_spaces_alerts_and_does_not_burst_after_a_stall():
    p = Pacer(speed=None, rate=100.0, mjd0=0.0, t0=0.0)
    dues = [p.due(0.0, now=0.0) for _ in range(5)]
    assert dues == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04])
    # the producer stalls until t = 10 s: the schedule restarts from now, no catch-up burst
    after = [p.due(0.0, now=10.0) for _ in range(4)]
    assert after == pytest.approx([10.0, 10.01, 10.02, 10.03])


def test_rate_and_speed_together_take_the_later():
    p = Pacer(speed=86400.0, rate=2.0, mjd0=0.0, t0=0.0)
    assert p.due(0.0, now=0.0) == 0.0
    assert p.due(0.1, now=0.0) == pytest.approx(0.5)     # rate is the later constraint
    assert p.due(3.0, now=0.6) == pytest.approx(3.0)     # survey time is the later one


def test_pacer_rejects_non_positive_values():
    with pytest.raises(ReplayError):
        Pacer(speed=0.0, rate=None, mjd0=0, t0=0)
    with pytest.raises(ReplayError):
        Pacer(speed=None, rate=-1.0, mjd0=0, t0=0)


def test_delivery_accounting():
    d = Delivery()
    d.callback(None, None)
    d.callback("boom", None)
    d.callback("second", None)
    assert (d.succeeded, d.failed, d.first_error) == (1, 2, "boom")
    out = Outcome(produced=10, seconds=2.0, interrupted=False, signal=None, delivery=d,
                  unflushed=1, failed=2)
    assert (out.undelivered, out.delivered, out.rate) == (3, 7, 5.0)


def parse(*argv):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    cli.add_arguments(p)
    return p.parse_args(list(argv))


def test_flags_override_config_and_config_fills_the_rest(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("replay:\n  speed: 3600\n  history_points: 4\n  detections_only: true\n"
                    "  snr_threshold: 3.0\nkafka:\n  topics:\n    alerts: my-alerts\n")
    settings = cfg.load(conf, env={})
    o = cli._options(parse("--data", "x.npz"), settings)
    assert (o["speed"], o["history"], o["detections_only"], o["snr_threshold"], o["topic"]) == \
        (3600.0, 4, True, 3.0, "my-alerts")
    o = cli._options(parse("--data", "x.npz", "--speed", "max", "--history", "0",
                           "--no-detections-only", "--topic", "t", "--rate", "50",
                           "--start-mjd", "60000.5"), settings)
    assert (o["speed"], o["speed_arg"], o["history"], o["detections_only"], o["topic"],
            o["rate"], o["start_mjd"]) == (None, "max", 0, False, "t", 50.0, 60000.5)


@pytest.mark.parametrize("argv", [["--speed", "0"], ["--speed", "fast"], ["--rate", "-3"],
                                  ["--history", "-1"], ["--limit-events", "0"], ["-X", "novalue"]])
def test_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit):
        parse("--data", "x.npz", *argv)
    assert "error" in capsys.readouterr().err


def test_data_and_photometry_are_exclusive_and_one_is_required(capsys):
    with pytest.raises(SystemExit):
        parse()
    with pytest.raises(SystemExit):
        parse("--data", "x.npz", "--photometry", "a.dat")


def test_replay_is_a_registered_command():
    from ulens import cli as top
    assert top.COMMANDS["replay"][0] == "replay.cli"
