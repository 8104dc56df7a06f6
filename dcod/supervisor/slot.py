"""A slot: the place of one child, the hub or one worker instance, that keeps a process running in it.

A failed child is restarted with backoff, within a restart budget (Tuxedo's MAXGEN within
GRACE); past the budget the slot stays down and says why. The hub's slot may hold several
generations at once while a rollout overlaps them on the same socket (``alive``).
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from dcod.net.channel import Command, held_environment
from dcod.supervisor.process import Process, dcod_command, describe_exit, drain_hubs
from dcod.supervisor.rollout import RolloutError

if TYPE_CHECKING:
    from dcod.supervisor.supervisor import Supervisor

log = logging.getLogger("dcod.supervisor")

BACKOFF_MIN = 0.1  # seconds before restarting a failed child; doubles up to:
BACKOFF_MAX = 5.0


@dataclass(frozen=True)
class LastExit:
    """How a slot's previous process ended, for `dcod status`."""

    returncode: int  # negative: killed by that signal
    time: float  # wall time (time.time())
    replaced: bool  # a rollout replaced it: planned


class Slot:
    """A place for one child, the hub or one worker instance, that keeps a process running in it."""

    def __init__(
        self,
        supervisor: Supervisor,
        name: str,
        argv: list[str],
        passed: dict[str, socket.socket],
        proxy_id: int | None = None,
        instance: int | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.name = name
        self.argv = argv
        self.passed = passed
        self.proxy_id = proxy_id
        self.instance = instance
        self.process: Process | None = None
        # Every process started here that has not exited: the current one and, in the hub's
        # slot, older generations a rollout is replacing or draining, or a new one it is stopping.
        self.alive: list[Process] = []
        self.generation = 0
        self.state = "starting"
        self.last_exit: LastExit | None = None  # how the previous process ended
        self.restarts = 0
        self.failures: list[float] = []  # when its processes exited unplanned: the restart budget
        self.stopping = False
        # (Workers) down, or not ready since it was: held in every hub, so that its requests wait in
        # the queue, not in the listening socket's backlog that we keep for its next process.
        self.held = False

    @property
    def is_hub(self) -> bool:
        return self.proxy_id is None

    @property
    def foreign(self) -> bool:
        """A worker launched from a `command`, not dcod's own runtime."""
        return not self.is_hub and tuple(self.argv[: len(dcod_command())]) != dcod_command()

    def launch(self) -> Process:
        """Start a new generation in this slot (the previous one, if any, is the caller's business)."""
        process = self.spawn(self.argv)
        self.process = process
        self.state = "starting"
        return process

    def spawn(self, argv: list[str]) -> Process:
        """Start a new generation, and watch it, without making it the slot's process (yet)."""
        if self.supervisor.stopping:
            # A rollout that resumes before the stop cancels it: the stop must not find a
            # process it did not know of behind it.
            raise RolloutError("the service is stopping")
        self.generation += 1
        # A new hub generation holds the instances that are down from its start, before any request comes.
        held = [(w.proxy_id, w.instance) for w in self.supervisor.workers.values() if w.held] if self.is_hub else []
        process = Process.start(self.name, argv, self.passed, held_environment(held))
        process.generation = self.generation
        if self.foreign:
            # A command in another language does not speak our channel: it is ready when the
            # hub connects to it, which the hub's own readiness and `release` wait for.
            process.ready.set()
        self.alive.append(process)
        log.info("%s started: pid %d, generation %d", self.name, process.pid, self.generation)
        self.supervisor.nursery.start_soon(self._watch, process)
        return process

    def adopt(self, process: Process) -> None:
        """Make a running child, started by this supervisor's previous image (dcod.supervisor.reexec),
        the slot's process, and watch it as if spawned here."""
        self.process = process
        self.alive.append(process)
        self.supervisor.nursery.start_soon(self._watch, process)

    def hold(self) -> None:
        """(Workers) Hold this instance in every hub until a process of it is ready again."""
        if not self.held:
            self.held = True
            self._tell_hubs(Command.HOLD)

    def release(self) -> None:
        """(Workers) Its process is ready: every hub that holds it may use it again."""
        if self.held:
            self.held = False
            self._tell_hubs(Command.RELEASE)

    def _tell_hubs(self, name: Command) -> None:
        """Send the command about this instance to every hub generation alive (without waiting for its answer)."""
        for hub in self.supervisor.hub.alive:
            self.supervisor.nursery.start_soon(
                functools.partial(hub.request, name, proxy=self.proxy_id, instance=self.instance)
            )

    async def _watch(self, process: Process) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(process.reap)
            nursery.start_soon(process.channel.writer)
            nursery.start_soon(process.listen)
            nursery.start_soon(self._mark_ready, process)
            if self.is_hub:
                nursery.start_soon(self._on_draining, process)
            returncode = await process.wait()
            nursery.cancel_scope.cancel()
        self.alive.remove(process)
        process.channel.close()
        how = describe_exit(returncode)
        self.last_exit = LastExit(returncode, time.time(), replaced=process.retiring and not self.stopping)
        if process is not self.process:
            log.info("%s generation %d (pid %d) %s", self.name, process.generation, process.pid, how)
            return
        if process.retiring or self.stopping:
            self.state = "stopped"  # whoever retired it reports how it ended
            return
        await self._failed(process, how)

    async def _mark_ready(self, process: Process) -> None:
        await process.ready.wait()
        # A hub told to drain while it connected to its workers may say ready after draining.
        if process is self.process and not process.draining.is_set():
            self.state = "ready"
            self.release()

    async def _on_draining(self, process: Process) -> None:
        """A hub that has closed its listener only finishes what it has: its slot says so. If
        neither a rollout nor a stop asked it to drain (SIGTERM from outside), raise the quit
        alert now, so that its sessions leave, not at its exit, which then restarts it as any
        unplanned exit does."""
        await process.draining.wait()
        if process is not self.process:
            return  # replaced by a rollout, which raises the alert, or never served: not the slot's state
        self.state = "draining"
        sup = self.supervisor
        if process.alerted or sup.stopping:
            return  # stopped: the stop raises the alert; or it is raised already
        # As a rollout would: the pmon leaves an alerted hub alone, so if its drain hangs, it is killed.
        await drain_hubs(
            [process],
            lambda: sup.alert_hub_gone(f"hub (pid {process.pid}) is draining, not asked to"),
            sup.config.supervisor,
        )

    async def _failed(self, process: Process, how: str) -> None:
        """An unplanned exit: alert if it was the hub, restart with backoff within the budget,
        unless the service is stopping."""
        sup = self.supervisor
        limits = sup.config.supervisor
        self.restarts += 1
        if self.is_hub:
            await sup.alert_hub_gone(f"hub (pid {process.pid}) {how}", already=process.alerted)
        else:
            # Held in every hub until a process of it is ready: requests to it wait in the queue,
            # not in the backlog of its socket (nobody may ever serve it: the service stopping).
            self.hold()
        if sup.stopping:
            self.state = "stopped"
            log.warning("%s (pid %d) %s; the service is stopping: not restarted", self.name, process.pid, how)
            return
        # Only failures count: the generations reloads start are no reason to give up on it.
        now = time.monotonic()
        self.failures = recent = [*(t for t in self.failures if now - t <= limits.restart_window), now]
        if len(recent) >= limits.restart_max:
            self.state = "failed"
            log.error(
                "%s (pid %d) %s; %d failures within %gs: leaving it down",
                self.name,
                process.pid,
                how,
                len(recent),
                limits.restart_window,
            )
            return
        backoff = 0.0 if len(recent) <= 1 else min(BACKOFF_MIN * 2 ** (len(recent) - 2), BACKOFF_MAX)
        self.state = "backoff"
        log.warning(
            "%s (pid %d) %s; restarting%s", self.name, process.pid, how, f" in {backoff:.1f}s" if backoff else ""
        )
        await trio.sleep(backoff)
        if not self.stopping and not sup.stopping and self.process is process:
            self.launch()

    async def ready(self, timeout: float, process: Process | None = None) -> None:
        """Wait until the process (by default the current one) is ready; RolloutError if it exits
        or takes too long."""
        process = process or self.process
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:

                async def exited() -> None:
                    await process.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(exited)
                await process.ready.wait()
                nursery.cancel_scope.cancel()
        if not process.ready.is_set():
            reason = (
                describe_exit(process.returncode)
                if process.returncode is not None
                else f"not ready within {timeout:g}s"
            )
            raise RolloutError(f"{self.name} generation {process.generation} (pid {process.pid}): {reason}")

    async def stop(self, timeout: float) -> int | None:
        """Stop its process (SIGTERM, after ``timeout`` SIGKILL) for good; its exit status, None if none ran."""
        self.stopping = True
        process = self.process
        if process is None or not process.running:
            return None
        process.retiring = True
        returncode = await process.stop(timeout)
        log.info("%s (pid %d) %s", self.name, process.pid, describe_exit(returncode))
        return returncode
