"""JSON-lines channels: supervisor <-> child (a socketpair), and the control socket's lines.

One JSON object per line, in both directions. A child finds its end of the socketpair
at the fd named by ``$DCOD_CONTROL_FD``; when the supervisor goes away the channel reads
end of stream and the child stops, so a killed supervisor leaves no orphans behind.
"""

from __future__ import annotations

import errno
import grp
import json
import logging
import os
import socket
import struct

import trio

from dcod.net.connection import Connection, ConnectionClosed, accept

CONTROL_FD_VAR = "DCOD_CONTROL_FD"
MAX_LINE = 1024 * 1024

log = logging.getLogger("dcod.net.channel")


class ChannelError(Exception):
    """The peer sent something that is not a JSON object per line."""


class Channel:
    """Messages (dicts) over a stream socket. Run ``writer()`` while it is in use."""

    def __init__(self, sock: socket.socket, name: str = "control") -> None:
        self.conn = Connection(sock, name)
        self._buf = bytearray()

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


async def heartbeat(channel: Channel, stats, interval: float) -> None:
    """Send ``{"event": "heartbeat", "stats": stats()}`` every ``interval`` seconds, forever."""
    while True:
        channel.send({"event": "heartbeat", "stats": stats()})
        await trio.sleep(interval)


async def obey(channel: Channel, stop, other=None) -> None:
    """Call ``stop(reason)`` when the supervisor says "drain" or goes away (end of stream);
    ``other(message)``, if given, for any other command."""
    while True:
        try:
            message = await channel.receive()
        except ChannelError as e:
            log.warning("%s", e)
            continue
        if message is None:
            stop("supervisor went away")
            return
        if message.get("command") == "drain":
            stop("asked to drain")
        elif other is not None:
            other(message)
