"""JSON-lines channels: supervisor <-> child (a socketpair), and the control socket's lines.

One JSON object per line, in both directions. A child finds its end of the socketpair
at the fd named by ``$DCOD_CONTROL_FD``; when the supervisor goes away the channel reads
end of stream and the child stops, so a killed supervisor leaves no orphans behind.

This module is the one home of the channels' vocabulary: the events a child sends
(``Event``), the commands it obeys (``Command``), the control socket's commands
(``Control``), and the counts each child reports for `dcod status` (``StatusCounts``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from collections.abc import Callable
from enum import StrEnum

import trio

from dcod import __version__
from dcod.net.connection import Connection, ConnectionClosed

CONTROL_FD_VAR = "DCOD_CONTROL_FD"
HELD_VAR = "DCOD_HELD"  # (hub) the worker instances it holds from its start: "proxy:instance,..."
MAX_LINE = 1024 * 1024

log = logging.getLogger("dcod.net.channel")


class Event(StrEnum):
    """What a child tells its supervisor: ``{"event": ..., ...}``."""

    HEARTBEAT = "heartbeat"  # every heartbeat_interval: {"counts": StatusCounts, "stats": its own detail, "version"}
    READY = "ready"  # serving
    DRAINING = "draining"  # its listener is closed: it finishes what it has, then exits
    DONE = "done"  # a command is done: {"id": the command's} and, if it failed, {"error": why}


class Command(StrEnum):
    """What the supervisor tells a child: ``{"command": ..., "id": n, ...}``."""

    DRAIN = "drain"  # take no more work, finish what you have, exit; (hub) {"removed": proxy ids a reload removed}
    HOLD = "hold"  # (hub) send nothing more to {"proxy", "instance"}; done once it has answered everything
    RELEASE = "release"  # (hub) use that instance again; done once connected to it


class Control(StrEnum):
    """The control socket's commands, `dcod status|reload|stop`: ``{"command": ...}``."""

    STATUS = "status"
    RELOAD = "reload"
    STOP = "stop"
    UPGRADE = "upgrade"  # `dcod reload --upgrade`: re-execute the supervisor in place, then roll out
    DEAD_LETTERS = "dead-letters"  # {"action": "list"|"retry"|"drop", "proxy": id or null, "ids": [...] or null}


def event(name: Event, **fields) -> dict:
    return {"event": name, **fields}


def command(name: Command | Control, **fields) -> dict:
    return {"command": name, **fields}


def done(request_id: int | None, error: str | None = None) -> dict:
    """The answer to a command: done, or failed and why."""
    return event(Event.DONE, id=request_id, **({"error": error} if error is not None else {}))


def event_of(message: dict) -> str | None:
    return message.get("event")


def command_of(message: dict) -> str | None:
    return message.get("command")


@dataclasses.dataclass(frozen=True)
class StatusCounts:
    """A child's counters as `dcod status` shows them, one spelling each. Each child computes its
    own and sends them in its heartbeats; the supervisor only displays them."""

    done: int = 0  # requests handled: replies and one-way requests
    inflight: int = 0  # requests taken and not answered yet
    queued: int = 0  # requests waiting for a worker instance (hub)
    spooled: int = 0  # bytes in the durable spool (hub)
    errors: int = 0  # requests that failed
    dead: int = 0  # requests set aside as poison, in the dead-letter stores now (hub)

    @classmethod
    def of(cls, message: dict) -> StatusCounts:
        """The counts in a heartbeat (zeros for what it lacks: a child that has not sent one yet)."""
        counts = message.get("counts", {})
        return cls(**{f.name: counts.get(f.name, 0) for f in dataclasses.fields(cls)})


class ChannelError(Exception):
    """The peer sent something that is not a JSON object per line."""


class Channel:
    """Messages (dicts) over a stream socket. Run ``writer()`` while it is in use."""

    def __init__(self, sock: socket.socket, name: str = "control", buffered: bytes = b"") -> None:
        """``buffered``: bytes already read from ``sock`` (by a previous image of this process) that
        start its next message."""
        self.conn = Connection(sock, name)
        self._buf = bytearray(buffered)

    @property
    def buffered(self) -> bytes:
        """What was read of the next message, which is not whole yet."""
        return bytes(self._buf)

    def send(self, message: dict) -> None:
        self.conn.send(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def writer(self) -> None:
        """Flush what send() queued until the channel ends; a peer that went away just ends it."""
        try:
            await self.conn.writer()
        except ConnectionClosed:
            self.conn.close()

    async def receive(self) -> dict | None:
        """The next message, or None at end of stream (or when the connection fails)."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                try:
                    message = json.loads(line)
                except ValueError as e:
                    raise ChannelError(f"{self.conn.name}: not JSON: {e}") from None
                if not isinstance(message, dict):
                    raise ChannelError(f"{self.conn.name}: expected a JSON object")
                return message
            if len(self._buf) > MAX_LINE:
                raise ChannelError(f"{self.conn.name}: line longer than {MAX_LINE} bytes")
            try:
                data = await self.conn.recv()
            except ConnectionClosed:
                return None
            if not data:
                return None
            self._buf += data

    def close(self) -> None:
        self.conn.close()


def child_channel(environ=os.environ) -> Channel | None:
    """This process's channel to its supervisor, if it was started by one."""
    fd = environ.pop(CONTROL_FD_VAR, None)
    if fd is None:
        return None
    os.set_inheritable(int(fd), False)
    return Channel(socket.socket(fileno=int(fd)), "supervisor")


def held_environment(instances: list[tuple[int, int]]) -> dict[str, str]:
    """The environment that tells a hub to hold these (proxy id, instance) from its start."""
    return {HELD_VAR: ",".join(f"{proxy}:{instance}" for proxy, instance in instances)} if instances else {}


def held_at_start(environ=os.environ) -> list[tuple[int, int]]:
    """The (proxy id, instance) this hub holds from its start, taken out of its environment."""
    value = environ.pop(HELD_VAR, "")
    return [(int(proxy), int(instance)) for proxy, instance in (item.split(":") for item in value.split(",") if item)]


def send_heartbeat(channel: Channel, report: Callable[[], tuple[StatusCounts, dict]]) -> None:
    """Send what ``report()`` says now: the child's counts for `dcod status` and its own detail (stats),
    and the version of dcod it runs."""
    counts, stats = report()
    channel.send(event(Event.HEARTBEAT, counts=dataclasses.asdict(counts), stats=stats, version=__version__))


async def heartbeat(channel: Channel, report: Callable[[], tuple[StatusCounts, dict]], interval: float) -> None:
    """Every ``interval`` seconds, send_heartbeat()."""
    while True:
        send_heartbeat(channel, report)
        await trio.sleep(interval)


async def obey(channel: Channel, stop, other=None) -> None:
    """Call ``stop(reason)`` when the supervisor says drain or goes away (end of stream);
    ``other(message)``, if given, for every command (for drain: before ``stop``, with what it asks besides)."""
    while True:
        try:
            message = await channel.receive()
        except ChannelError as e:
            log.warning("%s", e)
            continue
        if message is None:
            stop("supervisor went away")
            return
        if other is not None:
            other(message)
        if command_of(message) == Command.DRAIN:
            stop("asked to drain")
