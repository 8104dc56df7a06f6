"""`dcod bench`: check the options, start the hub to load unless one is given, measure, report."""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys

from dcod.bench.load import TAG_SIZE
from dcod.bench.measure import measure
from dcod.bench.report import problems, report, table
from dcod.bench.target import BenchError, Target, own_hub
from dcod.config import Config
from dcod.protocol import HEADER_SIZE


def _raise_fd_limit() -> None:
    """Open files up to the hard limit, for us (idle sessions) and, before `dcod run`, its children."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _check(args: argparse.Namespace, config: Config) -> None:
    for name in ("sessions", "depth", "processes", "instances", "count", "idle_sessions"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if args.count is None and args.duration <= 0 or args.warmup < 0:
        raise BenchError("--duration must be positive and --warmup not negative")
    if args.processes > min(args.sessions, args.count or args.sessions):
        raise BenchError(f"--processes {args.processes} is more than --sessions (or --count): some would idle")
    if args.size < TAG_SIZE or args.size + HEADER_SIZE > config.hub.max_pdu:
        raise BenchError(
            f"--size must be from {TAG_SIZE} (the tag that identifies a reply) "
            f"to {config.hub.max_pdu - HEADER_SIZE} (max_pdu), not {args.size}"
        )
    if args.pid and not args.hub:
        raise BenchError("--pid goes with --hub (without it, the bench measures the hub it starts)")
    scenarios = {
        "--reload-at": args.reload_at is not None,
        "--kill-hub-at": args.kill_hub_at is not None,
        "--idle-sessions": bool(args.idle_sessions),
        "--spool": args.spool,
    }
    if args.hub and any(scenarios.values()):
        raise BenchError(
            f"{', '.join(k for k, on in scenarios.items() if on)}: only on the bench's own hub (without --hub)"
        )
    for option, at in (("--reload-at", args.reload_at), ("--kill-hub-at", args.kill_hub_at)):
        if at is not None and (args.count or args.oneway):
            raise BenchError(f"{option} goes with --duration and round trips (its figures are reply latencies)")
        if at is not None and not 0 <= at < args.duration:
            raise BenchError(f"{option} must fall in the window, from 0 to --duration {args.duration:g}, not {at:g}")


def main(config: Config, args: argparse.Namespace) -> int:
    """`dcod bench`: 0 when nothing was lost (beyond a killed hub's requests in flight), refused or misrouted
    and a reload succeeded, 1 otherwise, 2 if it could not run (130 on Ctrl-C, after stopping its processes)."""
    args.oneway = args.oneway or args.spool  # nothing would ever answer a spooled request
    try:
        _check(args, config)
        if args.idle_sessions:
            _raise_fd_limit()  # before `dcod run`, whose hub inherits it
        with contextlib.ExitStack() as stack:
            if args.hub:
                target = Target(args.hub, config, tuple(args.pid or ()), own=False)
            else:
                target = stack.enter_context(own_hub(config, args.proxy, args.instances, spool=args.spool))
            result = report(target, args, measure(target, args))
    except BenchError as e:
        print(f"dcod bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dcod bench: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2) if args.json else table(result))
    failed = problems(result)
    for problem in failed:
        print(f"dcod bench: {problem}", file=sys.stderr)
    return 1 if failed else 0
