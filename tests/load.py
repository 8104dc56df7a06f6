"""Continuous client load for tests: sessions calling an echo proxy, every reply checked.

Each session is a real dcod.client.Session, so it checks the quit-alert file before each
send exactly as PL/SQL would, and reconnects when its hub quits.
"""

from __future__ import annotations

import collections
from pathlib import Path

import trio

from dcod.client import ClientError, DcoError, HubLost, Session


class Load:
    def __init__(
        self, address: str, alert_file: Path, *, sessions: int = 16, proxy: int = 1, timeout: float = 20.0
    ) -> None:
        self.address = address
        self.alert_file = alert_file
        self.sessions = sessions
        self.proxy = proxy
        self.timeout = timeout
        self.ok = 0
        self.mismatched = 0
        self.lost = 0  # the hub connection broke with the request in flight
        self.unavailable = 0  # no hub could be reached to send it
        self.errors: collections.Counter[int | None] = collections.Counter()  # error replies by DCO code
        self.error_texts: list[str] = []
        self._stopping = trio.Event()
        self._progress = trio.Event()

    @property
    def answered(self) -> int:
        return self.ok + self.mismatched + self.lost + self.unavailable + sum(self.errors.values())

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the sessions until stop(); started once every session has had one reply."""
        async with trio.open_nursery() as nursery:
            first = [trio.Event() for _ in range(self.sessions)]
            for i, event in enumerate(first):
                nursery.start_soon(self._session, 700000 + i, event)
            for event in first:
                await event.wait()
            task_status.started()

    def stop(self) -> None:
        self._stopping.set()

    async def progress(self, calls: int, timeout: float = 30.0) -> None:
        """Wait until ``calls`` more calls have been answered correctly."""
        target = self.ok + calls
        with trio.fail_after(timeout):
            while self.ok < target:
                await self._progress.wait()

    async def _session(self, audsid: int, first: trio.Event) -> None:
        async with Session(self.address, audsid=audsid, alert_file=self.alert_file) as session:
            number = 0
            while not self._stopping.is_set():
                number += 1
                body = b"%d:%d" % (audsid, number)
                try:
                    reply = await session.call_sync(self.proxy, body, timeout=self.timeout)
                except DcoError as e:
                    self.errors[e.code] += 1
                    self.error_texts.append(e.text)
                except HubLost:
                    self.lost += 1
                except ClientError:
                    self.unavailable += 1
                else:
                    if reply == body:
                        self.ok += 1
                    else:
                        self.mismatched += 1
                first.set()
                self._progress.set()
                self._progress = trio.Event()
