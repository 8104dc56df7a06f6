"""The control socket: `dcod status|reload|stop` talk to the supervisor here, one command per
connection, in the JSON lines of dcod.net.channel. Root, the service's user and members of
``supervisor.control_group`` only, as the kernel vouches for the peer.
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

from dcod.net.channel import Channel, ChannelError, command_of
from dcod.net.connection import ConnectionClosed, accept

log = logging.getLogger("dcod.net.channel")

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
                log.info("control: %s from %s", command_of(message), who)
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
