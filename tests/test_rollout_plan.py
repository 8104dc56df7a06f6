"""The rollout's plan: which worker instances a reload adds, removes, changes and keeps (no processes)."""

from __future__ import annotations

from dcod.supervisor.rollout import Plan, WorkerSpec, plan


def dcod_worker(proxy: int, instance: int, config: str = "config-a.toml") -> WorkerSpec:
    return WorkerSpec(
        f"worker {proxy}#{instance}",
        ["python3", "-m", "dcod", "worker", "--config", config, "--proxy", str(proxy), "--instance", str(instance)],
    )


def test_the_same_instances_are_all_kept():
    slots = {(1, 0): dcod_worker(1, 0), (1, 1): dcod_worker(1, 1)}
    assert plan(slots, dict(slots)) == Plan(
        added=(), removed=(), changed=(), kept=((1, 0), (1, 1)), replaced=((1, 0), (1, 1))
    )


def test_added_removed_changed_and_kept():
    old = {
        (1, 0): dcod_worker(1, 0),
        (1, 1): dcod_worker(1, 1),
        (2, 0): dcod_worker(2, 0),
        (3, 0): WorkerSpec("worker 3#0", ["/usr/bin/node", "worker.js"]),
    }
    new = {
        (3, 0): WorkerSpec("worker 3#0", ["/usr/bin/node", "worker2.js"]),  # another command
        (1, 0): dcod_worker(1, 0),
        (1, 1): dcod_worker(1, 1, config="config-b.toml"),  # another configuration to read
        (4, 0): dcod_worker(4, 0),
        (4, 1): dcod_worker(4, 1),
    }
    result = plan(old, new)
    assert result.added == ((4, 0), (4, 1))
    assert result.removed == ((2, 0),)
    assert result.changed == ((3, 0), (1, 1))
    assert result.kept == ((1, 0),)
    # Replaced in the new configuration's order, changed or not: a reload brings new code too.
    assert result.replaced == ((3, 0), (1, 0), (1, 1))


def test_from_nothing_and_to_nothing():
    slots = {(1, 0): dcod_worker(1, 0), (2, 0): dcod_worker(2, 0)}
    assert plan({}, slots) == Plan(added=((1, 0), (2, 0)), removed=(), changed=(), kept=(), replaced=())
    assert plan(slots, {}) == Plan(added=(), removed=((1, 0), (2, 0)), changed=(), kept=(), replaced=())
