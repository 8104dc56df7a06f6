"""`dcod bench` end to end: it starts its own `dcod run`, loads it, and reports figures.

Only the report's structure and the absence of losses are checked: speed depends on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_reports_figures_without_losses():
    run = subprocess.run([sys.executable, "-m", "dcod", "bench", "--duration", "1", "--sessions", "2", "--depth", "2",
                          "--json"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["requests"] > 0 and report["requests_per_s"] > 0
    assert set(report["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert report["lost"] == report["errors"] == report["mismatched"] == 0
    assert report["sent"] >= report["requests"]
    roles = {p["role"] for p in report["process_cpu"]}
    assert {"supervisor", "hub", "worker 1#0", "worker 1#1", "load 0"} <= roles
    assert report["hub_cpu_us_per_request"] > 0
    assert report["load_cpu_s"] > 0
