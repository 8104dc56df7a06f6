"""`dcod status`, `dcod reload`, `dcod stop`: the supervisor's control socket, for operators.

`status` is a table in the spirit of Tuxedo's `tmadmin psr`/`pq`: every process with its
generation, state and counters, then the hub's totals per proxy.
"""

from __future__ import annotations

import json
import sys
import time

from dcod.net.channel import Control, command
from dcod.supervisor import control
from dcod.config import Config

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 3


def _ask(config: Config, name: Control, timeout: float | None = None):
    """The answer lines of a control command; raises SystemExit with a clear message if unreachable."""
    path = config.control_socket
    try:
        yield from control.request(path, command(name), timeout=timeout)
    except FileNotFoundError:
        raise _unreachable(f"no supervisor is running (no control socket {path})") from None
    except ConnectionRefusedError:
        raise _unreachable(f"no supervisor is running (nobody listens on {path})") from None
    except PermissionError:
        raise _unreachable(f"permission denied on {path}: run as root or as a member of group "
                           f"{config.supervisor.control_group}") from None


def _unreachable(message: str) -> SystemExit:
    print(f"dcod: {message}", file=sys.stderr)
    return SystemExit(EXIT_UNREACHABLE)


def _final(answer: dict) -> int:
    if answer.get("ok"):
        return EXIT_OK
    print(f"dcod: {answer.get('error', 'failed')}", file=sys.stderr)
    return EXIT_FAILED


def status(config: Config, *, as_json: bool = False) -> int:
    answer = next(_ask(config, Control.STATUS, timeout=10), {})
    if not answer.get("ok"):
        return _final(answer)
    if as_json:
        print(json.dumps(answer["status"], indent=2))
    else:
        print(render_status(answer["status"]))
    return EXIT_OK


def reload(config: Config) -> int:
    """The whole rollout, synchronously: one line per step; 0 only if it completed."""
    print("reload: asking the supervisor", flush=True)
    for answer in _ask(config, Control.RELOAD):
        if "progress" in answer:
            print(f"reload: {answer['progress']}", flush=True)
        else:
            return _final(answer)
    print("dcod: the supervisor went away during the reload", file=sys.stderr)
    return EXIT_FAILED


def stop(config: Config) -> int:
    return _final(next(_ask(config, Control.STOP, timeout=10), {}))


# ---------------------------------------------------------------- the table


def render_status(status: dict) -> str:
    sup = status["supervisor"]
    lines = [
        f"dcod supervisor pid {sup['pid']}, up {_duration(sup['uptime'])}, RSS {_mib(sup['rss'])}, "
        f"config {sup['config']}",
        f"  {sup['status']}",
        f"  last reload: {sup['rollout']}",
        "",
    ]
    header = ("PROCESS", "PID", "GEN", "STATE", "UPTIME", "RSS", "CPU%", "DONE", "INFLIGHT", "QUEUED", "SPOOLED",
              "ERRORS", "RESTARTS", "LAST EXIT")
    rows = [header]
    for p in status["processes"]:
        rows.append((p["name"], str(p["pid"] or "-"), str(p["generation"]), p["state"], _duration(p["uptime"]),
                     _mib(p["rss"]), f"{p['cpu_percent']:.1f}", str(p["done"]), str(p["inflight"]),
                     str(p["queued"]), _mib(p["spooled"]) if p["spooled"] else "0", str(p["errors"]),
                     str(p["restarts"]), p["last_exit"] or "-"))
    lines += _table(rows)
    proxies = status.get("hub", {}).get("proxies", {})
    if proxies:
        lines.append("")
        header = ("PROXY", "REQUESTS", "ONEWAY", "REPLIES", "ERRORS", "TIMEOUTS", "LOST", "REFUSED", "QUEUED",
                  "INFLIGHT", "UNACKED", "AVG MS", "MAX MS", "INSTANCES")
        rows = [header]
        for pid, p in sorted(proxies.items(), key=lambda kv: int(kv[0])):
            answered = p["replies"] + p["error_replies"]
            avg = 1000 * p["latency_sum"] / answered if answered else 0.0
            up = sum(1 for i in p["instances"] if i["state"] == "up" and not i["held"])
            rows.append((str(pid), str(p["requests"]), str(p["oneway"]), str(p["replies"]),
                         str(p["errors"] + p["error_replies"]), str(p["timeouts"]), str(p["worker_lost"]),
                         str(p["refused"]), str(p["queued_now"]), str(p["inflight"]), str(p.get("unacked", 0)),
                         f"{avg:.2f}",
                         f"{1000 * p['latency_max']:.2f}", f"{up}/{len(p['instances'])} up"))
        lines += _table(rows)
    for pid, p in sorted(proxies.items(), key=lambda kv: int(kv[0])):
        if p.get("durable") is False:
            lines.append(f"proxy {pid}: queue NOT DURABLE ({p['not_durable_reason']}): {p['memory_only']} requests "
                         "held in memory only")
        if p.get("damaged_ranges"):
            lines.append(f"proxy {pid}: {p['damaged_ranges']} damaged ranges ({p['damaged_bytes']} bytes) skipped in "
                         f"its spool; copies kept: {', '.join(p['damaged_copies']) or 'none'}")
    totals = status.get("hub", {}).get("totals", {})
    if totals:
        lines += ["", "hub totals: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(totals.items()))]
    alerts = sup.get("alerts")
    if alerts:
        lines.append("quit alert: " + ", ".join(f"{name}: {_alert_summary(a)}" for name, a in alerts.items()))
    return "\n".join(lines)


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


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f}M" if n else "-"
