"""What the processes under load cost: CPU time, wake-ups and RSS of each, sampled with psutil at both ends
of the window; the hub's counters; the size of the spool."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import psutil

from dcod.bench.target import BenchError
from dcod.config import Config
from dcod.supervisor import control


def role_of(cmdline: list[str]) -> str:
    """What a process is, from its command line: "supervisor", "hub", "worker 1#0", else its program."""
    words = next((cmdline[i + 1 :] for i, word in enumerate(cmdline) if os.path.basename(word) == "dcod"), [])
    command = next((w for w in words if not w.startswith("-")), None)
    if command == "run":
        return "supervisor"
    if command == "worker":
        options = dict(zip(words, words[1:]))
        return f"worker {options.get('--proxy', '?')}#{options.get('--instance', '0')}"
    if command is not None:
        return command
    return os.path.basename(cmdline[0]) if cmdline else "?"


@dataclass
class Measured:
    """One process whose CPU time (user, system) and wake-ups are sampled at both ends of the
    window, and its RSS when idle (before any load) and at the end of the window (under load)."""

    role: str
    process: psutil.Process
    before: tuple[float, float, int] | None = None  # user s, system s, wake-ups
    after: tuple[float, float, int] | None = None
    rss: int | None = None
    rss_idle: int | None = None
    note: str = ""  # "new": started during the window (a restart); "exited": gone before its end

    def sample(self, end: bool) -> None:
        try:
            with self.process.oneshot():
                times = self.process.cpu_times()
                # A voluntary context switch is the process going to sleep: once per wake-up.
                sample = (times.user, times.system, self.process.num_ctx_switches().voluntary)
                if end:
                    self.after, self.rss = sample, self.process.memory_info().rss
                else:
                    self.before = sample
        except psutil.NoSuchProcess:
            self.note = "exited"  # a restart: its figures stay unknown

    def sample_idle(self) -> None:
        self.rss_idle = self.current_rss()

    def current_rss(self) -> int | None:
        try:
            return self.process.memory_info().rss
        except psutil.NoSuchProcess:
            return None

    @property
    def cpu(self) -> float | None:
        """User + system seconds in the window."""
        return None if self.system is None else self.after[0] - self.before[0] + self.system

    @property
    def system(self) -> float | None:
        """System (kernel) seconds in the window: sockets and scheduling, as opposed to Python code."""
        if self.before is None or self.after is None:
            return None
        return self.after[1] - self.before[1]

    @property
    def wakeups(self) -> int | None:
        """Times the process slept and was woken in the window: the fewer per request, the bigger
        its batches (each wake-up costs a context switch and caches filled by other processes)."""
        if self.before is None or self.after is None:
            return None
        return self.after[2] - self.before[2]


def _process_tree(pids: tuple[int, ...]) -> dict[int, psutil.Process]:
    """The processes with these pids and all their descendants, by pid."""
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            for p in [process, *process.children(recursive=True)]:
                found[p.pid] = p
        except psutil.NoSuchProcess:
            raise BenchError(f"no process {pid}") from None
    return found


def _measured(processes, **fields) -> list[Measured]:
    measured = []
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            measured.append(Measured(role_of(p.cmdline()), p, **fields))
    return measured


def dcod_processes(pids: tuple[int, ...]) -> list[Measured]:
    """The processes with these pids and all their descendants, each once, with their roles."""
    return _measured(_process_tree(pids).values())


def newcomers(pids: tuple[int, ...], known: list[Measured]) -> list[Measured]:
    """Processes of the tree started since ``known`` was listed (a reload, a restart): all their CPU
    time and wake-ups are in the window."""
    pids_known = {m.process.pid for m in known}
    started = [p for pid, p in _process_tree(pids).items() if pid not in pids_known]
    return _measured(started, before=(0.0, 0.0, 0), note="new")


def the_hub(supervisor_pid: int) -> psutil.Process:
    """The hub process of a `dcod run`: its one child with the role "hub"."""
    hubs = [m.process for m in dcod_processes((supervisor_pid,)) if m.role == "hub"]
    if len(hubs) != 1:
        raise BenchError(f"`dcod run` (pid {supervisor_pid}) has {len(hubs)} hub processes, not one")
    return hubs[0]


def hub_stats(config: Config) -> dict:
    """The hub's counters as `dcod status` shows them (from its last heartbeat)."""
    answer = next(control.request(config.control_socket, {"command": "status"}, timeout=10), {})
    return answer.get("status", {}).get("hub") or {}  # null before the first hub starts


def spool_bytes(config: Config, proxy_id: int) -> int:
    """The size of a proxy's spool files (``proxy-<id>.spool``, or one ``proxy-<id>.<hub pid>.spool`` per hub)."""
    directory = config.state_dir / "spool"
    total = 0
    for path in [*directory.glob(f"proxy-{proxy_id}.spool"), *directory.glob(f"proxy-{proxy_id}.*.spool")]:
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total
