"""The follow-up view end to end, in a real browser: a short replay into the broker with
the shipped model, `ulens dashboard` beside it, and Debian's headless Chromium loading its
pages while the broker runs and after it has stopped; `ulens events plot` of a live event.

The run folder (``tmp_path/run``: config, dataset, PNGs and screenshots) is printed on
failure. Chromium missing: skipped, with the package to install, except in CI (env CI),
where scripts/setup.sh installs it, so there the test fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import unique

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
ULENS = [sys.executable, "-m", "ulens.cli"]
STEP_TIMEOUT_S = 120


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        why = "headless Chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(why + "; CI installs it in scripts/setup.sh")
        pytest.skip(why)
    return exe


def browse(exe: str, url: str, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran (``--virtual-time-budget``: Chromium waits for
    the page's fetches and timers within that much page time); a screenshot when asked."""
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--virtual-time-budget=4000", "--window-size=1300,1100"]
    if screenshot is not None:
        proc = subprocess.run(base + [f"--screenshot={screenshot}", url], capture_output=True, text=True,
                              timeout=STEP_TIMEOUT_S)
        assert proc.returncode == 0 and screenshot.read_bytes()[:8] == PNG, proc.stderr[-2000:]
    proc = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def wait_for(what: str, check, timeout_s: float = STEP_TIMEOUT_S, every_s: float = 0.25):
    """``check()``'s first truthy value, asked every ``every_s``; fails naming ``what``."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        v = check()
        if v:
            return v
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Logged:
    """A `ulens` process whose output lines are kept (and watched for a pattern)."""

    def __init__(self, argv: list[str], stdout_to=None):
        self.proc = subprocess.Popen(ULENS + argv, cwd=REPO, text=True, bufsize=1,
                                     stdout=stdout_to or subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(s,), daemon=True)
                         for s in (self.proc.stdout, self.proc.stderr) if s is not None]
        for t in self._threads:
            t.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def find(self, pattern: str):
        for line in list(self.lines):
            m = re.search(pattern, line)
            if m:
                return m
        return None

    def text(self) -> str:
        return "".join(self.lines)[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def test_dashboard_in_a_browser_with_the_broker_running_and_stopped(services, tmp_path):
    exe = chromium()
    run = tmp_path / "run"
    run.mkdir()
    tag = unique("view")
    conf = run / "config.yaml"
    conf.write_text(f"kafka:\n  topics:\n    alerts: {tag}.alerts\n    triggers: {tag}.triggers\n"
                    f"    dead_letter: {tag}.dlq\n    truth: {tag}.truth\n  partitions:\n    alerts: 1\n"
                    f"redis:\n  key_prefix: {tag}\nconsumer:\n  group: {tag}\n  rule: both\n")   # both panels
    c = ["--config", str(conf)]
    data = run / "events.npz"
    subprocess.run(ULENS + ["simulate", *c, "--n-pspl", "2", "--n-binary", "4", "--seed", "20261127",
                            "--workers", "1", "--quiet", "--output", str(data)],
                   cwd=REPO, check=True, timeout=STEP_TIMEOUT_S, capture_output=True)
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(services.kafka.client_config())
    for f in admin.create_topics([NewTopic(f"{tag}.alerts", 1, 1)]).values():
        f.result(30)          # made now, so the broker joins before the replay starts
    broker = Logged(["consume", *c, "--until-idle", "6"])
    # a refresh slower than a page load: each page is drawn once within the browser's budget
    dash = Logged(["dashboard", *c, "--port", "0", "--refresh", "30"])
    try:
        url = wait_for("the dashboard's address", lambda: dash.find(r"dashboard: (http://\S+)")
                       or (dash.proc.poll() is not None and pytest.fail(dash.text())))[1]
        wait_for("the broker's partitions", lambda: broker.find(r" assigned \d+ partition\(s\) of ")
                 or (broker.proc.poll() is not None and pytest.fail(broker.text())))
        subprocess.run(ULENS + ["replay", *c, "--data", str(data), "--rate", "4000", "--speed", "max",
                                "--truth-out", str(run / "truth.jsonl")],
                       cwd=REPO, check=True, timeout=STEP_TIMEOUT_S, capture_output=True)
        first = wait_for("a trigger on the dashboard's feed",
                         lambda: get_json(url + "api/triggers")["triggers"])[-1]
        oid = first["diaObjectId"]
        assert broker.proc.poll() is None, "the broker stopped before the page was looked at while it runs"
        # the broker running: the list shows the trigger, read from the topic
        dom = browse(exe, url)
        assert f'data-object-id="{oid}"' in dom and f'href="event/{oid}"' in dom

        assert broker.proc.wait(STEP_TIMEOUT_S) == 0, broker.text()
        triggers = get_json(url + "api/triggers")["triggers"]
        # the broker stopped: both pages still work (triggers from the topic, points from Redis)
        dom = browse(exe, url, run / "dashboard.png")
        rows = re.findall(r'<tr class="trigger" data-object-id="(\d+)"', dom)
        assert sorted(map(int, rows)) == sorted(t["diaObjectId"] for t in triggers) and str(oid) in rows
        event = get_json(f"{url}api/event/{oid}")
        n = event["n_points"]
        assert n > 20 and event["figure"]["data"]
        dom = browse(exe, f"{url}event/{oid}", run / "event.png")
        assert f'data-points="{n}"' in dom                   # Plotly.react ran with Redis's points
        assert dom.count('class="main-svg"') >= 2            # plotly drew its SVG layers
        # markers drawn: every stored point on the light curve and its P(binary) track
        assert dom.count('class="point"') >= 2 * n, dom.count('class="point"')
        assert "trigger MJD" in dom and "threshold" in dom

        # `ulens events plot` of the live event: a PNG, and the figure behind it
        png = run / f"event_{oid}.png"
        proc = subprocess.run(ULENS + ["events", "plot", str(oid), *c, "--output", str(png)],
                              cwd=REPO, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr
        assert png.read_bytes()[:8] == PNG and "trigger at MJD" in proc.stdout
        import config as cfg
        from followup.cli_events import redis_curve
        from training.event_figure import fit_pspl, light_curve_figure

        lc = redis_curve(cfg.load(str(conf)), oid)
        assert len(lc) == n and lc.trigger is not None and lc.detected.all()   # compact alerts: detections
        fig = light_curve_figure(lc, fit_pspl(lc))
        # rule both: P(binary) and, on its right, the PSPL-fit rule's statistic
        assert [a.get_ylabel() for a in fig.axes] == ["magnitude", "data − PSPL\n[mag]", "P(binary)", "PSPL-fit D"]
    except BaseException:
        print(f"run folder {run}\n--- broker\n{broker.text()}\n--- dashboard\n{dash.text()}")
        raise
    finally:
        broker.stop()
        dash.stop()
        try:
            for f in admin.delete_topics([f"{tag}.{t}" for t in ("alerts", "triggers", "dlq")]).values():
                f.result(30)
        except Exception:
            pass
        import redis
        r = redis.Redis.from_url(services.redis.url, **services.redis.client_kwargs())
        keys = list(r.scan_iter(match=f"{tag}*", count=1000))
        if keys:
            r.delete(*keys)
