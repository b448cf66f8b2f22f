"""Follow-up team's trigger subscriber: print each binary-lens trigger as it arrives.

Needs confluent-kafka and this project's `schemas` package (pip install the project).
Settings from the environment: ULENS_KAFKA_BOOTSTRAP (default 127.0.0.1:9092),
TRIGGER_TOPIC (default triggers), GROUP (default my-follow-up-team); STOP_AFTER=N
stops after N triggers (0 = run until Ctrl-C). Reads trigger schema v1 and v2 (the
schema id in each message says which): v1 triggers have no coordinates, PSPL estimate
or summary line.
"""
import os

from confluent_kafka import Consumer

from schemas import default_codec

codec = default_codec()
consumer = Consumer({
    "bootstrap.servers": os.environ.get("ULENS_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
    "group.id": os.environ.get("GROUP", "my-follow-up-team"),
    "auto.offset.reset": "earliest",          # a new team starts from the first trigger
})
consumer.subscribe([os.environ.get("TRIGGER_TOPIC", "triggers")])
stop_after, seen, ids = int(os.environ.get("STOP_AFTER", "0")), 0, set()
try:
    while not stop_after or seen < stop_after:
        msg = consumer.poll(1.0)
        if msg is None:
            continue
        if msg.error():
            raise SystemExit(f"Kafka error: {msg.error()}")
        t = codec.decode_kind(msg.value(), "trigger")    # v1 or v2, by the schema id
        if t["triggerId"] in ids:             # rare re-delivery after a broker crash
            continue
        ids.add(t["triggerId"])
        seen += 1
        latency_ms = (t["triggerProducedUs"] - t["alertProducedUs"]) / 1000
        if t.get("summary"):                  # v2: position, band/mag, PSPL estimate, all in one line
            print(f"{t['summary']} ({latency_ms:.0f} ms after the alert)", flush=True)
            if t.get("t0") is not None:       # the estimate as numbers, e.g. to plan observations
                print(f"  RA {t['ra']} Dec {t['dec']}  t0 {t['t0']:.2f}  u0 {t['u0']:.3f}  "
                      f"tE {t['tE']:.1f} d", flush=True)
        else:                                 # v1: the decision only
            print(f"binary candidate {t['diaObjectId']}: P={t['probability']:.3f} at MJD "
                  f"{t['midpointMjdTai']:.4f} after {t['nPoints']} points ({latency_ms:.0f} ms after the alert)",
                  flush=True)
finally:
    consumer.close()
