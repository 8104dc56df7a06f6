#!/usr/bin/env python3
"""What one write costs when it wakes the peer: the floor under every hop of a round trip.

    .venv/bin/python bench/wakeup.py                 # TCP on loopback and a Unix socket pair
    .venv/bin/python bench/wakeup.py --count 50000

Two processes play ping-pong with 112-byte messages (a 100-byte request and its header),
each waiting in epoll between messages, as the hub and its peers do when they are not busy.
It prints the time one sendmsg() takes in the writer, which includes the kernel's delivery to
the reader and the wake-up of a reader that sleeps, and the writer's CPU time per exchange:
first with the two processes free to run on different cores, then both on one core.

On a virtual machine, waking a process on another core costs an interrupt between cores
that the hypervisor must deliver; that cost is paid inside the writer's sendmsg(). Every
round trip through the hub costs at least four such hops (session to hub, hub to worker, and
back), so this is what no change to the hub's own code can remove.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
import time

MESSAGE = b"x" * 112


def pair(family: str) -> tuple[socket.socket, socket.socket]:
    if family == "unix":
        return socket.socketpair()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    for sock in (near, far):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return near, far


def wait_and_read(sock: socket.socket, epoll: select.epoll) -> bytes:
    epoll.poll()
    return sock.recv(4096)


def ping_pong(family: str, count: int, cpu: int | None) -> str:
    near, far = pair(family)
    child = os.fork()
    if child == 0:
        near.close()
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        epoll = select.epoll()
        epoll.register(far.fileno(), select.EPOLLIN)
        for _ in range(count):
            far.sendmsg([wait_and_read(far, epoll)])
        os._exit(0)
    far.close()
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    epoll = select.epoll()
    epoll.register(near.fileno(), select.EPOLLIN)
    in_sendmsg = 0.0
    before = os.times()
    for _ in range(count):
        started = time.perf_counter()
        near.sendmsg([MESSAGE])
        in_sendmsg += time.perf_counter() - started
        wait_and_read(near, epoll)
    after = os.times()
    os.waitpid(child, 0)
    near.close()
    cpu_time = (after.user - before.user) + (after.system - before.system)
    where = "one core" if cpu is not None else "any core"
    return (
        f"{family:4s} {where:8s}  sendmsg {in_sendmsg / count * 1e6:6.1f} µs   "
        f"writer CPU {cpu_time / count * 1e6:6.1f} µs per exchange"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="exchanges per run (default 20000)")
    args = parser.parse_args(argv)
    first_cpu = min(os.sched_getaffinity(0))
    for family in ("tcp", "unix"):
        for cpu in (None, first_cpu):
            print(ping_pong(family, args.count, cpu), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
