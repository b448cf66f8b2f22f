"""A tiny demo end to end with its defaults (the lsst profile replayed as Rubin's packets,
the model that serves it; real Kafka, Redis, model), its report checked against the
truth, and the README's subscriber example run against the demo's trigger topic."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_run(services, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "ulens.cli", "demo", "--events", "40", "--rate", "200",
                           "--idle", "3", "--workers", "2", "--output", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (folder,) = out.glob("demo_*")
    return folder, proc.stdout


def test_report_agrees_with_the_truth(demo_run):
    folder, stdout = demo_run
    report = json.loads((folder / "report.json").read_text())
    truth = [json.loads(line) for line in (folder / "truth.jsonl").read_text().splitlines() if line]
    ev = report["events"]
    # a Rubin packet per 5-sigma detection: an event never detected sends none
    assert ev["total"] == len(truth) and 30 <= ev["total"] <= 40
    assert ev["pspl"] + ev["binary"] + ev["unlabelled"] == ev["total"]
    assert ev["pspl"] == sum(t["label"] == 0 for t in truth)
    assert any(t["onset_mjd"] is not None for t in truth)    # truth v1.1: the onsets
    assert set(report["rules"]) <= {"tdcnn", "pspl-fit"} and report["rules"]
    for r in report["rules"].values():
        assert r["unmatched_triggers"] == 0                  # every trigger joins an event
        assert r["events_with_multiple_triggers"] == 0       # at most one trigger per event and rule
        assert r["triggers"] == r["events_triggered"] == r["true_positives"] + r["false_positives"]
        assert sum(b["triggered"] for b in r["recall_by_dchi2"]) == r["true_positives"]
        assert r["onset"]["n_binary_with_onset"] == sum(t["label"] == 1 and t["onset_mjd"] is not None
                                                        for t in truth)
    assert sum(r["events_triggered"] for r in report["rules"].values()) > 0
    rule, r = next((k, v) for k, v in report["rules"].items() if v["latency_ms"]["n"])
    lat = r["latency_ms"]
    assert 0 <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    for name in ("decision_time.png", "latency_cdf.png", "recall_vs_dchi2.png"):
        assert (folder / "plots" / name).read_bytes()[:8] == PNG
    assert "purity" in stdout and "completeness" in stdout and "from the detectability onset" in stdout
    # the closing figures: the paced replay's rate, the consumer's share, the latency
    replay = json.loads((folder / "replay.json").read_text())
    assert replay["options"]["rate"] == 200 and 0 < replay["alerts_per_s"] <= 200 * 1.05
    assert replay["options"]["format"] == "rubin"
    assert f"= {replay['alerts_per_s']:,.0f} alerts/s (--rate 200)" in stdout
    line = next(x for x in stdout.splitlines() if x.startswith(f"latency alert produced -> trigger produced ({rule}"))
    assert f"p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms" in line
    assert "consumer: busy" in stdout


def test_demo_triggers_are_v2_with_coordinates_and_summary(demo_run, services):
    """What `ulens subscribe` shows a follow-up team after the demo."""
    folder, _ = demo_run
    proc = subprocess.run([sys.executable, "-m", "ulens.cli", "subscribe", "--config", str(folder / "config.yaml"),
                           "--from-beginning", "--until-idle", "3", "--json"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    n = sum(r["triggers"] for r in json.loads((folder / "report.json").read_text())["rules"].values())
    assert len(recs) == n > 0
    for r in recs:
        assert r["schemaId"] == 4 and r["ra"] is not None and r["dec"] is not None
        assert r["band"] in tuple("ugrizy") and r["mag"] is not None and 1 <= r["nBands"] <= 6
        assert r["summary"].startswith(f"binary candidate {r['diaObjectId']} at RA ")
    assert sum(r["t0"] is not None for r in recs) >= 0.9 * n                     # fits rarely fail


def test_readme_subscriber_example_runs(demo_run, services):
    folder, _ = demo_run
    example = (REPO / "examples" / "subscribe_triggers.py").read_text()
    assert example in (REPO / "README.md").read_text(), "README's Python example differs from the file"
    conf = yaml.safe_load((folder / "config.yaml").read_text())
    n = sum(r["triggers"] for r in json.loads((folder / "report.json").read_text())["rules"].values())
    env = {**os.environ, "ULENS_KAFKA_BOOTSTRAP": services.kafka.bootstrap_servers,
           "TRIGGER_TOPIC": conf["kafka"]["topics"]["triggers"], "GROUP": f"readme-{folder.name}",
           "STOP_AFTER": str(n), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "subscribe_triggers.py")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("binary candidate")]
    assert len(lines) == n
