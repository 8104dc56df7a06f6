"""What the bench does to its private `dcod run` besides loading it: idle sessions weighed in hub RSS, and
disruptions at an instant of the window (`dcod reload`, the hub's SIGKILL and its quit alert)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dcod import protocol
from dcod.bench.accounting import Measured, hub_stats, the_hub
from dcod.bench.target import START_TIMEOUT, BenchError, Target
from dcod.config import Config
from dcod.net.connection import parse_address
from dcod.supervisor.alert import read_counter

DISRUPTION_TIMEOUT = 300.0  # seconds after the window for a disruption (`dcod reload`) to be done
ALERT_TIMEOUT = 10.0  # seconds after the hub's SIGKILL for the quit alert


@contextlib.contextmanager
def idle_sessions(address: str, audsids: Iterator[int], count: int) -> Iterator[None]:
    """``count`` sessions that connect and send their handshake, then nothing, until the end of the block."""
    family, addr = parse_address(address)
    sockets = []
    try:
        for audsid in itertools.islice(audsids, count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.connect(addr)
            sock.sendall(protocol.oracle_handshake(os.getpid(), 0, audsid))
        yield
    finally:
        for sock in sockets:
            sock.close()


def _wait_for_sessions(config: Config, count: int) -> None:
    """Until the hub counts ``count`` sessions (it says so in its heartbeats)."""
    deadline = time.monotonic() + START_TIMEOUT
    while (seen := hub_stats(config).get("sessions", 0)) < count:
        if time.monotonic() > deadline:
            raise BenchError(f"the hub counts {seen} sessions, not {count}, after {START_TIMEOUT:g} s")
        time.sleep(0.1)


def weigh_idle_sessions(
    stack: contextlib.ExitStack,
    target: Target,
    hub: Measured,
    audsids: Iterator[int],
    count: int,
    note: Callable[[str], None],
) -> dict:
    """Connect ``count`` idle sessions, which stay until ``stack`` closes; the hub RSS they cost."""
    without = hub.current_rss()
    note(f"idle sessions: connecting {count}")
    stack.enter_context(idle_sessions(target.address, audsids, count))
    _wait_for_sessions(target.config, count)
    with_them = hub.current_rss()
    delta = with_them - without
    note(f"idle sessions: {count} cost the hub {delta / 2**20:.1f} MB of RSS")
    return {
        "count": count,
        "hub_rss_without_mb": without / 2**20,
        "hub_rss_with_mb": with_them / 2**20,
        "delta_mb": delta / 2**20,
        "kb_per_session": delta / 1024 / count,
    }


class AlertWatch:
    """The quit alert's file, watched with inotify: ``wait`` returns when it is replaced by a higher counter.

    The file is replaced by a rename in its directory, so the directory is watched (it must exist).
    """

    IN_CLOSE_WRITE, IN_MOVED_TO = 0x8, 0x80
    EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

    def __init__(self, path: Path) -> None:
        self.path = path
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if libc.inotify_add_watch(self.fd, os.fsencode(path.parent), self.IN_CLOSE_WRITE | self.IN_MOVED_TO) < 0:
            errno = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(errno, f"cannot watch {path.parent}")
        self.counter = read_counter(path)  # read once the watch is set: no alert falls in between

    def __enter__(self) -> AlertWatch:
        return self

    def __exit__(self, *exc_info) -> None:
        os.close(self.fd)

    def wait(self, timeout: float) -> tuple[float, int] | None:
        """(time.monotonic() when seen, counter) of the next alert, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.fd], [], [], left)[0]:
                return None
            seen_at = time.monotonic()
            if self.path.name in self._names(os.read(self.fd, 65536)):
                counter = read_counter(self.path)
                if counter > self.counter:
                    return seen_at, counter
        return None

    def _names(self, data: bytes) -> set[str]:
        names, offset = set(), 0
        while offset < len(data):
            _, _, _, length = self.EVENT.unpack_from(data, offset)
            offset += self.EVENT.size
            names.add(os.fsdecode(data[offset : offset + length].rstrip(b"\0")))
            offset += length
        return names


def reload_run(target: Target, note: Callable[[str], None]) -> dict:
    """Run the real `dcod reload` against the private `dcod run`, its lines as progress notes."""
    started = time.monotonic()
    reload = subprocess.Popen(
        [sys.executable, "-m", "dcod", "reload", "--config", target.config.source],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    with reload.stdout:
        for line in reload.stdout:
            output.append(line.rstrip())
            note(output[-1])
    status = reload.wait()
    ended = time.monotonic()
    note(f"`dcod reload` exited with status {status} after {ended - started:.2f} s")
    return {"started": started, "ended": ended, "exit_status": status, "output": output}


def kill_hub(target: Target, note: Callable[[str], None]) -> dict:
    """SIGKILL the hub of the private `dcod run`; when, and when the quit alert followed."""
    hub = the_hub(target.pids[0])
    with AlertWatch(target.config.alert_file) as watch:
        killed_at = time.monotonic()
        hub.send_signal(signal.SIGKILL)
        seen_at, counter = watch.wait(ALERT_TIMEOUT) or (None, None)
    note(
        f"hub (pid {hub.pid}) killed; "
        + (
            f"no quit alert within {ALERT_TIMEOUT:g} s"
            if seen_at is None
            else f"quit alert after {(seen_at - killed_at) * 1000:.1f} ms"
        )
    )
    return {
        "hub_pid": hub.pid,
        "killed_at": killed_at,
        "alerted_at": seen_at,
        "counter_before": watch.counter,
        "counter": counter,
    }


class Disruption:
    """Something done to the private `dcod run` at an instant of the window, in a thread of the parent."""

    def __init__(self, kind: str, at: float, action: Callable[[], dict]) -> None:
        self.kind = kind
        self.at = at
        self.action = action
        self.result: dict | None = None
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, name=f"bench {kind}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        time.sleep(max(0.0, self.at - time.monotonic()))
        try:
            self.result = self.action()
        except Exception as e:  # reported by outcome(), in the main thread
            self.error = e

    def outcome(self, timeout: float) -> dict:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise BenchError(f"{self.kind}: not done {timeout:g} s after the window")
        if self.error is not None:
            raise BenchError(f"{self.kind}: {self.error}") from self.error
        return self.result


def plan_disruption(
    target: Target, args: argparse.Namespace, measure_at: float, note: Callable[[str], None]
) -> Disruption | None:
    """The --reload-at or --kill-hub-at of this run, started (it waits for its instant), or None."""
    if args.reload_at is not None:
        return Disruption("reload", measure_at + args.reload_at, lambda: reload_run(target, note))
    if args.kill_hub_at is not None:
        return Disruption("hub kill", measure_at + args.kill_hub_at, lambda: kill_hub(target, note))
    return None
