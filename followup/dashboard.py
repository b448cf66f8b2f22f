"""`ulens dashboard`: a local web page for the follow-up observer.

The index lists the triggers as they arrive on the trigger topic (a background reader
with a group of its own, followup/trigger_feed.py): where, when, how sure, the PSPL
estimate, the latency; each row opens the event's page, its light curve and P(binary)
track read from Redis (followup/lightcurve.py, drawn with followup/web_figure.py). Both
pages poll the server every ``--refresh`` seconds, so the page follows a running broker
and still works once it has stopped (the topic keeps the triggers, Redis the light curves).

Choices: Flask (BSD-3-Clause) serves it, on Werkzeug's threaded server: a local page for
a handful of users needs no more; Jinja2 escapes what the records carry. Plotly (MIT)
draws it: interactive zoom, and plotly.js comes inside the Python package, served from
here (``/static/plotly.min.js``), so nothing is built and nothing is fetched from the
internet. The page's own script only fetches and swaps in what the server made (the
table rows, the figure JSON for ``Plotly.react``); it draws nothing by hand.

It binds a loopback address only: the page has no login, and what it shows (positions of
candidate events before anyone else has them) is the team's. Use an SSH tunnel
(``ssh -L 8765:127.0.0.1:8765 host``) to look from another machine.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import signal
import socket
import sys
import threading
from collections import OrderedDict
from typing import Optional

HELP = ("serve a local web page (127.0.0.1) listing triggers as they arrive on the trigger topic, each "
        "opening the event's light curve and P(binary) track from Redis; refreshes while the broker runs")
DEFAULT_PORT = 8765
DEFAULT_REFRESH_S = 5.0
FIGURE_CACHE = 64          # events whose figure is kept (redrawn only when new points arrive)


class DashboardError(ValueError):
    """A bad option (the message names it)."""
    exit_code = 3


class DashboardUnavailable(OSError):
    """The port is taken, or Kafka / Redis do not answer (the message names which)."""
    exit_code = 4


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="loopback address to listen on (127.0.0.1, ::1, localhost); other addresses are "
                        "refused, the page has no login: use an SSH tunnel to look from elsewhere "
                        "(default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"TCP port; 0 = any free port (the address is printed) (default: {DEFAULT_PORT})")
    p.add_argument("--topic", default=None,
                   help="trigger topic to list, read from its beginning (default: kafka.topics.triggers "
                        "of the configuration)")
    p.add_argument("--refresh", type=float, default=DEFAULT_REFRESH_S, metavar="SECONDS",
                   help=f"how often the pages ask for new triggers and new points; 0 = never "
                        f"(reload by hand) (default: {DEFAULT_REFRESH_S:g})")
    p.add_argument("--max-triggers", type=int, default=10_000, metavar="N",
                   help="newest triggers kept in memory and listed (default: 10000)")


def check_host(host: str) -> str:
    """``host`` when it is a loopback address, else DashboardError naming it."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise DashboardError(f"--host {host!r} is not an IP address (use 127.0.0.1 or ::1)") from None
    if not ip.is_loopback:
        raise DashboardError(f"--host {host} is not a loopback address: the dashboard has no login, so it "
                             "listens on 127.0.0.1 or ::1 only (look from elsewhere through an SSH tunnel)")
    return host


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or DashboardUnavailable naming the address."""
    if not 0 <= port <= 65535:
        raise DashboardError(f"--port {port} is not a TCP port (0..65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # a restart need not wait out TIME_WAIT
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise DashboardUnavailable(f"cannot listen on {host}:{port}: {exc.strerror}"
                                   + (" (another dashboard? choose another --port, or 0 for any free one)"
                                      if port else "")) from None
    return sock


# ------------------------------------------------------------------------------ the app
def _utc(us: Optional[int]) -> str:
    if not us or us <= 0:
        return "-"
    return dt.datetime.fromtimestamp(us / 1e6, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def create_app(feed, redis_client, prefix: str, refresh_s: float, topic: str, pspl_params=None):
    """The Flask app: ``feed`` a started :class:`followup.trigger_feed.TriggerFeed`;
    ``pspl_params``: the PSPL-fit rule's when the broker runs it (its statistic is drawn)."""
    from flask import Flask, jsonify, render_template

    from followup import lightcurve as lcm
    from followup.web_figure import light_curve_plotly
    from training.event_figure import fit_pspl

    app = Flask(__name__, static_folder=None)     # its one static file is plotly.js, below
    app.jinja_env.filters.update(utc=_utc, fmt=_fmt)
    figures: OrderedDict = OrderedDict()        # (object id, n_total, last id) -> figure JSON
    figures_lock = threading.Lock()
    ctx = {"refresh_ms": int(refresh_s * 1000), "topic": topic, "prefix": prefix}

    def feed_view():
        triggers, state = feed.snapshot()
        return {"triggers": triggers, "feed": state}

    @app.get("/")
    def index():
        return render_template("index.html", **ctx, **feed_view())

    @app.get("/triggers")
    def triggers_fragment():
        return render_template("triggers.html", **ctx, **feed_view())

    @app.get("/api/triggers")
    def triggers_json():
        return jsonify(feed_view())

    @app.get("/event/<int:object_id>")
    def event_page(object_id: int):
        return render_template("event.html", **ctx, object_id=object_id, trigger=feed.find(object_id))

    @app.get("/api/event/<int:object_id>")
    def event_json(object_id: int):
        trigger = feed.find(object_id)
        try:
            d = lcm.event_dict(redis_client, prefix, object_id)
        except Exception as exc:      # Redis away: say so on the page, keep serving
            return jsonify({"figure": None, "facts": render_template(
                "facts.html", trigger=trigger, event=None, fit=None,
                error=f"Redis does not answer: {type(exc).__name__}: {exc}")})
        if d is None:
            return jsonify({"figure": None, "facts": render_template(
                "facts.html", trigger=trigger, event=None, fit=None,
                error=f"event {object_id} is not in Redis (prefix {prefix!r}): never seen, or expired")})
        if trigger is not None and not d["trigger"]:   # its Redis record expired: the topic's
            d["trigger"] = trigger
        key = (object_id, d["n_total"], d["last_diaSourceId"], bool(d["trigger"]))
        with figures_lock:
            hit = figures.get(key)
        if hit is None:
            lc = lcm.from_event_view(d, f"Redis {prefix!r}", pspl_params=pspl_params)
            fit = fit_pspl(lc)
            hit = (light_curve_plotly(lc, fit), fit.summary() if fit else None)
            with figures_lock:
                figures[key] = hit
                while len(figures) > FIGURE_CACHE:
                    figures.popitem(last=False)
        figure, fit_text = hit
        return jsonify({"figure": figure, "n_points": d["n_stored"], "facts": render_template(
            "facts.html", trigger=d["trigger"] or trigger, event=d, fit=fit_text, error=None)})

    @app.get("/static/plotly.min.js")
    def plotly_js():
        from plotly.offline import get_plotlyjs

        resp = app.response_class(get_plotlyjs(), mimetype="application/javascript")
        resp.cache_control.max_age = 86400
        return resp

    @app.get("/healthz")
    def healthz():
        return jsonify({"ok": True, "feed": feed.snapshot()[1]})

    @app.get("/favicon.ico")
    def favicon():          # browsers ask for one; none is no error worth logging
        return "", 204

    return app


# --------------------------------------------------------------------------------- run
def _check_services(settings, client) -> None:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from config import mask_url

    try:
        client.ping()
    except Exception as exc:
        raise DashboardUnavailable(f"Redis at {mask_url(settings.redis.url)} does not answer: {exc} "
                                   "(`ulens services up` starts the local one)") from None
    try:
        # log_level 0: the refused connections are said once, below, not logged per retry
        AdminClient({**settings.kafka.client_config(), "log_level": 0}).list_topics(timeout=10)
    except KafkaException as exc:
        raise DashboardUnavailable(f"Kafka at {settings.kafka.bootstrap_servers} does not answer: {exc} "
                                   "(`ulens services up` starts the local one)") from None


def run(args) -> int:
    from werkzeug.serving import WSGIRequestHandler, make_server

    import config
    from broker.consumer import redis_client
    from followup import lightcurve as lcm
    from followup.trigger_feed import TriggerFeed

    host = check_host(args.host)
    if args.refresh < 0:
        raise DashboardError(f"--refresh {args.refresh:g}: must be >= 0 seconds")
    if args.max_triggers < 1:
        raise DashboardError(f"--max-triggers {args.max_triggers}: must be at least 1")
    settings = config.load(args.config)
    topic = args.topic or settings.kafka.topics.triggers
    client = redis_client(settings)
    _check_services(settings, client)
    sock = bind(host, args.port)
    port = sock.getsockname()[1]
    feed = TriggerFeed(settings.kafka.client_config(), topic, args.max_triggers).start()
    app = create_app(feed, client, settings.redis.key_prefix, args.refresh, topic,
                     lcm.pspl_params_for(settings))

    class Handler(WSGIRequestHandler):
        def log_request(self, code="-", size="-"):    # the pages poll: log only failures
            if str(code)[:1] in ("4", "5"):
                super().log_request(code, size)

    server = make_server(host, port, app, threaded=True, request_handler=Handler, fd=sock.fileno())
    sock.close()                 # the server holds its own copy of the socket
    shown = f"[{host}]" if ":" in host else host
    print(f"dashboard: http://{shown}:{port}/  (triggers from topic {topic!r}, light curves from Redis "
          f"prefix {settings.redis.key_prefix!r}); Ctrl-C stops it", flush=True)
    # SIGTERM (a service manager, a test) stops it like Ctrl-C: the feed's consumer is closed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    finally:
        server.server_close()
        feed.stop()
        print("dashboard: stopped", file=sys.stderr)
    return 0
