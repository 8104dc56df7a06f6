#!/usr/bin/env python3
"""The long fuzz run: every property of tests/test_fuzz.py, with fresh random examples, for minutes.

    .venv/bin/python bench/fuzz.py --minutes 10

The properties are the CI ones (the framer against the spec's model; a live hub fed arbitrary
session streams); here each runs in batches of --batch examples, round-robin, until the time is
up, and the number of cases run is printed per property. Exit status 1 at the first failure,
with hypothesis's shrunk counterexample.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_fuzz  # noqa: E402  (the properties, from tests/)
from dcod import protocol  # noqa: E402


def properties() -> dict[str, object]:
    return {name: fn for name, fn in vars(test_fuzz).items() if name.startswith("test_") and hasattr(fn, "hypothesis")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to fuzz (default 10)")
    parser.add_argument("--batch", type=int, default=1000, help="examples per property per round (default 1000)")
    parser.add_argument("-k", metavar="TEXT", default="", help="only the properties whose name contains TEXT")
    args = parser.parse_args(argv)
    logging.getLogger("dcod").setLevel(logging.ERROR)  # the hub's warnings about bad sessions are the point

    tests = {name: fn for name, fn in properties().items() if args.k in name}
    if not tests:
        parser.error(f"no property matches {args.k!r}: {', '.join(properties())}")
    cases: collections.Counter[str] = collections.Counter()
    needs_hub = {}
    for name, fn in tests.items():
        inner = fn.hypothesis.inner_test
        needs_hub[name] = "live_hub" in inspect.signature(inner).parameters

        def counting(*a, __inner=inner, __name=name, **kw):
            cases[__name] += 1
            return __inner(*a, **kw)

        fn.hypothesis.inner_test = counting
        # More examples than in CI (hypothesis keeps a test's settings here; @settings twice is refused).
        fn._hypothesis_internal_use_settings = settings(
            fn._hypothesis_internal_use_settings,
            max_examples=args.batch,
            deadline=None,
            database=None,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )

    saved = protocol.Framer
    protocol.Framer = test_fuzz.CountingFramer  # the hub's framers, watched (as the live_hub fixture does)
    hub = test_fuzz.HubThread(Path(tempfile.mkdtemp(prefix="dcod-fuzz-"))).start()
    started = time.monotonic()
    deadline = started + args.minutes * 60
    failed = None
    try:
        while time.monotonic() < deadline and failed is None:
            for name, fn in tests.items():
                try:
                    fn(hub) if needs_hub[name] else fn()
                except Exception:  # noqa: BLE001 - a property failed: report it
                    failed = name
                    traceback.print_exc()
                    break
                if hub.crash is not None:
                    failed = f"{name}: an exception escaped the hub: {hub.crash!r}"
                    break
                if time.monotonic() >= deadline:
                    break
    finally:
        hub.stop()
        protocol.Framer = saved
    elapsed = time.monotonic() - started
    width = max(map(len, tests))
    print(f"\nfuzzed for {elapsed / 60:.1f} min")
    for name in tests:
        print(f"  {name:<{width}}  {cases[name]:>9} cases")
    print(f"  {'total':<{width}}  {sum(cases.values()):>9} cases")
    print(
        f"  hub: {test_fuzz.CountingFramer.feeds} framer feeds; most bytes held by one connection's framer "
        f"after a feed: {test_fuzz.CountingFramer.most} (max_pdu {test_fuzz.HUB_MAX_PDU})"
    )
    if failed:
        print(f"FAILED: {failed}")
        return 1
    print("no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
