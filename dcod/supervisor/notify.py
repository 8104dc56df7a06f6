"""sd_notify that never blocks the event loop and never drops a message.

systemd's notification socket is a datagram socket whose queue holds a few messages
(net.unix.max_dgram_qlen, 10 by default); a plain blocking send would freeze every task of
the supervisor while the reader is slow. Messages queue here and one task sends them, in
order, waiting for room when there is none.
"""

from __future__ import annotations

import collections
import logging

import sdnotify
import trio

log = logging.getLogger("dcod.supervisor.notify")


class Notifier:
    def __init__(self) -> None:
        self._sock = sdnotify.SystemdNotifier().socket  # None when not started by systemd
        if self._sock is not None:
            self._sock.setblocking(False)
        self._queue: collections.deque[bytes] = collections.deque()
        self._wake = trio.Event()
        self._sent_all = trio.Event()

    def notify(self, *lines: str) -> None:
        """Queue one message ("READY=1", "STATUS=..."); sent by run()."""
        if self._sock is not None:
            self._queue.append("\n".join(lines).encode())
            self._wake.set()

    async def run(self) -> None:
        if self._sock is None:
            return
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._queue:
                try:
                    self._sock.send(self._queue[0])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self._sock)
                    continue
                except OSError as e:
                    log.warning("sd_notify failed: %s", e.strerror)
                self._queue.popleft()
            self._sent_all.set()
            self._sent_all = trio.Event()

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait (at most ``timeout``) until run() has sent everything queued."""
        with trio.move_on_after(timeout):
            while self._queue:
                await self._sent_all.wait()
