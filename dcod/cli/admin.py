"""`dcod status`, `dcod reload`, `dcod stop`, `dcod dead-letters`: the supervisor's control socket,
for operators.

`status` is a table in the spirit of Tuxedo's `tmadmin psr`/`pq`: every process with its
generation, state and counters, then the hub's totals per proxy, then what is degraded; its
exit status says whether all is up (0) or not (3), as `systemctl status` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import time

from dcod.config import Config
from dcod.net.channel import Control, command
from dcod.supervisor import control
from dcod.supervisor.process import describe_exit

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 3
EXIT_DEGRADED = 3  # as `systemctl status` and supervisorctl say a unit or program is not running well
EXIT_RESTART = 4  # `reload --upgrade`: not in place; a restart runs the new code


@contextlib.contextmanager
def _connected(config: Config, timeout: float | None = None, *, or_none: bool = False):
    """A ControlClient connected to the supervisor; SystemExit with a clear message if unreachable
    (``or_none``: None if no supervisor is running)."""
    path = config.control_socket
    try:
        client = control.ControlClient(path, timeout=timeout)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        if not or_none:
            why = f"no control socket {path}" if isinstance(e, FileNotFoundError) else f"nobody listens on {path}"
            raise _unreachable(f"no supervisor is running ({why})") from None
        client = None
    except PermissionError:
        raise _unreachable(
            f"permission denied on {path}: run as root or as a member of group {config.supervisor.control_group}"
        ) from None
    if client is None:
        yield None
        return
    with client:
        yield client


@contextlib.contextmanager
def _going_on_if_interrupted(what: str):
    """Ctrl-C ends our waiting, not the supervisor's work: say so, and exit 130 as shells expect."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"dcod: interrupted: the {what} goes on in the supervisor (`dcod status` shows it)", file=sys.stderr)
        raise SystemExit(130) from None


def _unreachable(message: str) -> SystemExit:
    print(f"dcod: {message}", file=sys.stderr)
    return SystemExit(EXIT_UNREACHABLE)


def _final(answer: dict) -> int:
    if answer.get("ok"):
        return EXIT_OK
    print(f"dcod: {answer.get('error', 'failed')}", file=sys.stderr)
    return EXIT_FAILED


def status(config: Config, *, as_json: bool = False) -> int:
    """0 if everything is up, 3 if something is degraded (problems()) or no supervisor answers."""
    with _connected(config, timeout=10) as client:
        answer = next(client.ask(command(Control.STATUS)), {})
    if not answer.get("ok"):
        return _final(answer)
    found = problems(answer["status"])
    if as_json:
        print(json.dumps({**answer["status"], "problems": found}, indent=2))
    else:
        print(render_status(answer["status"]))
    return EXIT_DEGRADED if found else EXIT_OK


def problems(status: dict) -> list[str]:
    """What is degraded: a process restarting after a failure or left down, a worker instance the
    hub is not connected to (unless held for a rollout), a queue that cannot write to disk, a quit-alert
    backend whose last attempt failed."""
    found = [f"{p['name']} {p['state']}" for p in status["processes"] if p["state"] in ("backoff", "failed")]
    for proxy_id, proxy in sorted((status.get("hub") or {}).get("proxies", {}).items(), key=lambda kv: int(kv[0])):
        found += [
            f"proxy {proxy_id} instance {proxy_id}#{i['index']} ({i['address']}) {i['state']}"
            for i in proxy["instances"]
            if i["state"] != "up" and not i["held"]
        ]
        if proxy.get("durable") is False:
            found.append(
                f"proxy {proxy_id} queue not durable ({proxy['not_durable_reason']}): "
                f"{proxy['memory_only']} requests held in memory only"
            )
    for backend, stats in status["supervisor"].get("alerts", {}).items():
        failed, sent = stats["last_failed"], stats["last_sent"]
        if failed is not None and (sent is None or failed > sent):
            found.append(f"quit alert backend {backend} failing: {stats['last_error']}")
    return found


def dead_letters(
    config: Config, action: str, proxy_id: int | None, ids: list[int] | None, *, as_json: bool = False
) -> int:
    """List, retry or drop dead letters (dcod.hub.deadletter.operate): through the supervisor, else,
    when none runs, on the files directly. 1 if an id asked for is not there or the change failed."""
    with _connected(config, timeout=60, or_none=True) as client:
        if client is not None:
            answer = next(client.ask(command(Control.DEAD_LETTERS, action=action, proxy=proxy_id, ids=ids)), {})
        else:  # no supervisor: nobody else writes them
            from dcod.hub import deadletter

            answer = deadletter.operate(config, action, proxy_id, ids)
    if not answer.get("ok"):
        return _final(answer)
    letters = answer["letters"]
    if as_json:
        print(json.dumps(letters, indent=2))
    elif action == "list":
        print(render_dead_letters(letters) if letters else "no dead letters")
    elif letters:
        done = "queued again" if action == "retry" else "dropped"
        numbers = ", ".join(str(d["id"]) for d in letters)
        print(f"proxy {proxy_id}: {_count(len(letters), 'dead letter')} {done}: {numbers}")
    for missing in answer.get("missing", ()):
        print(f"dcod: proxy {proxy_id} has no dead letter {missing}", file=sys.stderr)
    return EXIT_FAILED if answer.get("missing") else EXIT_OK


def render_dead_letters(letters: list[dict]) -> str:
    rows = [("PROXY", "ID", "AUDSID", "REQUEST", "BYTES", "KIND", "ATTEMPTS", "SET ASIDE")]
    for d in letters:
        rows.append(
            (
                str(d["proxy"]),
                str(d["id"]),
                str(d["audsid"]),
                str(d["rseq"]),
                str(d["size"]),
                "one-way" if d["oneway"] else "sync",
                str(d["attempts"]),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["dead_at"])),
            )
        )
    files = sorted({d["file"] for d in letters})
    return "\n".join([*_table(rows), "", f"in {', '.join(files)}"])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def reload(config: Config, *, upgrade: bool = False) -> int:
    """The whole rollout, synchronously: one line per step; 0 only if it completed. With ``upgrade``,
    the supervisor first re-executes itself on the dcod installed now (dcod.supervisor.reexec); the
    same connection then carries the new image's answers."""
    print("reload: asking the supervisor", flush=True)
    with _connected(config) as client, _going_on_if_interrupted("reload"):
        for answer in client.ask(command(Control.UPGRADE if upgrade else Control.RELOAD)):
            if "progress" in answer:
                print(f"reload: {answer['progress']}", flush=True)
            elif upgrade and not answer.get("ok") and _restart_instead(answer):
                _final(answer)
                print("dcod: not upgraded in place: a restart of the service runs the new code", file=sys.stderr)
                return EXIT_RESTART
            else:
                return _final(answer)
    print("dcod: the supervisor went away during the reload", file=sys.stderr)
    return EXIT_FAILED


def _restart_instead(answer: dict) -> bool:
    """Whether the supervisor cannot upgrade in place at all: it says so, or it predates the command."""
    return bool(answer.get("restart")) or answer.get("error", "").startswith("unknown command")


def stop(config: Config) -> int:
    """The whole stop, synchronously: one line per step; 0 once the supervisor has exited.

    The supervisor answers just before it exits. That it has exited the kernel tells: a pidfd of the
    control socket's peer, opened while our connection proves it is the supervisor. Without the final
    answer (the connection ended: a crash, a SIGKILL), its exit is success all the same, for it stops
    its children first or they stop when it goes (dcod.net.channel); a supervisor that ends the
    connection and stays is a failure.
    """
    print("stop: asking the supervisor", flush=True)
    with _going_on_if_interrupted("stop"):
        return _stop(config)


def _stop(config: Config) -> int:
    with _connected(config) as client:
        supervisor = _pidfd(client.peer_pid)
        final = None
        for answer in client.ask(command(Control.STOP)):
            if "progress" not in answer:
                final = answer
                break
            print(f"stop: {answer['progress']}", flush=True)
    if final is not None and not final.get("ok"):
        return _final(final)
    grace = config.supervisor.stop_timeout
    if supervisor is None:  # not in our pid namespace: its word is all we have
        if final is None:
            print("dcod: the supervisor ended the connection without an answer", file=sys.stderr)
            return EXIT_FAILED
        print("stop: done", flush=True)
        return EXIT_OK
    if _exits(supervisor, grace):
        print(f"stop: the supervisor (pid {client.peer_pid}) has exited", flush=True)
        return EXIT_OK
    said = "said it stopped" if final is not None else "ended the connection without an answer"
    print(f"dcod: the supervisor {said}, but it still runs (pid {client.peer_pid}) after {grace:g}s", file=sys.stderr)
    return EXIT_FAILED


def _pidfd(pid: int) -> int | None:
    """A pidfd of ``pid``: -1 if it has exited already, None if we cannot know (pid 0: another pid namespace)."""
    if pid <= 0:
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return -1


def _exits(pidfd: int, timeout: float) -> bool:
    """Whether the process of ``pidfd`` (from _pidfd()) exits within ``timeout`` seconds; closes it."""
    if pidfd < 0:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])  # readable once it has exited
    finally:
        os.close(pidfd)


# ---------------------------------------------------------------- the table


def render_status(status: dict) -> str:
    sup = status["supervisor"]
    version = f" {sup['version']}" if sup.get("version") else ""  # (an older supervisor does not say)
    upgraded = (
        [f"  upgraded in place: {sup['reexecs']}x, last at {_clock(sup['last_reexec'])}"] if sup.get("reexecs") else []
    )
    lines = [
        f"dcod{version} supervisor pid {sup['pid']}, up {_duration(sup['uptime'])}, RSS {_mib(sup['rss'])}, "
        f"config {sup['config']}",
        f"  {sup['status']}",
        f"  last reload: {_rollout(sup['rollout'])}",
        *upgraded,
        *(f"  DEGRADED: {problem}" for problem in problems(status)),
        "",
    ]
    header = (
        "PROCESS",
        "PID",
        "GEN",
        "STATE",
        "UPTIME",
        "RSS",
        "CPU%",
        "DONE",
        "INFLIGHT",
        "QUEUED",
        "SPOOLED",
        "ERRORS",
        "RESTARTS",
        "LAST EXIT",
    )
    rows = [header]
    for p in status["processes"]:
        rows.append(
            (
                p["name"],
                _or_dash(p["pid"]),
                _or_dash(p["generation"]),
                p["state"],
                _duration(p["uptime"]),
                _mib(p["rss"]),
                "-" if p["cpu_percent"] is None else f"{p['cpu_percent']:.1f}",
                str(p["done"]),
                str(p["inflight"]),
                str(p["queued"]),
                _mib(p["spooled"]) if p["spooled"] else "0",
                str(p["errors"]),
                str(p["restarts"]),
                _last_exit(p),
            )
        )
    lines += _table(rows)
    hub = status["hub"] or {}
    proxies = hub.get("proxies", {})
    if proxies:
        lines.append("")
        # WITHHELD: error replies not sent to sessions that take none (Noradle's PL/SQL), of ERRORS.
        header = (
            "PROXY",
            "REQUESTS",
            "ONEWAY",
            "REPLIES",
            "ERRORS",
            "WITHHELD",
            "TIMEOUTS",
            "LOST",
            "REFUSED",
            "QUEUED",
            "INFLIGHT",
            "UNACKED",
            "DEAD",
            "AVG MS",
            "MAX MS",
            "INSTANCES",
        )
        rows = [header]
        for pid, p in sorted(proxies.items(), key=lambda kv: int(kv[0])):
            answered = p["replies"] + p["error_replies"]
            avg = 1000 * p["latency_sum"] / answered if answered else 0.0
            up = sum(1 for i in p["instances"] if i["state"] == "up" and not i["held"])
            rows.append(
                (
                    str(pid),
                    str(p["requests"]),
                    str(p["oneway"]),
                    str(p["replies"]),
                    str(p["errors"] + p["error_replies"]),
                    str(p.get("withheld", 0)),
                    str(p["timeouts"]),
                    str(p["worker_lost"]),
                    str(p["refused"]),
                    str(p["queued_now"]),
                    str(p["inflight"]),
                    str(p.get("unacked", 0)),
                    str(p.get("dead_letters", 0)),
                    f"{avg:.2f}",
                    f"{1000 * p['latency_max']:.2f}",
                    f"{up}/{len(p['instances'])} up",
                )
            )
        lines += _table(rows)
    for pid, p in sorted(proxies.items(), key=lambda kv: int(kv[0])):
        if p.get("dead_letters"):
            lines.append(
                f"proxy {pid}: {_count(p['dead_letters'], 'request')} set aside as poison in {p['dead_letter_file']} "
                f"(dcod dead-letters list {pid})"
            )
        if p.get("damaged_ranges"):
            lines.append(
                f"proxy {pid}: {p['damaged_ranges']} damaged ranges ({p['damaged_bytes']} bytes) skipped in "
                f"its spool; copies kept: {', '.join(p['damaged_copies']) or 'none'}"
            )
    totals = hub.get("totals", {})
    if totals:
        lines += ["", "hub totals: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(totals.items()))]
    alerts = sup.get("alerts")
    if alerts:
        lines.append("quit alert: " + ", ".join(f"{name}: {_alert_summary(a)}" for name, a in alerts.items()))
    return "\n".join(lines)


def _rollout(rollout: dict | None) -> str:
    if rollout is None:
        return "none yet"
    started = _clock(rollout["started"])
    if rollout["state"] == "running":
        return f"running since {started}"
    text = f"{rollout['state']}, started at {started}, took {rollout['seconds']:.1f}s"
    return text + (f": {rollout['error']}" if rollout["error"] else "")


def _last_exit(process: dict) -> str:
    last = process["last_exit"]
    if last is None:
        return "-"
    text = f"{describe_exit(last['returncode'])} at {_clock(last['time'])}"
    if last["replaced"]:
        text += " (replaced)"
    if process["state"] == "failed":
        text += f"; left down after {process['failures']} failures"
    return text


def _clock(wall_time: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall_time))


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _alert_summary(stats: dict) -> str:
    text = f"{stats.get('sent', 0)} sent, {stats.get('failed', 0)} failed"
    if stats.get("last_sent"):
        text += f", last {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(stats['last_sent']))}"
    if stats.get("last_error"):
        text += f" (last error: {stats['last_error']})"
    return text


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _mib(n: int | None) -> str:
    return f"{n / 1048576:.1f}M" if n else "-"
