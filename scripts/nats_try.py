#!/usr/bin/env python3
"""Publish to and read fraudgate's NATS subjects by hand (a dev tool, like grpcurl for gRPC).

    python3 scripts/nats_try.py publish fraudgate.transactions '{"transaction": {...}}'
    python3 scripts/nats_try.py read FRAUDGATE_DECISIONS --last 1

Needs: pip install nats-py. --server (default nats://127.0.0.1:4222) picks the NATS server.
`read` prints the last N messages of a stream, one per line: as is when they are JSON
(fraudgate serve --nats-format json), else as base64 protobuf.
"""
import argparse
import asyncio
import base64
import sys

import nats


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default="nats://127.0.0.1:4222")
    sub = p.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="publish one message to a JetStream subject")
    pub.add_argument("subject")
    pub.add_argument("payload", help="the message (JSON, as the proto3 JSON mapping)")
    pub.add_argument("--wait", type=float, default=30.0,
                     help="seconds to wait for fraudgate to have created the subject's stream")
    read = sub.add_parser("read", help="print the last messages of a stream")
    read.add_argument("stream")
    read.add_argument("--last", type=int, default=1)
    read.add_argument("--wait", type=float, default=10.0,
                      help="seconds to wait for the stream to hold a message")
    args = p.parse_args()

    nc = await nats.connect(args.server)
    js = nc.jetstream()
    try:
        if args.command == "publish":
            # fraudgate creates its streams once it has connected; a publish before that
            # would have no stream to land in.
            deadline = asyncio.get_running_loop().time() + args.wait
            while True:
                try:
                    await js.find_stream_name_by_subject(args.subject)
                    break
                except nats.js.errors.NotFoundError:
                    if asyncio.get_running_loop().time() > deadline:
                        print(f"no stream takes {args.subject}: is fraudgate running with --nats?",
                              file=sys.stderr)
                        return 1
                    await asyncio.sleep(0.2)
            ack = await js.publish(args.subject, args.payload.encode())
            print(f"published to {ack.stream}, sequence {ack.seq}", file=sys.stderr)
            return 0
        deadline = asyncio.get_running_loop().time() + args.wait
        while True:
            try:
                last = (await js.stream_info(args.stream)).state.last_seq
            except nats.js.errors.NotFoundError:
                last = 0
            if last > 0 or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        if last == 0:
            print(f"{args.stream} holds no message", file=sys.stderr)
            return 1
        for seq in range(max(1, last - args.last + 1), last + 1):
            data = (await js.get_msg(args.stream, seq)).data
            text = data.decode() if data.lstrip().startswith(b"{") else base64.b64encode(data).decode()
            print(text)
        return 0
    finally:
        await nc.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
