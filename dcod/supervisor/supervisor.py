"""The supervisor: `dcod run`, the service's main process (DESIGN §1, §4, §5).

It owns every listening socket: the Oracle-facing one (from systemd, else bound here)
and one per managed worker instance. Children inherit them, so a restarted child serves
on the same socket and no connection attempt is ever refused. Each child sits in a slot
that restarts it with backoff when it fails, within a restart budget (Tuxedo's MAXGEN
within GRACE); past the budget the slot stays down and says why.

A rollout (`dcod reload`) replaces the hub first, overlapping generations on the same
socket, then each worker instance in turn; the pmon raises the quit alert whenever a hub
goes away, planned or not, so Oracle sessions reconnect before their next send.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import resource
import signal
import socket
import time
from typing import Callable

import psutil
import trio

from dcod import config as configuration, fs
from dcod.net import sockets
from dcod.supervisor import control, rundir
from dcod.supervisor.notify import Notifier
from dcod.supervisor.alert import Alerter
from dcod.config import Config
from dcod.supervisor.process import Process, dcod_command, describe_exit

log = logging.getLogger("dcod.supervisor")

BACKOFF_MIN = 0.1  # seconds before restarting a failed child; doubles up to:
BACKOFF_MAX = 5.0
HUB_SOCKET_NAME = "hub"  # FileDescriptorName= in dco-hub.socket
UNCLEAN_MARKER = "hub.running"  # in state_dir while a hub runs; left behind by an unclean stop
ALERT_HEAD_START = 0.2  # seconds the quit alert may take before a new hub is started anyway
CONFIG_COPIES = "config-*.toml"  # in the runtime dir: the configurations the children read (_config_copy)


class RolloutError(Exception):
    """A rollout could not be done; the generation that was serving goes on serving."""


class Slot:
    """A place for one child, the hub or one worker instance, that keeps a process running in it."""

    def __init__(self, supervisor: Supervisor, name: str, argv: list[str], passed: dict[str, socket.socket],
                 proxy_id: int | None = None, instance: int | None = None) -> None:
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
        self.last_exit = ""  # how the previous process ended, for `dcod status`
        self.restarts = 0
        self.failures: list[float] = []  # when its processes exited unplanned: the restart budget
        self.stopping = False

    @property
    def is_hub(self) -> bool:
        return self.proxy_id is None

    @property
    def foreign(self) -> bool:
        """A worker launched from a `command`, not dcod's own runtime."""
        return not self.is_hub and tuple(self.argv[:len(dcod_command())]) != dcod_command()

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
        process = Process.start(self.name, argv, self.passed)
        process.generation = self.generation
        if self.foreign:
            # A command in another language does not speak our channel: it is ready when the
            # hub connects to it, which the hub's own readiness and `release` wait for.
            process.ready.set()
        self.alive.append(process)
        log.info("%s started: pid %d, generation %d", self.name, process.pid, self.generation)
        self.supervisor.nursery.start_soon(self._watch, process)
        return process

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
        self.last_exit = f"{how} at {time.strftime('%H:%M:%S')}" + \
            (" (replaced)" if process.retiring and not self.stopping else "")
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
        process.alerted = True
        await sup.alert_hub_gone(f"hub (pid {process.pid}) is draining, not asked to")
        # The pmon leaves an alerted hub alone: if its drain hangs, kill it as a rollout would.
        await process.stop(sup.config.supervisor.drain_timeout + sup.config.supervisor.stop_timeout, signum=None)

    async def _failed(self, process: Process, how: str) -> None:
        """An unplanned exit: alert if it was the hub, restart with backoff within the budget,
        unless the service is stopping."""
        sup = self.supervisor
        limits = sup.config.supervisor
        self.restarts += 1
        if self.is_hub:
            await sup.alert_hub_gone(f"hub (pid {process.pid}) {how}", already=process.alerted)
        if sup.stopping:
            self.state = "stopped"
            log.warning("%s (pid %d) %s; the service is stopping: not restarted", self.name, process.pid, how)
            return
        # Only failures count: the generations reloads start are no reason to give up on it.
        now = time.monotonic()
        self.failures = recent = [*(t for t in self.failures if now - t <= limits.restart_window), now]
        if len(recent) >= limits.restart_max:
            self.state = "failed"
            self.last_exit += f"; {len(recent)} failures within {limits.restart_window:g}s, left down"
            log.error("%s (pid %d) %s; %d failures within %gs: leaving it down", self.name, process.pid, how,
                      len(recent), limits.restart_window)
            return
        backoff = 0.0 if len(recent) <= 1 else min(BACKOFF_MIN * 2 ** (len(recent) - 2), BACKOFF_MAX)
        self.state = "backoff"
        log.warning("%s (pid %d) %s; restarting%s", self.name, process.pid, how,
                    f" in {backoff:.1f}s" if backoff else "")
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
            reason = describe_exit(process.returncode) if process.returncode is not None else \
                f"not ready within {timeout:g}s"
            raise RolloutError(f"{self.name} generation {process.generation} (pid {process.pid}): {reason}")

    async def stop(self, timeout: float) -> None:
        self.stopping = True
        process = self.process
        if process is not None and process.running:
            process.retiring = True
            log.info("%s (pid %d) %s", self.name, process.pid, describe_exit(await process.stop(timeout)))


class Supervisor:
    def __init__(self, config: Config, hub_listener: socket.socket) -> None:
        self.config = config
        self.hub_listener = hub_listener
        self.notifier = Notifier()
        self.alerter = Alerter.from_config(config)
        self.started = time.monotonic()
        self.workers: dict[tuple[int, int], Slot] = {}
        self.runtime_dir = config.runtime_dir  # ours until a restart, whatever a reload says
        for stale in self.runtime_dir.glob(CONFIG_COPIES):  # a previous run's; its children are gone with it
            stale.unlink()
        self.hub = Slot(self, "hub", self._argv(config, "hub"), {HUB_SOCKET_NAME: hub_listener})
        self.rollout_lock = trio.Lock()
        self._rollout: trio.CancelScope | None = None  # of the rollout under way
        self.last_rollout = ""
        self.nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self._me = psutil.Process()

    # ------------------------------------------------------------ processes

    def _argv(self, config: Config, *command: str) -> list[str]:
        """A dcod command that runs with this configuration."""
        return [*dcod_command(), command[0], "--config", self._config_copy(config), *command[1:]]

    def _config_copy(self, config: Config) -> str:
        """The file our children read their configuration from: this one, as validated here.

        Not the operator's file: that may have been edited since, or broken, and a child started
        later (a restart after a crash) must run with what was rolled out, as the others do.
        One copy per distinct configuration, named by its content: a child reads it when it
        starts, whenever that is, so none is removed while the service runs.
        """
        text = f"# {config.source}, as dcod run applies it (the children read this copy)\n" + configuration.dump(config)
        path = self.runtime_dir / CONFIG_COPIES.replace("*", hashlib.sha256(text.encode()).hexdigest()[:16])
        if not fs.is_regular_file(path):
            fs.write_atomically(path, text.encode())  # a child never reads half of it
        return str(path)

    def _worker_slots(self, config: Config) -> dict[tuple[int, int], tuple[str, list[str]]]:
        """(proxy id, instance) -> (name, argv) of every managed worker instance in a config."""
        slots = {}
        for proxy in config.proxies:
            if proxy.managed:
                for i in range(proxy.instances):
                    argv = list(proxy.command) or \
                        self._argv(config, "worker", "--proxy", str(proxy.id), "--instance", str(i))
                    slots[proxy.id, i] = (f"worker {proxy.id}#{i}", argv)
        return slots

    def _add_worker(self, config: Config, key: tuple[int, int], name: str, argv: list[str]) -> Slot:
        sock = sockets.bind(str(config.worker_socket(*key)))
        slot = self.workers[key] = Slot(self, name, argv, {"worker": sock}, *key)
        return slot

    async def _remove_worker(self, slot: Slot) -> None:
        """Stop the instance, then give up its socket, on which nothing will be started again (and
        its path, which _add_worker made under the runtime dir)."""
        await slot.stop(self.config.supervisor.stop_timeout)
        # Not before: a stop that cancels the rollout meanwhile must wait for it.
        del self.workers[slot.proxy_id, slot.instance]
        sock = slot.passed["worker"]
        path = sock.getsockname()
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    @property
    def slots(self) -> list[Slot]:
        return [*self.workers.values(), self.hub]

    def notify(self, *lines: str) -> None:
        self.notifier.notify(*lines)

    # ------------------------------------------------------------ life cycle

    async def run(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self.notifier.run)
                await self._check_unclean_stop()
                for key, (name, argv) in self._worker_slots(self.config).items():
                    self._add_worker(self.config, key, name, argv).launch()
                self.hub.launch()
                self._mark_hub_running()
                nursery.start_soon(self._announce_ready)
                nursery.start_soon(self._pmon)
                nursery.start_soon(self._watchdog)
                nursery.start_soon(self._serve_control)
                nursery.start_soon(self._on_signals, signals)
                await self._stop.wait()
                self.notify("STOPPING=1", "STATUS=stopping: draining the hub")
                await self._stop_children()
                await self.notifier.flush()
                nursery.cancel_scope.cancel()
        await self.alerter.aclose()
        (self.config.state_dir / UNCLEAN_MARKER).unlink(missing_ok=True)
        log.info("stopped")

    async def _on_signals(self, signals) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                self.nursery.start_soon(self._reload_on_sighup)
            else:
                log.info("%s: stopping", signal.Signals(signum).name)
                self._stop.set()

    async def _reload_on_sighup(self) -> None:
        try:
            await self.rollout(lambda line: log.info("reload: %s", line))
        except RolloutError as e:
            log.error("reload failed: %s", e)

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def _announce_ready(self) -> None:
        """READY=1 once the hub is connected to its workers and every worker is serving."""
        with trio.move_on_after(self.config.supervisor.ready_timeout):
            while any(slot.state not in ("ready", "failed") for slot in self.slots):
                await trio.sleep(0.02)  # slots change state on several events; cheap to look
        status = self.status_line()
        log.info("ready: %s", status)
        self.notify("READY=1", f"STATUS={status}")

    def status_line(self) -> str:
        states = [s.state for s in self.workers.values()]
        ready = states.count("ready")
        serving = self.hub.process.generation
        line = f"serving on {self.config.hub.advertise}: hub generation {serving} {self.hub.state}, " \
               f"{ready}/{len(states)} worker instances ready"
        failed = [s.name for s in self.slots if s.state == "failed"]
        return line + (f"; DOWN: {', '.join(failed)}" if failed else "")

    async def _stop_children(self) -> None:
        """Every hub generation alive first, then the workers together.

        Besides the slot's current hub, a rollout may have others alive: the generation it is
        replacing, which serves every session until the new one is ready; a new one it is
        stopping; older ones draining. Each serves sessions and forwards their requests to the
        workers: each drains, and is gone, before a worker is stopped.
        """
        sup = self.config.supervisor
        self.hub.stopping = True  # what ends now ends by the stop: not a failure, not "replaced"
        if self._rollout is not None:
            self._rollout.cancel()  # no new generation may start now
        hubs = [hub for hub in self.hub.alive if hub.running]
        for hub in hubs:
            hub.retiring = True  # it may drain and exit before we wait for it: planned
            hub.channel.send({"command": "drain"})  # one draining already goes on as it was
        # As in a rollout: once their listeners are closed, the alert sends sessions elsewhere.
        with trio.move_on_after(sup.stop_timeout):
            for hub in hubs:
                await hub.draining.wait()
        if hubs:
            await self.alerter.signal(self.config.hub.advertise)
        async with trio.open_nursery() as nursery:
            for hub in hubs:
                nursery.start_soon(self._stop_hub, hub)
        self.notify("STATUS=stopping: workers")
        async with trio.open_nursery() as nursery:
            for slot in self.workers.values():
                nursery.start_soon(slot.stop, sup.stop_timeout)

    async def _stop_hub(self, hub: Process) -> None:
        """Wait for a hub told to drain; SIGKILL it past drain_timeout + stop_timeout."""
        sup = self.config.supervisor
        how = describe_exit(await hub.stop(sup.drain_timeout + sup.stop_timeout, signum=None))
        if hub is self.hub.process:  # Slot._watch reports the end of older generations
            log.info("hub (pid %d) %s", hub.pid, how)

    # ------------------------------------------------------------ pmon and the quit alert

    async def alert_hub_gone(self, why: str, *, already: bool = False) -> None:
        """Raise the quit alert (unless this hub's going was already alerted).

        Sessions must hear of it first, so the caller waits for the alert before starting a new
        hub, but at most ALERT_HEAD_START: a slow backend (a database) must not hold up the hub.
        """
        if already:
            return
        log.warning("%s: raising the quit alert %s %s", why, self.config.alert.name, self.config.hub.advertise)
        raised = trio.Event()

        async def signal_then_set() -> None:
            await self.alerter.signal(self.config.hub.advertise)
            raised.set()

        self.nursery.start_soon(signal_then_set)
        with trio.move_on_after(ALERT_HEAD_START):
            await raised.wait()

    async def _pmon(self) -> None:
        """A hub whose heartbeats stop for heartbeat_timeout is hung: alert, kill, replace."""
        sup = self.config.supervisor
        tick = sup.heartbeat_interval / 2
        last_look = time.monotonic()
        while True:
            await trio.sleep(tick)
            now = time.monotonic()
            if now - last_look > 2 * tick + sup.heartbeat_interval:
                # We did not run for a while ourselves (SIGSTOPped, starved): the hub's heartbeats
                # may be waiting unread in our socket. Judge once we have read them.
                last_look = now
                continue
            last_look = now
            process = self.hub.process
            if process is None or not process.running or process.retiring or process.alerted:
                continue
            silent = now - process.last_heartbeat
            # Before its first heartbeat a hub is starting (imports, spool adoption): it gets
            # ready_timeout for that, heartbeat_timeout between heartbeats.
            if silent > (sup.heartbeat_timeout if process.heartbeats else sup.ready_timeout):
                process.alerted = True
                await self.alert_hub_gone(f"hub (pid {process.pid}) sent no heartbeat for {silent:.1f}s (hung)")
                process.send_signal(signal.SIGKILL)

    async def _check_unclean_stop(self) -> None:
        marker = self.config.state_dir / UNCLEAN_MARKER
        if marker.exists():
            log.warning("the previous run did not stop cleanly (%s exists)", marker)
            await self.alert_hub_gone("unclean stop of the previous run")

    def _mark_hub_running(self) -> None:
        marker = self.config.state_dir / UNCLEAN_MARKER
        fs.write_atomically(marker, f"{os.getpid()} {self.config.hub.advertise}\n".encode())

    async def _watchdog(self) -> None:
        """WATCHDOG=1 at half the interval systemd asks for, while our event loop runs."""
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        pid = os.environ.get("WATCHDOG_PID")
        if usec <= 0 or (pid and int(pid) != os.getpid()):
            return
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(usec / 2e6)

    # ------------------------------------------------------------ rollout

    async def rollout(self, progress: Callable[[str], None]) -> None:
        """Re-read the config and replace the hub, then each worker instance (DESIGN §4).

        Raises RolloutError, whose message says what stays: before the new hub serves, nothing
        changed; after, what was done (the new configuration is in effect).
        """
        if self._stop.is_set():
            raise RolloutError("the service is stopping")
        if self.rollout_lock.locked():
            raise RolloutError(f"a rollout is already running ({self.last_rollout}); try again when it is done")
        async with self.rollout_lock:
            started = time.monotonic()
            self.last_rollout = f"started at {time.strftime('%H:%M:%S')}"

            def step(line: str) -> None:
                self.notify(f"STATUS=reload: {line}")
                progress(line)

            self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
            try:
                with trio.CancelScope() as self._rollout:
                    await self._replace_all(step)
                if self._rollout.cancelled_caught:
                    raise RolloutError("the service is stopping")
            except RolloutError as e:
                self.last_rollout = f"failed at {time.strftime('%H:%M:%S')}: {e}"
                raise
            finally:
                self.notify("READY=1", f"STATUS={self.status_line()}")
            self.last_rollout = f"done at {time.strftime('%H:%M:%S')} in {time.monotonic() - started:.1f}s"
            step(f"done in {time.monotonic() - started:.1f}s")

    async def _replace_all(self, step: Callable[[str], None]) -> None:
        source = None if self.config.source == configuration.BUILTIN else self.config.source
        try:
            new = configuration.load(source)
        except configuration.ConfigError as e:
            raise RolloutError(f"invalid configuration, nothing changed: {e}") from None
        self._warn_unappliable(new)
        old_slots, new_slots = set(self.workers), self._worker_slots(new)
        added = [k for k in new_slots if k not in old_slots]
        removed = [k for k in old_slots if k not in new_slots]
        kept = [k for k in new_slots if k in old_slots]
        step(f"configuration {new.source}: proxies {', '.join(str(p.id) for p in new.proxies) or 'none'}; "
             f"{len(new_slots)} worker instances ({len(added)} added, {len(removed)} removed)")
        # Until the new hub serves, the previous configuration is in effect: a failure before that
        # stops what this rollout started, and leaves everything as it was.
        try:
            for key in added:
                slot = self._add_worker(new, key, *new_slots[key])
                slot.launch()
                await slot.ready(new.supervisor.ready_timeout)
                step(f"{slot.name}: added, ready")
            hub_argv = self._argv(new, "hub")
            hub = await self._start_hub(hub_argv, new, step)
        except RolloutError as e:
            for slot in [self.workers[key] for key in added if key in self.workers]:
                await self._remove_worker(slot)
                step(f"{slot.name}: stopped, not added")
            raise RolloutError(f"{e}; nothing changed: the previous configuration stays in effect") from None
        # The new hub serves: the new configuration is in effect, for every process started from
        # now on. A failure from here on keeps what was done, and says what still runs the previous one.
        old = self.hub.process
        self.config = new
        self.hub.argv, self.hub.process, self.hub.state = hub_argv, hub, "ready"
        previous = {key: self.workers[key].process for key in kept}
        for key in kept:
            self.workers[key].name, self.workers[key].argv = new_slots[key]
        await self._retire_hub(old, step)
        for key in removed:
            slot = self.workers[key]
            await self._remove_worker(slot)
            step(f"{slot.name}: removed")
        try:
            for key in kept:
                await self._replace_worker(self.workers[key], step)
        except RolloutError as e:
            left = [self.workers[key].name for key in kept if self.workers[key].process is previous[key]]
            raise RolloutError(f"{e}; the new configuration stays in effect (the hub runs it, as will every "
                               f"process started from now on)" +
                               (f"; still running the previous one: {', '.join(left)}" if left else "")) from None

    def _warn_unappliable(self, new: Config) -> None:
        """Some settings belong to the supervisor's own start; say so rather than pretend."""
        if new.hub.listen != self.config.hub.listen:
            log.warning("hub.listen changed: the listening socket is kept; restart the service to apply it")
        if (new.runtime_dir, new.state_dir) != (self.config.runtime_dir, self.config.state_dir):
            log.warning("runtime_dir or state_dir changed: restart the service to apply it")

    async def _start_hub(self, argv: list[str], config: Config, step: Callable[[str], None]) -> Process:
        """The next hub generation, run by ``argv`` with ``config``, on the same socket, once it is ready.

        Until then the one serving stays the slot's process (the pmon watches it; if it dies, it
        is restarted as it was); if the new one is not ready in time, it is stopped."""
        new = self.hub.spawn(argv)
        step(f"hub: generation {new.generation} (pid {new.pid}) starting")
        try:
            await self.hub.ready(config.supervisor.ready_timeout, new)
        except RolloutError:
            new.retiring = True
            await new.stop(config.supervisor.stop_timeout)
            step(f"hub: generation {new.generation} stopped")
            raise
        return new

    async def _retire_hub(self, old: Process, step: Callable[[str], None]) -> None:
        """The hub generation that served until now drains (the new one serves), and the alert is raised."""
        sup = self.config.supervisor
        step(f"hub: generation {self.hub.process.generation} ready; generation {old.generation} draining")
        if not old.running:
            return
        old.retiring = True
        old.channel.send({"command": "drain"})
        with trio.move_on_after(sup.stop_timeout):
            await old.draining.wait()
        # Its listener is closed: sessions that reconnect reach the new generation only.
        await self.alerter.signal(self.config.hub.advertise)
        step(f"quit alert {self.config.alert.name} raised for {self.config.hub.advertise}")
        returncode = await old.stop(sup.drain_timeout + sup.stop_timeout, signum=None)
        step(f"hub: generation {old.generation} (pid {old.pid}) drained, {describe_exit(returncode)}")

    async def _replace_worker(self, slot: Slot, step: Callable[[str], None]) -> None:
        """Hold the instance in the hub, let its replies come in, restart it, release it."""
        sup = self.config.supervisor
        hub = self.hub.process
        if hub is None or not hub.running:
            raise RolloutError(f"{slot.name}: no hub is running to hold it")
        answer = await hub.request("hold", proxy=slot.proxy_id, instance=slot.instance)
        if "error" in answer:
            raise RolloutError(f"{slot.name}: the hub cannot hold it: {answer['error']}")
        old = slot.process
        if old is not None and old.running:
            old.retiring = True
            returncode = await old.stop(sup.stop_timeout)
            how = describe_exit(returncode)
        else:
            how = "was not running"
        slot.launch()
        try:
            await slot.ready(sup.ready_timeout)
        except RolloutError:
            # The rollout ends here, the instance stays (and is restarted if it exits, as any
            # worker): the hub must not hold it for good, but use it once it is ready.
            self.nursery.start_soon(functools.partial(self.hub.process.request, "release", proxy=slot.proxy_id,
                                                      instance=slot.instance))
            raise
        hub = self.hub.process  # the one that held it may have died meanwhile and been replaced
        answer = await hub.request("release", proxy=slot.proxy_id, instance=slot.instance)
        if "error" in answer:
            raise RolloutError(f"{slot.name}: the hub cannot release it: {answer['error']}")
        step(f"{slot.name}: generation {slot.generation - 1} {how}; generation {slot.generation} serving")

    # ------------------------------------------------------------ control socket

    async def _serve_control(self) -> None:
        path = self.config.control_socket
        listener = sockets.bind(str(path), mode=0o660)
        await control.serve(listener, self._on_command, group=self.config.supervisor.control_group)

    async def _on_command(self, message: dict, reply: Callable[[dict], None]) -> None:
        command = message.get("command")
        if command == "status":
            reply({"ok": True, "status": self.snapshot()})
        elif command == "reload":
            try:
                await self.rollout(lambda line: reply({"progress": line}))
            except RolloutError as e:
                log.error("reload failed: %s", e)
                reply({"ok": False, "error": str(e)})
            else:
                reply({"ok": True})
        elif command == "stop":
            reply({"ok": True})
            self.request_stop()
        else:
            reply({"ok": False, "error": f"unknown command {command!r} (status, reload, stop)"})

    def snapshot(self) -> dict:
        """Everything `dcod status` shows."""
        rows = [_process_row(slot, slot.process) for slot in self.slots]
        # Other hub generations: one a rollout is starting, older ones draining.
        rows += [_process_row(self.hub, p, state="draining" if p.retiring or p.draining.is_set() else
                              "ready" if p.ready.is_set() else "starting")
                 for p in self.hub.alive if p is not self.hub.process and p.running]
        me = _resources(self._me)
        return {
            "supervisor": {"pid": os.getpid(), "uptime": time.monotonic() - self.started, **me,
                           "config": self.config.source, "advertise": self.config.hub.advertise,
                           "rollout": self.last_rollout or "none yet", "status": self.status_line(),
                           "alerts": self.alerter.stats()},
            "processes": rows,
            "hub": self.hub.process.stats if self.hub.process is not None else {},
        }


def _process_row(slot: Slot, process: Process | None, state: str | None = None) -> dict:
    stats = process.stats if process is not None else {}
    if slot.is_hub:
        proxies = stats.get("proxies", {}).values()
        done = sum(p.get("replies", 0) + p.get("oneway", 0) for p in proxies)
        counts = {"done": done, "inflight": stats.get("inflight", 0),
                  "queued": sum(p.get("queued_now", 0) for p in proxies),
                  "spooled": sum(p.get("spooled_bytes", 0) for p in proxies),
                  "errors": sum(p.get("errors", 0) + p.get("error_replies", 0) for p in proxies)}
    else:
        counts = {"done": stats.get("replies", 0) + stats.get("oneway", 0), "inflight": stats.get("in_flight", 0),
                  "queued": 0, "spooled": 0, "errors": stats.get("errors", 0)}
    running = process is not None and process.running
    return {"name": slot.name, "role": "hub" if slot.is_hub else "worker", "proxy": slot.proxy_id,
            "instance": slot.instance, "pid": process.pid if running else None,
            "generation": process.generation if process is not None else 0,
            "state": state or slot.state, "uptime": process.uptime if running else 0.0,
            **(_resources(process.psutil) if running else {"rss": 0, "cpu_percent": 0.0}),
            **counts, "restarts": slot.restarts, "last_exit": slot.last_exit}


def _resources(proc) -> dict:
    """RSS, and CPU % averaged over the process's life (a snapshot needs no earlier sample)."""
    try:
        with proc.oneshot():
            cpu = proc.cpu_times()
            alive = max(time.time() - proc.create_time(), 1e-3)
            return {"rss": proc.memory_info().rss, "cpu_percent": 100 * (cpu.user + cpu.system) / alive}
    except Exception:  # psutil.Error, or no psutil handle: figures unknown
        return {"rss": 0, "cpu_percent": 0.0}


def hub_listener(config: Config) -> socket.socket:
    """The Oracle-facing socket: from systemd (socket activation), else bound here."""
    passed = sockets.listen_fds()
    if passed:
        sock = passed.get(HUB_SOCKET_NAME) or next(iter(passed.values()))
        # The socket unit decides where the hub listens (ListenStream=), not hub.listen.
        log.info("using the listening socket passed by systemd (%s), on %s; hub.listen (%s) applies only "
                 "without one", ", ".join(passed), sockets.address_of(sock), config.hub.listen)
        return sock
    return sockets.bind(config.hub.listen)


def _raise_open_files_limit() -> None:
    """Each Oracle session is an open file in the hub: take the hard limit, not the soft 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(config: Config) -> int:
    _raise_open_files_limit()
    try:
        claim = rundir.claim(config)  # before anything is touched: refused, it touches nothing
    except rundir.Refused as e:
        log.error("%s", e)
        return 1
    try:
        listener = hub_listener(config)
    except OSError as e:
        log.error("cannot listen on %s: %s", config.hub.listen, e.strerror)
        return 1
    try:
        trio.run(Supervisor(config, listener).run)
    finally:
        claim.release()
    return 0

