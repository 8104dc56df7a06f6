"""`dcod bench` end to end: it starts its own `dcod run`, loads it, and reports figures.

Only the report's structure and the absence of losses are checked: speed depends on the machine.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dcod.cli import main as cli

BENCH = Path(__file__).resolve().parent.parent / "bench"
SMALL = ["--sessions", "2", "--depth", "2", "--warmup", "0.5", "--json"]


def bench(*args: str) -> dict:
    run = subprocess.run([sys.executable, "-m", "dcod", "bench", *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_bench_reports_figures_without_losses():
    report = bench("--duration", "1", "--sessions", "2", "--depth", "2", "--json")
    assert report["requests"] > 0 and report["requests_per_s"] > 0 and report["mb_per_s"] > 0
    assert set(report["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert report["lost"] == report["errors"] == report["mismatched"] == 0
    assert report["sent"] >= report["requests"]
    processes = {p["role"]: p for p in report["process_cpu"]}
    assert {"supervisor", "hub", "worker 1#0", "worker 1#1", "load 0"} <= set(processes)
    assert all(
        processes[role]["rss_idle_mb"] > 0 and processes[role]["rss_mb"] > 0
        for role in ("supervisor", "hub", "worker 1#0")
    )
    assert report["hub_cpu_us_per_request"] > 0
    assert processes["hub"]["wakeups"] > 0 and processes["hub"]["requests_per_wakeup"] > 0
    assert report["load_cpu_s"] > 0
    assert report["python"].startswith(f"{platform.python_version()} ({sys.executable}), trio ")


def test_bench_reload_under_load_loses_nothing():
    report = bench("--duration", "4", "--reload-at", "0.5", *SMALL)
    reload = report["reload"]
    assert reload["exit_status"] == 0 and reload["duration_s"] > 0, reload["output"]
    assert report["lost"] == report["errors"] == report["mismatched"] == 0
    assert reload["requests_during"] > 0 and reload["latency_during_ms"]["p99"] > 0
    assert reload["requests_steady"] > 0 and reload["latency_steady_ms"]["p99"] > 0
    roles = [(p["role"], p["note"]) for p in report["process_cpu"]]
    assert ("hub", "exited") in roles and ("hub", "new") in roles


def test_bench_hub_kill_raises_the_alert_and_a_new_hub_serves():
    report = bench("--duration", "3", "--kill-hub-at", "0.5", *SMALL)
    kill = report["hub_kill"]
    assert kill["alert_ms"] > 0 and kill["alert_counter"] > kill["alert_counter_before"]
    assert kill["serving_again_ms"] > 0
    assert report["lost"] <= kill["lost_limit"] == 4
    assert report["errors"] == report["mismatched"] == 0


def test_bench_spools_and_weighs_idle_sessions():
    report = bench("--duration", "1", "--spool", "--idle-sessions", "20", *SMALL)
    assert report["mode"] == "one-way"
    assert report["spool"]["requests"] > 0 and report["spool"]["hub_cpu_us_per_request"] > 0
    assert report["idle_sessions"]["count"] == 20 and report["idle_sessions"]["hub_rss_with_mb"] > 0


def test_bench_scenarios_need_its_own_hub(capsys):
    assert cli.main(["bench", "--hub", "127.0.0.1:1", "--spool"]) == 2
    assert "--spool: only on the bench's own hub" in capsys.readouterr().err
    assert cli.main(["bench", "--duration", "2", "--reload-at", "3"]) == 2
    assert "--reload-at must fall in the window" in capsys.readouterr().err


def test_hotpath_bench_answers_every_round_trip():
    # bench/hotpath.py drives the hub's internals; this keeps it working as they change.
    run = subprocess.run(
        [sys.executable, str(BENCH / "hotpath.py"), "--rounds", "20", "--sessions", "3", "--depth", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("300 round trips (3 sessions x 5, 100-byte bodies, 2 instances): "), run.stdout


@pytest.mark.parametrize("log_pdus", [[], ["--log-pdus"]], ids=["quiet", "log-pdus"])
def test_noradle_reference_bench_measures_the_node_hub(log_pdus):
    run = subprocess.run(
        [sys.executable, str(BENCH / "noradle_hub.py"), "--duration", "1", *SMALL, *log_pdus],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    logged = re.search(r"the hub logged ([\d,]+) PDUs", run.stderr)
    assert bool(logged) == bool(log_pdus), run.stderr
    report = json.loads(run.stdout)
    assert report["lost"] == report["errors"] == report["mismatched"] == 0 and report["requests"] > 0
    node = [p for p in report["process_cpu"] if p["role"] == "node"]
    assert len(node) == 1 and node[0]["cpu_s"] > 0, report["process_cpu"]
    if logged:  # a line for each request and each reply
        assert int(logged[1].replace(",", "")) >= 2 * report["requests"], run.stderr


def test_wakeup_bench_times_both_socket_families_on_any_core_and_one():
    run = subprocess.run(
        [sys.executable, str(BENCH / "wakeup.py"), "--count", "200"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["tcp", "any", "core"],
        ["tcp", "one", "core"],
        ["unix", "any", "core"],
        ["unix", "one", "core"],
    ], run.stdout
    assert all("sendmsg" in line and "writer CPU" in line for line in lines), run.stdout


def test_compare_alternates_dcod_and_the_node_reference():
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH / "compare.py"),
            "--rounds",
            "1",
            "--duration",
            "1",
            "--sessions",
            "2",
            "--depth",
            "2",
            "--warmup",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("1 rounds of 1 s, 2 sessions x 2 outstanding, 100-byte bodies; python "), run.stdout
    rows = {line[:28].strip(): line[28:].split() for line in run.stdout.splitlines()[2:6]}
    assert list(rows) == ["dcod, 1 instance", "Node.js reference", "dcod, 2 instances", "Node.js reference, logging"]
    assert all(float(figures[0]) > 0 for figures in rows.values()), run.stdout
    ratios = re.findall(
        r"^the Node.js reference(?:, logging)? cost ([\d.]+) \(.* as much as dcod, \d instances?$",
        run.stdout,
        re.MULTILINE,
    )
    assert len(ratios) == 4 and all(float(ratio) > 0 for ratio in ratios), run.stdout
    assert re.search(r"^wake-ups before: tcp  any core  sendmsg +[\d.]+ µs", run.stdout, re.MULTILINE), run.stdout
    assert re.search(r"^wake-ups after: +tcp  any core  sendmsg +[\d.]+ µs", run.stdout, re.MULTILINE), run.stdout


def test_compare_stops_at_a_failed_run():
    run = subprocess.run(
        [sys.executable, str(BENCH / "compare.py"), "--rounds", "1", "--no-such-option"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert "compare: dcod, 1 instance: exit status 2" in run.stderr and "--no-such-option" in run.stderr, run.stderr
    assert "Node.js" not in run.stderr, run.stderr
