"""JSON-lines channels: supervisor <-> child (a socketpair), and later the control socket.

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

from dcod.connection import Connection, ConnectionClosed, accept

CONTROL_FD_VAR = "DCOD_CONTROL_FD"
MAX_LINE = 1024 * 1024

log = logging.getLogger("dcod.control")


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


# ---------------------------------------------------------------- the control socket


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux; Python 3.11 does not name it


def peer_allowed(sock: socket.socket, group: str) -> tuple[bool, str]:
    """Root, our own user, or a member of ``group``, as the kernel says (SO_PEERCRED and
    SO_PEERGROUPS: no /proc lookup, which ProtectProc= may hide and a reused pid may fool)."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    who = f"pid {pid} uid {uid}"
    if uid in (0, os.geteuid()):
        return True, who
    try:
        allowed_gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return False, who
    return allowed_gid in {gid, *_peer_groups(sock)}, who


def _peer_groups(sock: socket.socket) -> set[int]:
    size = 4 * 256
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE and size < 4 * 65536:
                size *= 4
                continue
            return set()
        return set(struct.unpack(f"{len(raw) // 4}I", raw))


async def serve(listener: socket.socket, handle, *, group: str) -> None:
    """Accept control connections: one command each, ``await handle(message, reply)``.

    ``reply(dict)`` sends a line to the client (progress, then a final answer).
    """
    listener.setblocking(False)
    async with trio.open_nursery() as nursery:
        while True:
            sock, _ = await accept(listener)
            allowed, who = peer_allowed(sock, group)
            if not allowed:
                log.warning("refused a control connection from %s: not root, not us, not in group %s", who, group)
            nursery.start_soon(_answer_and_close, Channel(sock, f"control client {who}"),
                               handle if allowed else _refuse(group), who)


def _refuse(group: str):
    async def refuse(message: dict, reply) -> None:
        reply({"ok": False, "error": f"permission denied: only root and group {group} may do that"})
    return refuse


async def _answer_and_close(channel: Channel, handle, who: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(channel.writer)
        try:
            message = await channel.receive()
            if message is not None:
                log.info("control: %s from %s", message.get("command"), who)
                await handle(message, channel.send)
            await channel.conn.flush()
        except (ChannelError, ConnectionClosed) as e:
            log.warning("%s", e)
        finally:
            channel.close()
            nursery.cancel_scope.cancel()


def request(path: str | os.PathLike, message: dict, *, timeout: float | None = None):
    """Blocking client for the CLI: send one command, yield each line of the answer (dicts)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(json.dumps(message).encode() + b"\n")
        with sock.makefile("rb") as lines:
            for line in lines:
                yield json.loads(line)
