"""A rollout (`dcod reload`): what changes, as a pure plan(), and the steps that carry it out.

The steps, in order: re-read the configuration and check what the new processes would meet
(dcod.supervisor.preflight); start the worker instances it adds; start the next hub generation
on the same socket, overlapping the one that serves; once it is ready, retire the previous one
(drain, quit alert, exit); stop the instances the configuration removes; then replace every
other instance in turn, each held in the hub while it is replaced so that no request reaches it.
Unchanged instances are replaced too: a reload brings new code as well as a new configuration.

Until the new hub serves, a failure stops what the rollout started and leaves everything as
it was; after, what was done stays, and the error says what still runs the previous configuration.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import trio

from dcod import config as configuration
from dcod.config import Config
from dcod.hub.spool import SpoolDir
from dcod.net.channel import Command
from dcod.supervisor import alert, preflight
from dcod.supervisor.process import Process, describe_exit, drain_hubs

if TYPE_CHECKING:
    from dcod.supervisor.slot import Slot
    from dcod.supervisor.supervisor import Supervisor

log = logging.getLogger("dcod.supervisor")

Key = tuple[int, int]  # (proxy id, instance)


class RolloutError(Exception):
    """A rollout could not be done; the generation that was serving goes on serving."""


class WorkerSpec(NamedTuple):
    """How a worker instance is started: its name and its command line."""

    name: str
    argv: list[str]


@dataclass(frozen=True)
class Plan:
    """What a rollout does to the worker instances, by (proxy id, instance)."""

    added: tuple[Key, ...]  # only in the new configuration: started before the new hub
    removed: tuple[Key, ...]  # only in the old one: stopped once the new hub serves
    changed: tuple[Key, ...]  # in both, started differently: another command, or another configuration to read
    kept: tuple[Key, ...]  # in both, started as before (replaced all the same: a reload brings new code)
    replaced: tuple[Key, ...]  # changed and kept together, in the new configuration's order: the replacement order


def plan(old: Mapping[Key, WorkerSpec], new: Mapping[Key, WorkerSpec]) -> Plan:
    """Compare the worker instances that run (``old``) with those a configuration asks for (``new``)."""
    replaced = tuple(key for key in new if key in old)
    return Plan(
        added=tuple(key for key in new if key not in old),
        removed=tuple(key for key in old if key not in new),
        changed=tuple(key for key in replaced if new[key] != old[key]),
        kept=tuple(key for key in replaced if new[key] == old[key]),
        replaced=replaced,
    )


async def load(sup: Supervisor) -> Config:
    """The configuration a reload rolls out: the file the one in effect came from, read again, and
    checked for all that the new processes would meet (dcod.supervisor.preflight, in a thread: it
    waits for its children) but the directories and the listen address, which stay as they are;
    RolloutError, listing every problem, if it fails."""
    config = sup.config
    source = None if config.source == configuration.BUILTIN else config.source
    try:
        new = configuration.load(source)
        await trio.to_thread.run_sync(
            functools.partial(
                preflight.check,
                new,
                lambda proxy: sup._argv(new, "worker", "--proxy", str(proxy.id), "--check"),
                host=False,
                unit=preflight.own_service(),
            )
        )
    except configuration.ConfigError as e:
        errors = e.errors
        listed = f" {errors[0]}" if len(errors) == 1 else "".join(f"\n  {line}" for line in errors)
        raise RolloutError(f"invalid configuration, nothing changed:{listed}") from None
    # Some settings belong to the supervisor's own start; say so rather than pretend.
    if new.hub.listen != config.hub.listen:
        log.warning("hub.listen changed: the listening socket is kept; restart the service to apply it")
    if (new.runtime_dir, new.state_dir) != (config.runtime_dir, config.state_dir):
        log.warning("runtime_dir or state_dir changed: restart the service to apply it")
    return new


class Rollout:
    """Carries out one rollout on a supervisor: replaces the hub, then each worker instance.

    ``step(line)`` reports each step as it is done (to `dcod reload` and sd_notify's STATUS).
    """

    def __init__(self, supervisor: Supervisor, step: Callable[[str], None]) -> None:
        self.sup = supervisor
        self.step = step

    async def run(self) -> None:
        """Raises RolloutError, whose message says what stays: before the new hub serves, nothing
        changed; after, what was done (the new configuration is in effect)."""
        sup, step = self.sup, self.step
        new = await load(sup)
        new_slots = sup.worker_slots(new)
        todo = plan({key: WorkerSpec(slot.name, slot.argv) for key, slot in sup.workers.items()}, new_slots)
        step(
            f"configuration {new.source}: proxies {', '.join(str(p.id) for p in new.proxies) or 'none'}; "
            f"{len(new_slots)} worker instances ({len(todo.added)} added, {len(todo.removed)} removed, "
            f"{len(todo.changed)} changed, {len(todo.kept)} unchanged)"
        )
        if new.metrics.listen != sup.config.metrics.listen:  # bound at the start (dcod.supervisor.metrics)
            step(
                f"metrics.listen changed to {new.metrics.listen or 'none'}: the endpoint stays on "
                f"{sup.config.metrics.listen or 'none'} until the service restarts"
            )
        # Until the new hub serves, the previous configuration is in effect: a failure before that
        # stops what this rollout started, and leaves everything as it was.
        try:
            for key in todo.added:
                slot = sup.add_worker(new, key, *new_slots[key])
                slot.launch()
                await slot.ready(new.supervisor.ready_timeout)
                step(f"{slot.name}: added, ready")
            hub_argv = sup._argv(new, "hub")
            hub = await self._start_hub(hub_argv, new)
        except RolloutError as e:
            for slot in [sup.workers[key] for key in todo.added if key in sup.workers]:
                await sup.remove_worker(slot)
                step(f"{slot.name}: stopped, not added")
            raise RolloutError(f"{e}; nothing changed: the previous configuration stays in effect") from None
        # The new hub serves: the new configuration is in effect, for every process started from
        # now on. A failure from here on keeps what was done, and says what still runs the previous one.
        old, previous_config = sup.hub.process, sup.config
        removed_proxies = sorted({p.id for p in sup.config.proxies} - {p.id for p in new.proxies})
        sup.config = new
        sup.hub.argv, sup.hub.process, sup.hub.state = hub_argv, hub, "ready"
        previous = {key: sup.workers[key].process for key in todo.replaced}
        for key in todo.replaced:
            sup.workers[key].name, sup.workers[key].argv = new_slots[key]
        await self._retire_hub(old, previous_config, removed_proxies)
        if new.alert != previous_config.alert:
            await self._use_alert_settings(new)
        for key in todo.removed:
            slot = sup.workers[key]
            await sup.remove_worker(slot)
            step(f"{slot.name}: removed")
        for proxy_id in removed_proxies:
            self._set_aside_queue(new, proxy_id)
        try:
            for key in todo.replaced:
                await self._replace_worker(sup.workers[key])
        except RolloutError as e:
            left = [sup.workers[key].name for key in todo.replaced if sup.workers[key].process is previous[key]]
            raise RolloutError(
                f"{e}; the new configuration stays in effect (the hub runs it, as will every "
                f"process started from now on)"
                + (f"; still running the previous one: {', '.join(left)}" if left else "")
            ) from None

    def _set_aside_queue(self, config: Config, proxy_id: int) -> None:
        """A removed proxy's requests that the retired hub left queued: kept aside, under a name no
        proxy added later with that id takes over, and said where."""
        spools = SpoolDir(
            config.state_dir / "spool", memory_limit=0, size_limit=config.hub.spool_max, max_record=config.hub.max_pdu
        )
        try:
            aside = spools.set_aside(proxy_id)
        except OSError as e:
            self.step(f"proxy {proxy_id}: removed; its queue could not be set aside: {e}")
            return
        finally:
            spools.close()
        for path, records in aside:
            self.step(f"proxy {proxy_id}: removed with {records} requests queued; kept in {path}")

    async def _start_hub(self, argv: list[str], config: Config) -> Process:
        """The next hub generation, run by ``argv`` with ``config``, on the same socket, once it is ready.

        Until then the one serving stays the slot's process (the pmon watches it; if it dies, it
        is restarted as it was); if the new one is not ready in time, it is stopped."""
        hub = self.sup.hub
        new = hub.spawn(argv)
        self.step(f"hub: generation {new.generation} (pid {new.pid}) starting")
        try:
            await hub.ready(config.supervisor.ready_timeout, new)
        except RolloutError:
            new.retiring = True
            await new.stop(config.supervisor.stop_timeout)
            self.step(f"hub: generation {new.generation} stopped")
            raise
        return new

    async def _retire_hub(self, old: Process, served: Config, removed_proxies: list[int]) -> None:
        """The hub generation that served until now drains (the new one serves), and the alert is
        raised as its sessions know it: with the settings and address it ``served`` with. It answers
        the sync requests queued for the proxies the reload removes, and says how many in the
        heartbeat it sends before it says it is draining."""
        sup, step = self.sup, self.step
        step(f"hub: generation {sup.hub.process.generation} ready; generation {old.generation} draining")
        old.retiring = True

        async def alert_sessions() -> None:
            await sup.alerter.signal(served.hub.advertise)
            step(f"quit alert {served.alert.name} raised for {served.hub.advertise}")

        exits = await drain_hubs([old], alert_sessions, sup.config.supervisor, removed_proxies)
        for proxy_id in removed_proxies:
            answered = old.stats.get("proxies", {}).get(str(proxy_id), {}).get("drained", 0)
            if answered:
                step(f"proxy {proxy_id}: removed; {answered} sync requests queued for it answered with DCO-0005")
        for hub, returncode in exits.items():
            step(f"hub: generation {hub.generation} (pid {hub.pid}) drained, {describe_exit(returncode)}")

    async def _use_alert_settings(self, config: Config) -> None:
        """From now on, hubs that go away are announced with ``config``'s [alert] settings."""
        previous, self.sup.alerter = self.sup.alerter, alert.Alerter.from_config(config)
        await previous.aclose()
        self.step(f"quit alert: {config.alert.name} on {', '.join(config.alert.backends)} from now on")

    async def _replace_worker(self, slot: Slot) -> None:
        """Hold the instance in the hub, let its replies come in, restart it, release it."""
        sup = self.sup
        limits = sup.config.supervisor
        hub = sup.hub.process
        if hub is None or not hub.running:
            raise RolloutError(f"{slot.name}: no hub is running to hold it")
        answer = await hub.request(Command.HOLD, proxy=slot.proxy_id, instance=slot.instance)
        if "error" in answer:
            raise RolloutError(f"{slot.name}: the hub cannot hold it: {answer['error']}")
        old = slot.process
        if old is not None and old.running:
            old.retiring = True
            how = describe_exit(await old.stop(limits.stop_timeout))
        else:
            how = "was not running"
        slot.launch()
        try:
            await slot.ready(limits.ready_timeout)
        except RolloutError:
            # The rollout ends here, the instance stays (and is restarted if it exits, as any
            # worker): the hub, which holds it already, goes on holding it, as any instance that is
            # down, until it is ready (Slot.release).
            slot.held = True
            raise
        hub = sup.hub.process  # the one that held it may have died meanwhile and been replaced
        answer = await hub.request(Command.RELEASE, proxy=slot.proxy_id, instance=slot.instance)
        if "error" in answer:
            raise RolloutError(f"{slot.name}: the hub cannot release it: {answer['error']}")
        self.step(f"{slot.name}: generation {slot.generation - 1} {how}; generation {slot.generation} serving")
