"""The supervisor: `dcod run`, the service's main process (docs/ARCHITECTURE.md).

It owns every listening socket: the Oracle-facing one (from systemd, else bound here)
and one per managed worker instance. Children inherit them, so a restarted child serves
on the same socket and no connection attempt is ever refused. Each child sits in a slot
(dcod.supervisor.slot) that restarts it with backoff when it fails, within a restart budget.

A rollout (`dcod reload`, dcod.supervisor.rollout) replaces the hub first, overlapping
generations on the same socket, then each worker instance in turn; the pmon raises the quit
alert whenever a hub goes away, planned or not, so Oracle sessions reconnect before their next send.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable

import psutil
import trio

from dcod import __version__, fs
from dcod import config as configuration
from dcod.config import Config
from dcod.hub import deadletter
from dcod.net import sockets
from dcod.net.channel import Control, StatusCounts, command_of
from dcod.supervisor import control, metrics, reexec, rundir
from dcod.supervisor.alert import Alerter
from dcod.supervisor.notify import Notifier
from dcod.supervisor.process import Process, dcod_command, describe_exit, drain_hubs
from dcod.supervisor.rollout import Key, Rollout, RolloutError, WorkerSpec
from dcod.supervisor.slot import Slot

log = logging.getLogger("dcod.supervisor")

HUB_SOCKET_NAME = "hub"  # FileDescriptorName= in dco-hub.socket
UNCLEAN_MARKER = "hub.running"  # in state_dir while a hub runs; left behind by an unclean stop
ALERT_HEAD_START = 0.2  # seconds the quit alert may take before a new hub is started anyway
CONFIG_COPIES = "config-*.toml"  # in the runtime dir: the configurations the children read (_config_copy)
CONTROL_LAST_ANSWERS = 1.0  # seconds control clients get to read their last answers before the supervisor exits
WAITING_REPORT_INTERVAL = 1.0  # seconds between the stop's reports of what it still waits for


class Supervisor:
    """The service's main process: the slots of the hub and of each worker instance, the pmon,
    the control socket, rollouts (dcod.supervisor.rollout) and the orderly stop."""

    def __init__(
        self,
        config: Config,
        hub_listener: socket.socket,
        metrics_listener: socket.socket | None = None,
        handover: reexec.Handover | None = None,
    ) -> None:
        """``handover``: what the previous image of this process left to take over (`dcod reload --upgrade`)."""
        self.config = config
        self.hub_listener = hub_listener
        self.metrics_listener = metrics_listener  # [metrics] listen, bound at the start: kept until we exit
        self.notifier = Notifier()
        self.alerter = Alerter.from_config(config)
        self.started = time.monotonic()
        self.handover = handover
        self.reexecs = 0  # upgrades in place (dcod.supervisor.reexec), and the latest one's wall time
        self.last_reexec: float | None = None
        self.claim: rundir.Claim | None = None  # the locks on our directories (main())
        self.control_listener: socket.socket | None = None
        self.workers: dict[Key, Slot] = {}
        self.runtime_dir = config.runtime_dir  # ours until a restart, whatever a reload says
        if handover is None:
            for stale in self.runtime_dir.glob(CONFIG_COPIES):  # a previous run's; its children are gone with it
                stale.unlink()
        self.hub = Slot(self, "hub", self._argv(config, "hub"), {HUB_SOCKET_NAME: hub_listener})
        self.rollout_lock = trio.Lock()
        self._rollout: trio.CancelScope | None = None  # of the rollout under way
        self.last_rollout: dict | None = None  # the latest rollout, for `dcod status`: see rollout()
        self.nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self._stopped = trio.Event()  # every child has exited: the supervisor is about to exit
        self._stop_watchers: list[Callable[[str], None]] = []  # `dcod stop` clients: each step of the stop
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

    def worker_slots(self, config: Config) -> dict[Key, WorkerSpec]:
        """Every managed worker instance in a config, by (proxy id, instance)."""
        slots = {}
        for proxy in config.proxies:
            if proxy.managed:
                for i in range(proxy.instances):
                    argv = list(proxy.command) or self._argv(
                        config, "worker", "--proxy", str(proxy.id), "--instance", str(i)
                    )
                    slots[proxy.id, i] = WorkerSpec(f"worker {proxy.id}#{i}", argv)
        return slots

    def add_worker(self, config: Config, key: Key, name: str, argv: list[str]) -> Slot:
        sock = sockets.bind(str(config.worker_socket(*key)))
        slot = self.workers[key] = Slot(self, name, argv, {"worker": sock}, *key)
        return slot

    async def remove_worker(self, slot: Slot) -> None:
        """Stop the instance, then give up its socket, on which nothing will be started again (and
        its path, which add_worker made under the runtime dir)."""
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

    def notify_reloading(self, *lines: str) -> None:
        """RELOADING=1, with the MONOTONIC_USEC systemd wants with it, and ``lines``; READY=1 ends it."""
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}", *lines)

    # ------------------------------------------------------------ life cycle

    async def run(self) -> None:
        if self.handover is None:
            listener = sockets.bind(str(self.config.control_socket), mode=0o660)
        else:
            listener = self.handover.control_listener()
        self.control_listener = listener
        control_server = control.ControlServer(listener, self._on_command, group=self.config.supervisor.control_group)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            reexec.unblock_signals()  # blocked across an upgrade's exec: received from now on
            # The control socket outlives the rest: `dcod stop` gets its last answer once all is done.
            async with trio.open_nursery() as outer:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(self.notifier.run)
                    if self.handover is None:
                        await self._check_unclean_stop()
                        for key, (name, argv) in self.worker_slots(self.config).items():
                            self.add_worker(self.config, key, name, argv).launch()
                        self.hub.launch()
                        self._mark_hub_running()
                        nursery.start_soon(self._announce_ready)
                    else:
                        # The children of the previous image, then its upgrade's rollout, which
                        # holds the rollout lock before any command is taken.
                        self.handover.adopt(self)
                        await nursery.start(self.handover.finish, self)
                    outer.start_soon(control_server.serve)
                    nursery.start_soon(self._pmon)
                    nursery.start_soon(self._watchdog)
                    nursery.start_soon(self._on_signals, signals)
                    if self.metrics_listener is not None:
                        nursery.start_soon(metrics.MetricsServer(self.metrics_listener, self.snapshot).serve)
                    await self._stop.wait()
                    self.notify("STOPPING=1", "STATUS=stopping: draining the hub")
                    await self._stop_children()
                    await self.notifier.flush()
                    nursery.cancel_scope.cancel()
                await self.alerter.aclose()
                (self.config.state_dir / UNCLEAN_MARKER).unlink(missing_ok=True)
                log.info("stopped")
                self._stopped.set()
                await control_server.close(CONTROL_LAST_ANSWERS)

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
        line = (
            f"serving on {self.config.hub.advertise}: hub generation {serving} {self.hub.state}, "
            f"{ready}/{len(states)} worker instances ready"
        )
        failed = [s.name for s in self.slots if s.state == "failed"]
        return line + (f"; DOWN: {', '.join(failed)}" if failed else "")

    async def _stop_children(self) -> None:
        """Every hub generation alive first, then the workers together; each step reported (_stop_step).

        Besides the slot's current hub, a rollout may have others alive: the generation it is
        replacing, which serves every session until the new one is ready; a new one it is
        stopping; older ones draining. Each serves sessions and forwards their requests to the
        workers: each drains, and is gone, before a worker is stopped.
        """
        self.hub.stopping = True  # what ends now ends by the stop: not a failure, not "replaced"
        if self._rollout is not None:
            self._rollout.cancel()  # no new generation may start now
        hubs = [hub for hub in self.hub.alive if hub.running]
        for hub in hubs:
            hub.retiring = True  # it may drain and exit before we wait for it: planned
            self._stop_step(f"{_label(hub)} draining")
        # No generation starts from now on: our copy of the listening socket would only keep the
        # kernel accepting sessions that the alert sends elsewhere into a backlog nobody serves.
        # (Under systemd the socket unit holds it too, and starts the service again on the next
        # connection: stop dco-hub.socket to take a host out of rotation.)
        self.hub_listener.close()
        advertise = self.config.hub.advertise

        async def alert_sessions() -> None:
            await self.alerter.signal(advertise)
            self._stop_step(f"quit alert {self.config.alert.name} raised for {advertise}")

        async with self._reporting_waits(hubs):
            exits = await drain_hubs(hubs, alert_sessions, self.config.supervisor)
        for hub, returncode in exits.items():
            if hub is self.hub.process:  # Slot._watch reports the end of older generations
                log.info("hub (pid %d) %s", hub.pid, describe_exit(returncode))
            self._stop_step(f"{_label(hub)} {describe_exit(returncode)}")
        workers = [slot.process for slot in self.workers.values() if slot.process is not None and slot.process.running]
        self.notify("STATUS=stopping: workers")
        self._stop_step("workers stopping: " + (", ".join(map(_label, workers)) or "none running"))

        async def stop_worker(slot: Slot) -> None:
            process = slot.process
            returncode = await slot.stop(self.config.supervisor.stop_timeout)
            if returncode is not None:
                self._stop_step(f"{_label(process)} {describe_exit(returncode)}")

        async with self._reporting_waits(workers), trio.open_nursery() as nursery:
            for slot in self.workers.values():
                nursery.start_soon(stop_worker, slot)
        self._stop_step("every process has exited; the supervisor exits")

    def _stop_step(self, line: str) -> None:
        """A step of the stop: to each `dcod stop` waiting for it, and to systemd's STATUS."""
        self.notify(f"STATUS=stopping: {line}")
        for watcher in self._stop_watchers:
            watcher(line)

    @contextlib.asynccontextmanager
    async def _reporting_waits(self, processes: list[Process]):
        """While the body waits for ``processes`` to exit, report every WAITING_REPORT_INTERVAL what each
        still has, as its heartbeats say."""

        async def report() -> None:
            while True:
                await trio.sleep(WAITING_REPORT_INTERVAL)
                for p in processes:
                    if p.running:
                        sessions = p.stats.get("sessions", 0)  # a hub's: its sessions yet to reconnect
                        self._stop_step(
                            f"waiting for {_count(p.counts.inflight, 'request')} on {_label(p)}"
                            + (f", {_count(sessions, 'session')} connected" if sessions else "")
                        )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(report)
            yield
            nursery.cancel_scope.cancel()

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
        """A child whose heartbeats stop for heartbeat_timeout is hung: killed (the hub after the
        quit alert), then restarted by its slot as any failed child. Foreign workers send none."""
        sup = self.config.supervisor
        tick = sup.heartbeat_interval / 2
        last_look = time.monotonic()
        while True:
            await trio.sleep(tick)
            now = time.monotonic()
            if now - last_look > 2 * tick + sup.heartbeat_interval:
                # We did not run for a while ourselves (SIGSTOPped, starved): the children's heartbeats
                # may be waiting unread in our sockets. Judge once we have read them.
                last_look = now
                continue
            last_look = now
            for slot in self.slots:
                process = slot.process
                # An alerted hub was told to drain: drain_hubs() kills it if it takes too long.
                if slot.foreign or process is None or not process.running or process.retiring or process.hung:
                    continue
                if process.alerted:
                    continue
                silent = now - process.last_heartbeat
                # Before its first heartbeat a child is starting (imports, spool adoption, a handler's
                # init()): it gets ready_timeout for that, heartbeat_timeout between heartbeats.
                if silent <= (sup.heartbeat_timeout if process.heartbeats else sup.ready_timeout):
                    continue
                process.hung = True
                why = f"{slot.name} (pid {process.pid}) sent no heartbeat for {silent:.1f}s (hung)"
                if slot.is_hub:
                    process.alerted = True
                    await self.alert_hub_gone(why)
                else:
                    log.error("%s: killing it", why)
                process.send_signal(signal.SIGKILL)

    async def _check_unclean_stop(self) -> None:
        marker = self.config.state_dir / UNCLEAN_MARKER
        if marker.exists():
            log.warning("the previous run did not stop cleanly (%s exists)", marker)
            await self.alert_hub_gone("unclean stop of the previous run")

    def _mark_hub_running(self) -> None:
        marker = self.config.state_dir / UNCLEAN_MARKER
        try:
            fs.write_atomically(marker, f"{os.getpid()} {self.config.hub.advertise}\n".encode())
        except OSError as e:  # a full or read-only disk must not keep the service down
            log.warning(
                "%s: cannot be written (%s): if this run does not stop cleanly, the next one will not know "
                "to raise the quit alert",
                marker,
                e.strerror,
            )

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

    async def rollout(self, progress: Callable[[str], None], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Re-read the config and replace the hub, then each worker instance, one
        rollout at a time, reporting each step to ``progress`` and sd_notify.
        Started (``task_status``) once it holds the rollout lock.

        Raises RolloutError, whose message says what stays: before the new hub serves, nothing
        changed; after, what was done (the new configuration is in effect).
        """
        if self._stop.is_set():
            raise RolloutError("the service is stopping")
        if self.rollout_lock.locked():
            since = time.strftime("%H:%M:%S", time.localtime(self.last_rollout["started"]))
            raise RolloutError(f"a rollout is already running (since {since}); try again when it is done")
        async with self.rollout_lock:
            task_status.started()
            started = time.monotonic()
            self.last_rollout = {"state": "running", "started": time.time(), "seconds": None, "error": None}

            def step(line: str) -> None:
                self.notify(f"STATUS=reload: {line}")
                progress(line)

            self.notify_reloading()
            try:
                with trio.CancelScope() as self._rollout:
                    await Rollout(self, step).run()
                if self._rollout.cancelled_caught:
                    raise RolloutError("the service is stopping")
            except RolloutError as e:
                self.last_rollout.update(state="failed", seconds=time.monotonic() - started, error=str(e))
                raise
            finally:
                self.notify("READY=1", f"STATUS={self.status_line()}")
            self.last_rollout.update(state="done", seconds=time.monotonic() - started)
            step(f"done in {time.monotonic() - started:.1f}s")

    # ------------------------------------------------------------ control socket

    async def _on_command(self, message: dict, reply: Callable[[dict], None]) -> None:
        command = command_of(message)
        if command == Control.STATUS:
            reply({"ok": True, "status": self.snapshot()})
        elif command == Control.RELOAD:
            try:
                await self.rollout(lambda line: reply({"progress": line}))
            except RolloutError as e:
                log.error("reload failed: %s", e)
                reply({"ok": False, "error": str(e)})
            else:
                reply({"ok": True})
        elif command == Control.UPGRADE:
            await reexec.upgrade(self, reply)  # answered by the next image if it happens
        elif command == Control.DEAD_LETTERS:
            operate = functools.partial(
                deadletter.operate, self.config, message.get("action"), message.get("proxy"), message.get("ids")
            )
            reply(await trio.to_thread.run_sync(operate))
        elif command == Control.STOP:
            # Each step of the stop, and its end: answered just before we exit.
            self._stop_watchers.append(lambda line: reply({"progress": line}))
            self.request_stop()
            await self._stopped.wait()
            reply({"ok": True})
        else:
            reply({"ok": False, "error": f"unknown command {command!r} ({', '.join(Control)})"})

    def snapshot(self) -> dict:
        """Everything `dcod status` shows, as data: null where a value is absent, wall times in seconds
        since the epoch."""
        rows = [_process_row(slot, slot.process) for slot in self.slots]
        # Other hub generations: one a rollout is starting, older ones draining.
        rows += [
            _process_row(
                self.hub,
                p,
                state="draining" if p.retiring or p.draining.is_set() else "ready" if p.ready.is_set() else "starting",
            )
            for p in self.hub.alive
            if p is not self.hub.process and p.running
        ]
        me = _resources(self._me)
        return {
            "supervisor": {
                "pid": os.getpid(),
                "version": __version__,
                "reexecs": self.reexecs,
                "last_reexec": self.last_reexec,
                "uptime": time.monotonic() - self.started,
                **me,
                "config": self.config.source,
                "advertise": self.config.hub.advertise,
                "rollout": self.last_rollout,
                "status": self.status_line(),
                "alerts": self.alerter.stats(),
            },
            "processes": rows,
            "hub": self.hub.process.stats if self.hub.process is not None else None,
        }


def _label(process: Process) -> str:
    """Like "hub generation 3 (pid 4711)", "worker 1#0 generation 2 (pid 4712)"."""
    return f"{process.name} generation {process.generation} (pid {process.pid})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


UNKNOWN_RESOURCES = {"rss": None, "cpu_percent": None, "cpu_seconds": None}


def _process_row(slot: Slot, process: Process | None, state: str | None = None) -> dict:
    running = process is not None and process.running
    return {
        "name": slot.name,
        "role": "hub" if slot.is_hub else "worker",
        "proxy": slot.proxy_id,
        "instance": slot.instance,
        "pid": process.pid if running else None,
        "generation": process.generation if process is not None else None,
        "version": process.version if running else None,
        "state": state or slot.state,
        "uptime": process.uptime if running else None,
        **(_resources(process.psutil) if running else UNKNOWN_RESOURCES),
        **dataclasses.asdict(process.counts if process is not None else StatusCounts()),
        "restarts": slot.restarts,
        "failures": len(slot.failures),
        "last_exit": dataclasses.asdict(slot.last_exit) if slot.last_exit is not None else None,
    }


def _resources(proc) -> dict:
    """RSS, CPU seconds, and CPU % averaged over the process's life (a snapshot needs no earlier sample)."""
    try:
        with proc.oneshot():
            cpu = proc.cpu_times()
            seconds = cpu.user + cpu.system
            alive = max(time.time() - proc.create_time(), 1e-3)
            return {"rss": proc.memory_info().rss, "cpu_percent": 100 * seconds / alive, "cpu_seconds": seconds}
    except Exception:  # psutil.Error, or no psutil handle: figures unknown
        return UNKNOWN_RESOURCES


def hub_listener(config: Config) -> socket.socket:
    """The Oracle-facing socket: from systemd (socket activation), else bound here."""
    passed = sockets.listen_fds()
    if passed:
        sock = passed.get(HUB_SOCKET_NAME) or next(iter(passed.values()))
        # The socket unit decides where the hub listens (ListenStream=), not hub.listen.
        log.info(
            "using the listening socket passed by systemd (%s), on %s; hub.listen (%s) applies only without one",
            ", ".join(passed),
            sockets.address_of(sock),
            config.hub.listen,
        )
        return sock
    return sockets.bind(config.hub.listen)


def _raise_open_files_limit() -> None:
    """Each Oracle session is an open file in the hub: take the hard limit, not the soft 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(config: Config) -> int:
    if reexec.CHECK_VAR in os.environ:
        return reexec.check(config)
    try:
        handover = reexec.Handover.received()
    except ValueError as e:
        log.error("%s", e)
        return 1
    _raise_open_files_limit()
    if handover is not None:  # an upgrade in place: our directories, sockets and children are the previous image's
        claim = handover.claim()
        listener = handover.hub_listener()
        metrics_listener = handover.metrics_listener()
        config = handover.config(config)
    else:
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
            metrics_listener = metrics.bind(config)
        except configuration.ConfigError as e:
            log.error("%s", e)
            return 1
    try:
        supervisor = Supervisor(config, listener, metrics_listener, handover)
        supervisor.claim = claim
        trio.run(supervisor.run)
    finally:
        claim.release()
    return 0
