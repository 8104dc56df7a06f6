"""Listening sockets: binding them, and passing them on as systemd does (sd_listen_fds).

A process that receives sockets finds them at fd 3, 4, ... with ``LISTEN_FDS`` (how many),
``LISTEN_PID`` (must be its own pid, else they were meant for another process) and
``LISTEN_FDNAMES`` (colon-separated names). dcod uses the same convention for its children.
"""

from __future__ import annotations

import os
import socket
import stat

from dcod.net.connection import parse_address

SD_LISTEN_FDS_START = 3
LISTEN_VARS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def listen_fds(environ=os.environ, *, unset: bool = True) -> dict[str, socket.socket]:
    """Sockets passed to this process, by name ("unknown" where unnamed). Empty if none.

    With ``unset``, the variables are removed so that our own children do not inherit them.
    """
    count = passed_count(environ)
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    if unset:
        for var in LISTEN_VARS:
            environ.pop(var, None)
    if count <= 0:
        return {}
    sockets = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else "unknown"
        sockets[name] = socket.socket(fileno=fd)
    return sockets


def passed_count(environ=os.environ) -> int:
    """How many sockets systemd (or a supervisor) passed to this process: 0 if none, or they are
    meant for another (LISTEN_PID)."""
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
        meant_for_us = int(environ.get("LISTEN_PID", "0")) == os.getpid()
    except ValueError:
        return 0
    return count if meant_for_us else 0


def bind(address: str, *, backlog: int = 1024, mode: int = 0o600) -> socket.socket:
    """A listening socket on "host:port" or a Unix socket path (a stale socket file is replaced)."""
    family, addr = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            # bind() makes the file itself, failing if the path exists: a symlink is never followed.
            _remove_stale_socket(addr)
            old_umask = os.umask(0o777 & ~mode)
            try:
                sock.bind(addr)
            finally:
                os.umask(old_umask)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def address_of(sock: socket.socket) -> str:
    """Where a listening socket is: "host:port", or its path."""
    address = sock.getsockname()
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


def _remove_stale_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def child_environment(names: list[str], base=os.environ) -> dict[str, str]:
    """The environment for a child that gets ``names`` sockets at fd 3, 4, ...

    LISTEN_PID cannot be known before the fork; launch through ``listen_pid_shim``.
    """
    env = {k: v for k, v in base.items() if k not in LISTEN_VARS}
    if names:
        env["LISTEN_FDS"] = str(len(names))
        env["LISTEN_FDNAMES"] = ":".join(names)
    return env


# `sh` sets LISTEN_PID to its own pid and exec's the real program, which keeps that pid.
LISTEN_PID_SHIM = ["/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"']
