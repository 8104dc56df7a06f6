"""The supervisor: `dcod run`, the service's main process (DESIGN §1).

It owns every listening socket: the Oracle-facing one (from systemd, else bound here)
and one per managed worker instance. Children inherit them, so a restarted child
serves on the same socket and no connection attempt is ever refused. Each child sits
in a slot that restarts it with backoff when it fails, within a restart budget
(Tuxedo's MAXGEN within GRACE); past the budget the slot stays down and says why.
"""

from __future__ import annotations

import collections
import logging
import signal
import socket
import sys
import time

import sdnotify
import trio

from dcod import sockets
from dcod.config import Config
from dcod.control import ChannelError
from dcod.process import Process, describe_exit

log = logging.getLogger("dcod.supervisor")

BACKOFF_MIN = 0.1  # seconds before restarting a failed child; doubles up to:
BACKOFF_MAX = 5.0
HUB_SOCKET_NAME = "hub"  # FileDescriptorName= in dco-hub.socket


class Slot:
    """A place for one child, the hub or one worker instance, that keeps a process running in it."""

    def __init__(self, supervisor: Supervisor, name: str, argv: list[str], passed: dict[str, socket.socket]) -> None:
        self.supervisor = supervisor
        self.name = name
        self.argv = argv
        self.passed = passed
        self.process: Process | None = None
        self.generation = 0
        self.state = "starting"
        self.last_exit = ""  # how the previous process ended, for `dcod status`
        self.starts: collections.deque[float] = collections.deque()
        self.stats: dict = {}
        self.ready = trio.Event()
        self.stopping = False

    async def keep_running(self) -> None:
        config = self.supervisor.config.supervisor
        backoff = BACKOFF_MIN
        while not self.stopping:
            now = time.monotonic()
            while self.starts and now - self.starts[0] > config.restart_window:
                self.starts.popleft()
            if len(self.starts) >= config.restart_max:
                self.state = "failed"
                log.error("%s: %d starts within %gs; leaving it down (last: %s)", self.name, len(self.starts),
                          config.restart_window, self.last_exit)
                return
            self.starts.append(now)
            returncode = await self._run_once()
            if self.stopping:
                return
            self.state = "backoff"
            log.warning("%s (pid %d) %s; restarting in %.1fs", self.name, self.process.pid,
                        describe_exit(returncode), backoff)
            await trio.sleep(backoff)
            backoff = BACKOFF_MIN if self.process.uptime > config.restart_window else min(backoff * 2, BACKOFF_MAX)

    async def _run_once(self) -> int:
        self.generation += 1
        self.process = process = Process.start(self.name, self.argv, self.passed)
        self.state = "running"
        log.info("%s started: pid %d, generation %d", self.name, process.pid, self.generation)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(process.reap)
            nursery.start_soon(process.channel.writer)
            nursery.start_soon(self._listen, process)
            returncode = await process.wait()
            nursery.cancel_scope.cancel()
        process.channel.close()
        self.last_exit = f"{describe_exit(returncode)} at {time.strftime('%H:%M:%S')}"
        self.state = "stopped"
        return returncode

    async def _listen(self, process: Process) -> None:
        """Messages from the child: ready, heartbeat (with its counters)."""
        while True:
            try:
                message = await process.channel.receive()
            except ChannelError as e:
                log.warning("%s: %s", self.name, e)
                return
            if message is None:
                return
            event = message.get("event")
            if event == "ready":
                self.state = "ready"
                self.ready.set()
            elif event == "heartbeat":
                self.stats = message.get("stats", {})

    async def stop(self, timeout: float) -> None:
        self.stopping = True
        process = self.process
        if process is not None and process.running:
            returncode = await process.stop(timeout)
            log.info("%s (pid %d) %s", self.name, process.pid, describe_exit(returncode))


class Supervisor:
    def __init__(self, config: Config, hub_listener: socket.socket) -> None:
        self.config = config
        self.hub_listener = hub_listener
        self.notifier = sdnotify.SystemdNotifier()
        base = [sys.executable, "-m", "dcod"]
        config_args = [] if config.source.startswith("<") else ["--config", config.source]
        self.workers: list[Slot] = []
        for proxy in config.proxies:
            if not proxy.managed:
                continue
            for i in range(proxy.instances):
                sock = sockets.bind(str(config.worker_socket(proxy.id, i)))
                argv = list(proxy.command) or [*base, "worker", *config_args, "--proxy", str(proxy.id),
                                               "--instance", str(i)]
                self.workers.append(Slot(self, f"worker {proxy.id}#{i}", argv, {"worker": sock}))
        self.hub = Slot(self, "hub", [*base, "hub", *config_args], {HUB_SOCKET_NAME: hub_listener})

    @property
    def slots(self) -> list[Slot]:
        return [*self.workers, self.hub]

    def notify(self, *lines: str) -> None:
        self.notifier.notify("\n".join(lines))

    async def run(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                for slot in self.slots:
                    nursery.start_soon(slot.keep_running)
                nursery.start_soon(self._announce_ready)
                async for signum in signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    break
                self.notify("STOPPING=1", "STATUS=stopping: draining the hub")
                await self.stop()
                nursery.cancel_scope.cancel()
        log.info("stopped")

    async def _announce_ready(self) -> None:
        """READY=1 once the hub says it is connected to its workers."""
        await self.hub.ready.wait()
        status = f"serving on {self.config.hub.advertise}: hub and {len(self.workers)} worker instances"
        log.info("ready: %s", status)
        self.notify("READY=1", f"STATUS={status}")

    async def stop(self) -> None:
        """The hub first (it drains), then the workers together."""
        sup = self.config.supervisor
        await self.hub.stop(sup.drain_timeout + sup.stop_timeout)
        self.notify("STATUS=stopping: workers")
        async with trio.open_nursery() as nursery:
            for slot in self.workers:
                nursery.start_soon(slot.stop, sup.stop_timeout)


def hub_listener(config: Config) -> socket.socket:
    """The Oracle-facing socket: from systemd (socket activation), else bound here."""
    passed = sockets.listen_fds()
    if passed:
        sock = passed.get(HUB_SOCKET_NAME) or next(iter(passed.values()))
        log.info("using the listening socket passed by systemd (%s)", ", ".join(passed))
        return sock
    return sockets.bind(config.hub.listen)


def main(config: Config) -> int:
    config.runtime_dir.mkdir(parents=True, exist_ok=True)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        listener = hub_listener(config)
    except OSError as e:
        log.error("cannot listen on %s: %s", config.hub.listen, e.strerror)
        return 1
    trio.run(Supervisor(config, listener).run)
    return 0
