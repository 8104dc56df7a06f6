"""The control socket: `dcod status|reload|stop` talk to the supervisor here, one command per
connection, in the JSON lines of dcod.net.channel. Root, the service's user and members of
``supervisor.control_group`` only, as the kernel vouches for the peer.
"""

from __future__ import annotations

import contextvars
import errno
import grp
import json
import logging
import os
import socket
import struct

import trio

from dcod.net.channel import Channel, ChannelError, Control, command_of
from dcod.net.connection import ConnectionClosed, accept

log = logging.getLogger("dcod.net.channel")

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux; Python 3.11 does not name it
# While a command is answered: the client's connection (dcod.supervisor.reexec hands it to the next image).
current_client: contextvars.ContextVar[Channel] = contextvars.ContextVar("current_client")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """The peer's pid, uid and gid as the kernel says (SO_PEERCRED); its pid is 0 if it is not in our
    pid namespace."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))


def peer_allowed(sock: socket.socket, group: str) -> tuple[bool, str]:
    """Root, our own user, or a member of ``group``, as the kernel says (SO_PEERCRED and
    SO_PEERGROUPS: no /proc lookup, which ProtectProc= may hide and a reused pid may fool)."""
    pid, uid, gid = peer_credentials(sock)
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


class ControlServer:
    """Serves the control socket: run ``serve()`` in a task; ``close()`` ends it.

    ``handle(message, reply)`` answers one command; ``reply(dict)`` sends a line to the client
    (progress, then a final answer).
    """

    def __init__(self, listener: socket.socket, handle, *, group: str) -> None:
        self.listener = listener
        self.handle = handle
        self.group = group
        self._accepting = trio.CancelScope()
        self._answering: trio.CancelScope | None = None  # of the connections being answered
        self._done = trio.Event()

    async def serve(self) -> None:
        self.listener.setblocking(False)
        try:
            async with trio.open_nursery() as nursery:
                self._answering = nursery.cancel_scope
                with self._accepting, self.listener:
                    while True:
                        sock, _ = await accept(self.listener)
                        allowed, who = peer_allowed(sock, self.group)
                        if not allowed:
                            log.warning(
                                "refused a control connection from %s: not root, not us, not in group %s",
                                who,
                                self.group,
                            )
                        nursery.start_soon(
                            _answer_and_close,
                            Channel(sock, f"control client {who}"),
                            self.handle if allowed else _refuse(self.group),
                            who,
                        )
        finally:
            self._done.set()

    async def close(self, timeout: float) -> None:
        """Accept no more connections; give those in progress ``timeout`` seconds to have their
        answers written (a stop's last line is written just before the supervisor exits)."""
        self._accepting.cancel()
        if self._answering is not None:
            self._answering.deadline = trio.current_time() + timeout
        await self._done.wait()


def _refuse(group: str):
    async def refuse(message: dict, reply) -> None:
        reply({"ok": False, "error": f"permission denied: only root and group {group} may do that"})

    return refuse


async def _answer_and_close(channel: Channel, handle, who: str) -> None:
    current_client.set(channel)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(channel.writer)
        try:
            message = await channel.receive()
            if message is not None:
                # `dcod status` may be polled every second: not in the journal unless asked (-v)
                level = logging.DEBUG if command_of(message) == Control.STATUS else logging.INFO
                log.log(level, "control: %s from %s", command_of(message), who)
                await handle(message, channel.send)
            await channel.conn.flush()
        except (ChannelError, ConnectionClosed) as e:
            log.warning("%s", e)
        finally:
            channel.close()
            nursery.cancel_scope.cancel()


class ControlClient:
    """Blocking client for the CLI: connect, then ``ask()`` one command.

    ``peer_pid`` is the supervisor's pid: the process that listens on the socket (peer_credentials()).
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(os.fspath(path))
        except BaseException:
            self.sock.close()
            raise
        self.peer_pid = peer_credentials(self.sock)[0]

    def ask(self, message: dict):
        """Send one command; yield each line of the answer (dicts) until the supervisor closes the connection."""
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        with self.sock.makefile("rb") as lines:
            for line in lines:
                yield json.loads(line)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def request(path: str | os.PathLike, message: dict, *, timeout: float | None = None):
    """Send one command, yield each line of the answer (dicts)."""
    with ControlClient(path, timeout=timeout) as client:
        yield from client.ask(message)
