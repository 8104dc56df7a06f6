#!/usr/bin/env python3
"""The hub's own cost per round trip, without the rest of the machine: the hub's Router and a
Reactor driven one batch at a time over socket pairs, in one process.

    .venv/bin/python bench/hotpath.py                   # µs of hub time per round trip
    .venv/bin/python bench/hotpath.py --instructions    # instructions per round trip (valgrind)

`dcod bench` measures the hub as it runs, sharing two cores with its workers and the load
generator, so its figures move with whatever else the machine does (they have moved by a
factor of two from one day to the next). This measures only the hub's steps: SESSIONS sessions
each send DEPTH requests in one write; the reactor serves one batch (read, frame, route, write
to the workers); an echo peer returns every byte; the reactor serves the replies; the sessions
read them. The reactor's handlers frame what they read and hand the PDUs to the router, as
the hub's do (without the hub's backpressure and stall checks, a few comparisons per read).
The time inside the reactor's batches is printed per round trip; the caches are warm, so it
is a floor under what `dcod bench` shows. --instructions counts instructions instead, with
valgrind, which do not depend on the machine's load at all: two runs of different lengths,
the difference divided by the difference in round trips, so that start-up does not count.
They include the sessions' and the echo peer's few socket calls.

Exit status 1 if a reply is missing.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from dcod import protocol
from dcod.config import HubConfig, ProxyConfig
from dcod.hub.routing import Instance, Proxy, Router, Session
from dcod.hub.spool import Spool
from dcod.net.connection import Connection
from dcod.net.reactor import Reactor

# Every write of a round is made before the hub reads, and the echo peer writes back a whole
# round at once: it must fit in a socket pair's buffers (about 200 KiB each way).
ROUND_LIMIT = 128 * 1024
HUB = HubConfig()  # the hub's default tuning


def make_router(tmp: Path, instances: int) -> Router:
    """A router configured as `dcod bench` configures its hub: proxy 1, echo workers, a spool in ``tmp``."""
    config = ProxyConfig(id=1, name="echo", handler="echo", instances=instances)
    spool = Spool(
        tmp / "proxy-1.spool", memory_limit=HUB.queue_memory, size_limit=HUB.spool_max, max_record=HUB.max_pdu
    )
    proxy = Proxy(config, [f"echo {i}" for i in range(instances)], spool)
    return Router([proxy], reply_timeout=HUB.reply_timeout, max_inflight=HUB.max_inflight_per_session)


def describe(args: argparse.Namespace) -> str:
    return f"{args.sessions} sessions x {args.depth}, {args.size}-byte bodies, {args.instances} instances"


def on_session_data(router: Router, session: Session, framer: protocol.Framer, data: memoryview) -> None:
    pdus = framer.feed(data)
    if not session.registered and framer.preamble:
        router.register(session, framer.preamble)
    if pdus:
        router.requests(session, pdus)


def on_instance_data(router: Router, instance: Instance, framer: protocol.Framer, data: memoryview) -> None:
    for pdu in framer.feed(data):
        router.reply(instance, pdu)


def connect_workers(router: Router, reactor: Reactor) -> list[socket.socket]:
    """Each instance of proxy 1 up on one end of a socket pair; returns the workers' ends."""
    far_ends = []
    for instance in router.proxies[1].instances:
        near, far = socket.socketpair()
        far.setblocking(False)
        conn = Connection(near, instance.name)
        router.connected(instance, conn)
        framer = protocol.Framer(HUB.max_pdu, accept_noradle_quit=True)
        reactor.add(conn, functools.partial(on_instance_data, router, instance, framer), lambda reason: None)
        far_ends.append(far)
    return far_ends


def connect_sessions(router: Router, reactor: Reactor, count: int) -> list[socket.socket]:
    """``count`` sessions, their handshakes sent; returns the Oracle ends."""
    oracle_ends = []
    for audsid in range(1, count + 1):
        near, far = socket.socketpair()
        session = Session(Connection(near, f"session {audsid}"), f"session {audsid}")
        framer = protocol.Framer(HUB.max_pdu, preamble=protocol.ORACLE_HANDSHAKE.size, magic=protocol.ORACLE_MAGIC)
        reactor.add(session.conn, functools.partial(on_session_data, router, session, framer), lambda reason: None)
        far.sendall(protocol.oracle_handshake(audsid, 1, audsid))
        oracle_ends.append(far)
    return oracle_ends


def echo(far_ends: list[socket.socket]) -> None:
    """A worker's reply has the request's routed header: echoing the bytes answers every request."""
    for far in far_ends:
        try:
            while True:
                far.sendall(far.recv(1 << 20))
        except BlockingIOError:
            pass


async def measure(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        router = make_router(Path(tmp), args.instances)
        reactor = Reactor()
        workers = connect_workers(router, reactor)
        sessions = connect_sessions(router, reactor, args.sessions)
        buffer = memoryview(reactor._shared.recv_buffer)

        def serve() -> float:
            started = time.perf_counter()
            reactor._serve(reactor._epoll.poll(0), buffer)
            return time.perf_counter() - started

        # The same rseq every round: each round's replies are all in before the next.
        writes = b"".join(protocol.request(1, rseq, b"x" * args.size) for rseq in range(1, args.depth + 1))
        replies = (protocol.HEADER_SIZE + args.size) * args.depth
        spent = 0.0
        for _ in range(args.rounds):
            for oracle in sessions:
                oracle.sendall(writes)
            spent += serve()
            echo(workers)
            spent += serve()
            router.expire(time.monotonic())  # as the hub's sweep does every 50 ms: answered requests let go
            for oracle in sessions:
                received = 0
                while received < replies:
                    received += len(oracle.recv(1 << 20))
    round_trips = args.rounds * args.sessions * args.depth
    answered = router.proxies[1].counters.replies
    print(f"{round_trips} round trips ({describe(args)}): {spent / round_trips * 1e6:.2f} µs of hub time each")
    if answered != round_trips:
        print(f"hotpath: only {answered} of {round_trips} replies", file=sys.stderr)
        return 1
    return 0


def count_instructions(args: argparse.Namespace) -> int:
    """Run ourselves under callgrind for --rounds and 3 x --rounds; print instructions per round trip."""
    totals = []
    for rounds in (args.rounds, 3 * args.rounds):
        argv = [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            f"--sessions={args.sessions}",
            f"--depth={args.depth}",
            f"--size={args.size}",
            f"--instances={args.instances}",
            f"--rounds={rounds}",
        ]
        print(f"hotpath: {rounds} rounds under callgrind...", file=sys.stderr, flush=True)
        # The same hash seed in both runs, so that dicts and sets behave the same.
        run = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        found = re.search(r"Collected : (\d+)", run.stderr)
        if run.returncode != 0 or found is None:
            print(f"hotpath: valgrind failed:\n{run.stderr[-2000:]}", file=sys.stderr)
            return 1
        totals.append(int(found.group(1)))
    round_trips = 2 * args.rounds * args.sessions * args.depth
    print(f"{(totals[1] - totals[0]) / round_trips:,.0f} instructions per round trip ({describe(args)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=16, help="sessions (default 16)")
    parser.add_argument("--depth", type=int, default=4, help="requests per session per round (default 4)")
    parser.add_argument("--size", type=int, default=100, help="request body size (default 100)")
    parser.add_argument("--instances", type=int, default=2, help="echo instances (default 2)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3000; 200 with --instructions)")
    parser.add_argument("--instructions", action="store_true", help="count instructions with valgrind instead")
    args = parser.parse_args(argv)
    if (protocol.HEADER_SIZE + args.size) * args.depth * args.sessions > ROUND_LIMIT:
        parser.error(f"a round must fit in the socket buffers: sessions x depth x (12 + size) at most {ROUND_LIMIT}")
    if args.rounds is None:
        args.rounds = 200 if args.instructions else 3000
    if args.instructions:
        return count_instructions(args)
    return trio.run(measure, args)


if __name__ == "__main__":
    sys.exit(main())
