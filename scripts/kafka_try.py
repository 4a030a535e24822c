#!/usr/bin/env python3
"""Produce to and read fraudgate's Kafka topics by hand (a dev tool, like grpcurl for gRPC).

    python3 scripts/kafka_try.py produce fraudgate.transactions acct-42 '{"transaction": {...}}'
    python3 scripts/kafka_try.py read fraudgate.decisions --last 1

Needs: pip install confluent-kafka. --bootstrap (default 127.0.0.1:9092) picks the broker.
`produce` sends one message keyed by the given key (an account id, for transactions) and
waits for the broker's acknowledgement. `read` prints the last N messages of a topic, one
per line: as is when they are JSON (fraudgate serve --kafka-format json), else as base64
protobuf; it waits up to --wait seconds for the first.
"""
import argparse
import base64
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer


def produce(args) -> int:
    producer = Producer({"bootstrap.servers": args.bootstrap, "acks": "all",
                         "enable.idempotence": True})
    failed = []
    producer.produce(args.topic, key=args.key.encode(), value=args.payload.encode(),
                     on_delivery=lambda err, _msg: err and failed.append(err))
    if producer.flush(args.wait) > 0 or failed:
        print(f"not delivered: {failed or 'timed out'}", file=sys.stderr)
        return 1
    return 0


def read(args) -> int:
    consumer = Consumer({"bootstrap.servers": args.bootstrap,
                         "group.id": f"kafka-try-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([args.topic])
    messages = []
    deadline = time.monotonic() + args.wait
    quiet_since = None
    while time.monotonic() < deadline:
        m = consumer.poll(0.2)
        if m is None or m.error():
            # Read to the end: a second without news after the first message.
            if messages and quiet_since and time.monotonic() - quiet_since > 1.0:
                break
            quiet_since = quiet_since or time.monotonic()
            continue
        quiet_since = time.monotonic()
        messages.append(m.value())
    consumer.close()
    if not messages:
        print(f"no message on {args.topic} within {args.wait} s", file=sys.stderr)
        return 1
    for value in messages[-args.last:]:
        text = value.decode("utf-8", "replace") if value and value.lstrip()[:1] == b"{" else None
        print(text if text is not None else base64.b64encode(value or b"").decode())
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", default="127.0.0.1:9092")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("produce", help="produce one message")
    pr.add_argument("topic")
    pr.add_argument("key")
    pr.add_argument("payload", help="the message (JSON, as the proto3 JSON mapping)")
    pr.add_argument("--wait", type=float, default=30.0)
    rd = sub.add_parser("read", help="print the last messages of a topic")
    rd.add_argument("topic")
    rd.add_argument("--last", type=int, default=1)
    rd.add_argument("--wait", type=float, default=30.0)
    args = p.parse_args()
    return produce(args) if args.command == "produce" else read(args)


if __name__ == "__main__":
    sys.exit(main())
