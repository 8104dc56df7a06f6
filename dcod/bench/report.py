"""The figures of a bench run (``report``: what --json prints), what makes it fail (``problems``), and the
table a person reads."""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Iterator

from dcod.bench.measure import Run
from dcod.bench.scenarios import ALERT_TIMEOUT
from dcod.bench.target import Target, filesystem, python_build
from dcod.config import Config
from dcod.hub.spool import RECORD_HEADER
from dcod.protocol import HEADER_SIZE


def percentile(ordered: list[float], p: float) -> float | None:
    """The nearest-rank percentile of sorted values (None for none)."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def latency_summary(ordered: list[float]) -> dict:
    return {
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1] if ordered else None,
    }


def _sends(results: list[dict]) -> Iterator[tuple[float, float]]:
    """(sent at, latency ms) of every round trip measured."""
    for r in results:
        yield from zip(r["sent_at"], r["latencies"])


def reload_figures(outcome: dict, results: list[dict], measure_at: float) -> dict:
    """The reload's duration and status; latency of the requests sent while it ran against the others'."""
    started, ended = outcome["started"], outcome["ended"]
    during, steady = [], []
    for sent_at, latency in _sends(results):
        (during if started <= sent_at <= ended else steady).append(latency)
    return {
        "at_s": started - measure_at,
        "duration_s": ended - started,
        "exit_status": outcome["exit_status"],
        "output": outcome["output"],
        "requests_during": len(during),
        "latency_during_ms": latency_summary(sorted(during)),
        "requests_steady": len(steady),
        "latency_steady_ms": latency_summary(sorted(steady)),
    }


def kill_figures(outcome: dict, results: list[dict], measure_at: float, lost_limit: int) -> dict:
    """From the hub's SIGKILL to the quit alert, and to the first reply to a request sent after it."""
    killed_at, alerted_at = outcome["killed_at"], outcome["alerted_at"]
    served_at = min(
        (sent_at + latency / 1000 for sent_at, latency in _sends(results) if sent_at > killed_at), default=None
    )
    return {
        "at_s": killed_at - measure_at,
        "hub_pid": outcome["hub_pid"],
        "alert_ms": None if alerted_at is None else (alerted_at - killed_at) * 1000,
        "alert_counter_before": outcome["counter_before"],
        "alert_counter": outcome["counter"],
        "serving_again_ms": None if served_at is None else (served_at - killed_at) * 1000,
        "lost_limit": lost_limit,
    }


def spool_figures(spooled_bytes: int, size: int, seconds: float, hub_cpu: float | None, config: Config) -> dict:
    """What the hub wrote to the spool: one record per request, none taken out (no worker)."""
    requests = spooled_bytes // (RECORD_HEADER.size + HEADER_SIZE + size)
    return {
        "requests": requests,
        "requests_per_s": requests / seconds,
        "mb_per_s": spooled_bytes / seconds / 1e6,
        "hub_cpu_us_per_request": hub_cpu / requests * 1e6 if hub_cpu is not None and requests else None,
        "fsync_interval_s": config.hub.spool_fsync_interval,
    }


def report(target: Target, args: argparse.Namespace, run: Run) -> dict:
    """Every figure of a run, machine-readable: what --json prints and the table shows."""
    results = run.results
    requests = sum(r["measured"] for r in results)

    def per_request(cpu: float | None) -> float | None:
        return None if cpu is None or not requests else cpu / requests * 1e6

    def per_wakeup(wakeups: int | None) -> float | None:
        return None if not wakeups else requests / wakeups

    def mb(n: int | None) -> float | None:
        return None if n is None else n / 2**20

    latencies = sorted(itertools.chain.from_iterable(r["latencies"] for r in results))
    processes = [
        {
            "role": m.role,
            "pid": m.process.pid,
            "cpu_s": m.cpu,
            "system_s": m.system,
            "cpu_percent": None if m.cpu is None else 100 * m.cpu / run.cpu_window,
            "cpu_us_per_request": per_request(m.cpu),
            "wakeups": m.wakeups,
            "requests_per_wakeup": per_wakeup(m.wakeups),
            "rss_idle_mb": mb(m.rss_idle),
            "rss_mb": mb(m.rss),
            "note": m.note,
        }
        for m in run.watched
    ]
    hubs = [p["cpu_s"] for p in processes if p["role"] == "hub"]
    hub_cpu = sum(hubs) if hubs and None not in hubs else None  # unknown when a hub exited in the window
    load_cpu = sum(p["cpu_s"] or 0 for p in processes if p["role"].startswith("load "))
    kind, outcome = run.disruption or (None, None)
    return {
        "hub": target.address,
        "own_hub": target.own,
        "instances": args.instances if target.own and not args.spool else None,
        "proxy": args.proxy,
        "mode": "one-way" if args.oneway else "round trip",
        "sessions": args.sessions,
        "depth": args.depth,
        "size": args.size,
        "processes": args.processes,
        "warmup_s": args.warmup,
        "window_s": run.window,
        "requests": requests,
        "requests_per_s": requests / run.window if run.window > 0 else None,
        "mb_per_s": requests * args.size / run.window / 1e6 if run.window > 0 else None,
        "latency_ms": None if args.oneway else latency_summary(latencies),
        "sent": sum(r["sent"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "mismatched": sum(r["mismatched"] for r in results),
        "hub_cpu_us_per_request": per_request(hub_cpu),
        "load_cpu_s": load_cpu,
        "load_cpu_us_per_request": per_request(load_cpu),
        "cpu_window_s": run.cpu_window,
        "process_cpu": processes,
        "filesystems": {"runtime": filesystem(target.config.runtime_dir), "state": filesystem(target.config.state_dir)}
        if target.own
        else None,
        "python": python_build(),
        "reload": reload_figures(outcome, results, run.measure_at) if kind == "reload" else None,
        "hub_kill": kill_figures(outcome, results, run.measure_at, args.sessions * args.depth)
        if kind == "hub kill"
        else None,
        "idle_sessions": run.idle_sessions,
        "spool": None
        if run.spooled_bytes is None
        else spool_figures(run.spooled_bytes, args.size, run.cpu_window, hub_cpu, target.config),
    }


def problems(r: dict) -> list[str]:
    """What makes a run fail: losses (beyond a hub kill's in-flight requests), errors, a failed reload..."""
    found = []
    if r["errors"] or r["mismatched"]:
        found.append(f"{r['errors']} error replies and {r['mismatched']} wrong replies")
    kill = r["hub_kill"]
    limit = kill["lost_limit"] if kill else 0
    if r["lost"] > limit:
        found.append(f"{r['lost']} requests lost" + (f", more than the {limit} in flight" if kill else ""))
    if r["reload"] and r["reload"]["exit_status"] != 0:
        found.append(f"`dcod reload` exited with status {r['reload']['exit_status']}")
    if kill and kill["alert_ms"] is None:
        found.append(f"no quit alert within {ALERT_TIMEOUT:g} s of the hub's SIGKILL")
    if kill and kill["serving_again_ms"] is None:
        found.append("no reply from a new hub before the end of the window")
    return found


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


def _latencies(summary: dict, keys=("p50", "p90", "p99", "max")) -> str:
    return "   ".join(f"{k} {_number(summary[k], 2)}" for k in keys)


def table(r: dict) -> str:
    """The report for a person."""
    what = "sent" if r["mode"] == "one-way" else "round trips"
    if not r["own_hub"]:
        hub = f"hub {r['hub']}"
    elif r["spool"]:
        hub = f"private hub {r['hub']} (no worker: every request is spooled)"
    else:
        hub = f"private hub {r['hub']} ({_count(r['instances'], 'echo instance')})"
    loads = _count(r["processes"], "load process")
    lines = [
        f"dcod bench: {r['sessions']} sessions x depth {r['depth']}, {r['size']}-byte {r['mode']} requests "
        f"to proxy {r['proxy']}, {hub}, {loads}",
        f"{'window':<13} {r['window_s']:.2f} s, after {r['warmup_s']:g} s of warmup",
        f"{what:<13} {r['requests']}   {_number(r['requests_per_s'], 0)}/s   "
        f"{_number(r['mb_per_s'], 1)} MB/s of request bodies" + ("" if r["mode"] == "one-way" else " (as much back)"),
    ]
    if r["latency_ms"] is not None:
        lines.append(f"{'latency ms':<13} {_latencies(r['latency_ms'])}")
    else:
        lines.append(f"{'':<13} one-way requests get no reply: this is the send rate, and replies are not checked")
    lines.append(
        f"{'checks':<13} sent {r['sent']}   lost {r['lost']}   errors {r['errors']}   mismatched {r['mismatched']}"
    )
    lines += _scenario_lines(r)
    # What one unit of work is: a one-way request, or a round trip.
    item, short = ("request", "req") if r["mode"] == "one-way" else ("round trip", "rt")
    unit, per_wake = f"µs/{short}", f"{short}/wake"
    lines += [
        "",
        f"{'process':<12} {'pid':>8} {'CPU s':>8} {'sys s':>7} {'CPU %':>7} {unit:>8} {per_wake:>8} "
        f"{'RSS idle':>9} {'RSS load':>9}",
    ]
    for p in r["process_cpu"]:
        lines.append(
            f"{p['role']:<12} {p['pid']:>8} {_number(p['cpu_s'], 2):>8} {_number(p['system_s'], 2):>7} "
            f"{_number(p['cpu_percent']):>7} {_number(p['cpu_us_per_request']):>8} "
            f"{_number(p['requests_per_wakeup']):>8} "
            f"{_number(p['rss_idle_mb']):>9} {_number(p['rss_mb']):>9}  {p['note']}".rstrip()
        )
    lines += [
        f"{per_wake}: {item}s per time the process slept and was woken (its batch size)",
        "RSS in MB: idle before any session connected, load at the end of the window",
        "",
        f"hub CPU per {item}: "
        f"{_number(r['hub_cpu_us_per_request'])} µs   "
        f"load generator: {_number(r['load_cpu_us_per_request'])} µs ({r['load_cpu_s']:.2f} CPU s)",
    ]
    if r["filesystems"]:
        lines.append(
            f"runtime dir (quit alert, sockets) on {r['filesystems']['runtime']}, "
            f"state dir (spool) on {r['filesystems']['state']}"
        )
    lines.append(f"python {r['python']}")
    return "\n".join(lines)


def _scenario_lines(r: dict) -> list[str]:
    """The lines of --reload-at, --kill-hub-at, --idle-sessions and --spool."""
    lines = []
    if reload := r["reload"]:
        lines += [
            f"{'reload':<13} `dcod reload` at {reload['at_s']:.2f} s took {reload['duration_s']:.2f} s, "
            f"exit status {reload['exit_status']}",
            f"{'  during it':<13} {reload['requests_during']:>8} round trips, ms: "
            f"{_latencies(reload['latency_during_ms'], ('p50', 'p99', 'max'))}",
            f"{'  steady':<13} {reload['requests_steady']:>8} round trips, ms: "
            f"{_latencies(reload['latency_steady_ms'], ('p50', 'p99', 'max'))}",
        ]
    if kill := r["hub_kill"]:
        lines += [
            f"{'hub kill':<13} SIGKILL of the hub (pid {kill['hub_pid']}) at {kill['at_s']:.2f} s: "
            f"quit alert after {_number(kill['alert_ms'], 2)} ms, "
            f"a new hub replying after {_number(kill['serving_again_ms'], 1)} ms",
            f"{'':<13} lost {r['lost']} (at most {kill['lost_limit']} expected: sessions x depth in flight)",
        ]
    if idle := r["idle_sessions"]:
        lines.append(
            f"{'idle sessions':<13} {idle['count']}: hub RSS {idle['hub_rss_without_mb']:.1f} -> "
            f"{idle['hub_rss_with_mb']:.1f} MB, +{idle['delta_mb']:.1f} MB "
            f"({idle['kb_per_session']:.1f} KB per session)"
        )
    if spool := r["spool"]:
        lines.append(
            f"{'spool':<13} {spool['requests']} requests spooled, {spool['requests_per_s']:.0f}/s, "
            f"{spool['mb_per_s']:.1f} MB/s; hub CPU {_number(spool['hub_cpu_us_per_request'])} µs "
            f"per request; fsync every {spool['fsync_interval_s']:g} s"
        )
    return lines
