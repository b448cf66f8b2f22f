"""`ulens events`: read the broker's Redis state of an event."""
from __future__ import annotations

import argparse
import json

HELP = "inspect events in Redis: `show ID` (points, probabilities, trigger state), `list`"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="an event's points, probabilities and trigger state")
    show.add_argument("object_id", type=int, metavar="ID", help="diaObjectId")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.add_argument("--last", type=int, metavar="N", default=None, help="print only the newest N points")
    lst = sub.add_parser("list", help="ids of live events (SCAN)")
    lst.add_argument("--limit", type=int, metavar="N", default=100, help="print at most N ids")


def format_event(d: dict) -> str:
    refs = " ".join(f"{b} {m:.4f}" for b, m in d["reference_mag"].items()) or "-"
    counts = " ".join(f"{b} {n}" for b, n in d["points_per_band"].items()) or "-"
    lines = [f"event {d['diaObjectId']}: {d['n_total']} points ({d['n_stored']} stored, "
             f"{d['n_dropped']} dropped, {d['n_scored']} scored), expires in {d['ttl_s']} s",
             f"points per band: {counts}; reference mag per band: {refs}"]
    ring = " ".join(f"{p:.4f}" for p in d["last_probabilities"]) or "-"
    score = "-" if d["score"] is None else f"{d['score']:.4f}"
    lines.append(f"decision: last P(binary) [{ring}], smoothed {score}, triggered "
                 f"{'yes (' + str(d['trigger_status']) + ')' if d['triggered'] else 'no'}")
    t = d["trigger"]
    if t:
        lines.append(f"trigger {t['triggerId']}: point {t['nPoints']} (diaSourceId {t['diaSourceId']}, "
                     f"MJD {t['midpointMjdTai']:.5f}), P {t['probability']:.4f} >= {t['threshold']:.4f}, "
                     f"model {t['modelVersion']}")
        if t.get("summary"):     # schema v2 (an outbox written before v2 has none)
            lines.append(f"  {t['summary']}")
    lines.append(f"{'index':>7} {'diaSourceId':>20} {'MJD':>14} {'band':>4} {'mag':>9} {'mag_err':>8} "
                 f"{'P(binary)':>10}")
    for p in d["points"]:
        pb = "-" if p["p_binary"] is None else f"{p['p_binary']:.3f}"
        lines.append(f"{p['index']:>7} {p['diaSourceId']:>20} {p['midpointMjdTai']:>14.5f} "
                     f"{p['band'] or '?':>4} {p['mag']:>9.4f} {p['mag_err']:>8.4f} {pb:>10}")
    return "\n".join(lines)


def run(args) -> int:
    import config
    from broker.consumer import redis_client
    from broker.errors import BrokerError
    from broker.state import read_event, scan_events

    settings = config.load(args.config)
    client = redis_client(settings)
    prefix = settings.redis.key_prefix
    if args.action == "list":
        for oid in scan_events(client, prefix, args.limit):
            print(oid)
        return 0
    view = read_event(client, prefix, args.object_id)
    if view is None:
        raise BrokerError(f"no event {args.object_id} in Redis (prefix {prefix!r}): never seen, or expired")
    d = view.to_dict()
    if args.last is not None:
        d["points"] = d["points"][-args.last:] if args.last > 0 else []
    print(json.dumps(d, indent=2) if args.json else format_event(d))
    return 0
