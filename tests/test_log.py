"""dcod.log.Throttle: a flood of one warning costs a line per interval, and says how many it hid."""

from __future__ import annotations

import logging

from dcod.log import Throttle

log = logging.getLogger("test.throttle")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def logged(caplog) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == log.name]
    caplog.clear()
    return lines


def test_the_first_at_once_then_one_summary_per_interval_with_the_count_and_the_last(caplog):
    clock = Clock()
    throttle = Throttle(log, 10.0, clock)
    for n in range(18638):
        clock.now = n / 20000  # under a second
        throttle.warn("refused", "proxy 1: request %d refused", n)
    assert logged(caplog) == ["proxy 1: request 0 refused"]
    throttle.flush()
    assert logged(caplog) == []  # the interval is not over yet
    clock.now = 10.0
    throttle.flush()
    assert logged(caplog) == ["18637 more like it in the last 10s, the last: proxy 1: request 18637 refused"]
    clock.now = 25.0
    throttle.flush()
    assert logged(caplog) == []  # nothing more came: nothing to say
    throttle.warn("refused", "proxy 1: request %d refused", 1)
    assert logged(caplog) == ["proxy 1: request 1 refused"]  # a quiet interval later: at once again


def test_kinds_are_throttled_apart_and_a_summary_comes_with_the_next_warning_too(caplog):
    clock = Clock()
    throttle = Throttle(log, 10.0, clock)
    throttle.warn("a", "a %d", 1)
    throttle.warn("a", "a %d", 2)
    throttle.warn("b", "b %d", 1)
    assert logged(caplog) == ["a 1", "b 1"]
    clock.now = 11.0
    throttle.warn("a", "a %d", 3)  # no flush() meanwhile: the summary comes first, this one is counted
    assert logged(caplog) == ["1 more like it in the last 11s, the last: a 2"]
    clock.now = 21.0
    throttle.flush()
    assert logged(caplog) == ["1 more like it in the last 10s, the last: a 3"]


def test_the_traceback_goes_with_the_line_logged_at_once_not_with_the_summary(caplog):
    clock = Clock()
    throttle = Throttle(log, 10.0, clock)
    for n in range(3):
        try:
            raise ValueError(n)
        except ValueError:
            throttle.warn("failed", "request %d failed", n, exc_info=True)
    clock.now = 10.0
    throttle.flush()
    records = [r for r in caplog.records if r.name == log.name]
    assert [(r.getMessage(), r.exc_info is not None and r.exc_info[0]) for r in records] == [
        ("request 0 failed", ValueError),
        ("2 more like it in the last 10s, the last: request 2 failed", False),
    ]
