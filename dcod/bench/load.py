"""The load: spawned processes, each a trio loop of ``dcod.client.Session`` s that drive requests on a
common schedule and count every reply; and the parent's side of them (start, messages, stop)."""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from dcod import log
from dcod.bench.target import BenchError, Target
from dcod.client import ClientError, DcoError, Session
from dcod.supervisor.process import describe_exit

TAG_SIZE = 22  # b"%010d %010d " % (audsid, request number): how a reply is matched to its request
REPLY_GRACE = 5.0  # seconds after the end for outstanding replies; those still missing are lost
PUBLISH_INTERVAL = 0.05  # seconds between a load process's updates of its shared counters


@dataclass(frozen=True)
class LoadPlan:
    """What one load process does: its sessions and their requests."""

    index: int
    hub: str
    proxy: int
    audsids: tuple[int, ...]
    depth: int
    size: int
    oneway: bool
    alert_file: Path
    max_pdu: int


@dataclass(frozen=True)
class Schedule:
    """When to measure and when to stop, as time.monotonic() instants shared by all processes."""

    measure_at: float
    end_at: float | None  # --duration
    quota: int | None  # --count: requests this process completes in the window, then it stops


class Tally:
    """What one load process counts: every request, and the ones completed in the window."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.sent = self.completed = self.lost = self.errors = self.mismatched = self.outstanding = 0
        self.measured = 0
        self.latencies = array("d")  # ms, of the requests measured
        self.sent_at = array("d")  # their time.monotonic() when sent: who was sent during a reload, after a kill
        self.window_closed_at = schedule.end_at
        self.stopping = trio.Event()

    def done(self, sent_at: float, latency: bool) -> None:
        """A request completed correctly now; in the window, it is measured."""
        now = time.monotonic()
        self.completed += 1
        if now < self.schedule.measure_at or self.window_closed_at is not None and now >= self.window_closed_at:
            return
        self.measured += 1
        if latency:
            self.latencies.append((now - sent_at) * 1000)
            self.sent_at.append(sent_at)
        if self.measured == self.schedule.quota:
            self.window_closed_at = now
            self.stopping.set()

    def result(self) -> dict:
        return {
            "sent": self.sent,
            "lost": self.lost + self.outstanding,
            "errors": self.errors,
            "mismatched": self.mismatched,
            "measured": self.measured,
            "latencies": self.latencies,
            "sent_at": self.sent_at,
            "window_closed_at": self.window_closed_at,
        }


def request_tag(audsid: int, number: int) -> bytes:
    """The start of a request's body, unique to it; padding makes up the rest."""
    return b"%010d %010d " % (audsid, number)


def _echoes(reply: bytes, tag: bytes, padding: bytes) -> bool:
    """Whether ``reply`` is tag + padding, without building that (a body may be megabytes)."""
    return len(reply) == len(tag) + len(padding) and reply.startswith(tag) and reply.endswith(padding)


async def _round_trips(session: Session, plan: LoadPlan, tally: Tally) -> None:
    """One Oracle session as PL/SQL drives it: a single thread of control keeping ``depth``
    requests outstanding with the dco package's calls.

    New requests are queued (``buffered``) and sent together by one flush; then the session
    waits for its oldest reply and takes every later one that has arrived meanwhile, in
    order, before it queues as many new requests. Tag and padding are written apart: the
    session joins them, the only copy of a big body here.
    """
    padding = b"x" * (plan.size - TAG_SIZE)
    numbers = itertools.count(1)
    window: collections.deque[tuple[int, bytes, float]] = collections.deque()  # rseq, tag, sent at
    while window or not tally.stopping.is_set():
        while len(window) < plan.depth and not tally.stopping.is_set():
            tag = request_tag(session.audsid, next(numbers))
            session.write(tag)
            session.write(padding)
            window.append((await session.send_request(plan.proxy, buffered=True), tag, time.monotonic()))
            tally.sent += 1
            tally.outstanding += 1
        with contextlib.suppress(ClientError):  # no hub reachable: each read_response says so
            await session.flush()
        await _read_reply(session, *window.popleft(), padding, tally)
        while window and session.has_reply(window[0][0]):
            await _read_reply(session, *window.popleft(), padding, tally)


async def _read_reply(session: Session, rseq: int, tag: bytes, sent_at: float, padding: bytes, tally: Tally) -> None:
    try:
        reply = await session.read_response(rseq)
    except DcoError:
        tally.errors += 1
    except ClientError:
        tally.lost += 1  # the hub went away, or none could be reached
    else:
        if _echoes(reply, tag, padding):
            tally.done(sent_at, latency=True)
        else:
            tally.mismatched += 1
    tally.outstanding -= 1  # not reached when cancelled at the end of the grace: then it is lost


async def _one_way(session: Session, numbers: Iterator[int], plan: LoadPlan, tally: Tally) -> None:
    """Send one-way requests as fast as the connection takes them (send_request waits for the flush)."""
    padding = b"x" * (plan.size - TAG_SIZE)
    while not tally.stopping.is_set():
        session.write(request_tag(session.audsid, next(numbers)))
        session.write(padding)
        tally.sent += 1
        sent_at = time.monotonic()
        try:
            await session.send_request(plan.proxy, oneway=True)
        except ClientError:
            tally.lost += 1
        else:
            tally.done(sent_at, latency=False)


async def _publish(tally: Tally, counters, index: int) -> None:
    """Copy the counts to shared memory, where the parent shows progress and sees a --count run end;
    a last time as soon as the window closes."""
    while True:
        counters[2 * index] = tally.completed
        counters[2 * index + 1] = tally.measured
        if tally.stopping.is_set():
            return
        with trio.move_on_after(PUBLISH_INTERVAL):
            await tally.stopping.wait()


async def run_load(plan: LoadPlan, pipe: multiprocessing.connection.Connection, counters) -> None:
    """Connect the sessions, say "ready", get the schedule, load the hub, send back the tally."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            sessions = [
                await stack.enter_async_context(
                    Session(
                        plan.hub, audsid=audsid, serial=os.getpid(), alert_file=plan.alert_file, max_pdu=plan.max_pdu
                    )
                )
                for audsid in plan.audsids
            ]
        except ClientError as e:
            pipe.send(("failed", str(e)))
            return
        pipe.send(("ready", None))
        try:
            schedule = await trio.to_thread.run_sync(pipe.recv)
        except EOFError:
            return  # the parent gave up (another load process failed)
        tally = Tally(schedule)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_publish, tally, counters, plan.index)
            async with trio.open_nursery() as loops:
                for session in sessions:
                    if plan.oneway:
                        numbers = itertools.count(1)
                        for _ in range(plan.depth):
                            loops.start_soon(_one_way, session, numbers, plan, tally)
                    else:
                        loops.start_soon(_round_trips, session, plan, tally)
                if schedule.end_at is None:
                    await tally.stopping.wait()
                else:
                    with trio.move_on_after(max(0.0, schedule.end_at - time.monotonic())):
                        await tally.stopping.wait()
                    tally.stopping.set()
                loops.cancel_scope.deadline = trio.current_time() + REPLY_GRACE
    pipe.send(("result", tally.result()))


def _load_main(plan: LoadPlan, pipe: multiprocessing.connection.Connection, counters) -> None:
    """A load process's entry point (spawned: it must be importable)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops us
    log.setup(f"bench load {plan.index}", logging.WARNING)
    trio.run(run_load, plan, pipe, counters)
    with contextlib.suppress(EOFError):
        pipe.recv()  # stay alive (measurable) until the parent has sampled CPU times and closes the pipe


@dataclass
class LoadProcess:
    """A spawned load process, and the parent's end of its pipe."""

    plan: LoadPlan
    process: multiprocessing.process.BaseProcess
    pipe: multiprocessing.connection.Connection

    def receive(self, expected: str, timeout: float):
        """The next message's payload, which must be ``expected``; BenchError if the process fails."""
        ready = multiprocessing.connection.wait([self.pipe, self.process.sentinel], timeout)
        if self.pipe in ready:
            with contextlib.suppress(EOFError):
                kind, payload = self.pipe.recv()
                if kind != expected:
                    raise BenchError(f"load process {self.plan.index}: {payload}")
                return payload
        if not ready:
            raise BenchError(f"load process {self.plan.index}: no {expected} message within {timeout:g} s")
        raise self.exited()

    def exited(self) -> BenchError:
        """What to raise when the process has exited before its time."""
        return BenchError(f"load process {self.plan.index} {describe_exit(self.process.exitcode)}")


def shares(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def random_audsids(count: int) -> Iterator[int]:
    """Random audsids far from small numbers: on a production hub they must not collide with real sessions."""
    return iter(range(random.randrange(1 << 31, (1 << 32) - count), 1 << 32))


def start_loads(target: Target, args: argparse.Namespace, counters, audsids: Iterator[int]) -> list[LoadProcess]:
    context = multiprocessing.get_context("spawn")
    loads = []
    for index, sessions in enumerate(shares(args.sessions, args.processes)):
        plan = LoadPlan(
            index,
            target.address,
            args.proxy,
            tuple(itertools.islice(audsids, sessions)),
            args.depth,
            args.size,
            args.oneway,
            target.config.alert_file,
            target.config.hub.max_pdu,
        )
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_load_main, args=(plan, theirs, counters), name=f"dcod bench load {index}", daemon=True
        )
        process.start()
        theirs.close()
        loads.append(LoadProcess(plan, process, ours))
    return loads


def stop_loads(loads: list[LoadProcess]) -> None:
    for load in loads:
        load.pipe.close()  # a load process that is done exits
    for load in loads:
        load.process.join(1.0)
        if load.process.is_alive():
            load.process.terminate()
