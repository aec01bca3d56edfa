"""Bookkeeping of StepTimer / time_steps with a fake clock: no wall-clock time is asserted."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticzo.bench.timing import OTHER, StepTimer, TimingReport, time_steps
from elasticzo.instrument import phase


def fake_clock(*readings: float):
    """A clock returning ``readings`` in order; it fails loudly if read more often than expected."""
    it = iter(readings)
    return lambda: next(it)


def test_phase_outside_a_step_is_inert():
    p = phase("forward")
    assert p is phase("backward")  # one shared no-op object
    with p:
        pass


def test_flat_phases():
    timer = StepTimer(clock=fake_clock(0, 1, 3, 4, 7, 10), sync=False)
    with timer.step():  # 0
        with phase("forward"):  # 1 .. 3
            pass
        with phase("backward"):  # 4 .. 7
            pass
    (rec,) = timer.records  # step ends at 10
    assert rec.total_s == 10
    assert rec.phase_s == {"forward": 2, "backward": 3}
    assert rec.counts == {"forward": 1, "backward": 1}
    assert rec.other_s == 5


def test_nested_phases_charge_self_time_only():
    timer = StepTimer(clock=fake_clock(0, 1, 2, 4, 5, 6), sync=False)
    with timer.step():  # 0
        with phase("forward"):  # 1
            with phase("noise"):  # 2 .. 4
                pass
        # forward closes at 5: 1..2 and 4..5
    (rec,) = timer.records  # 6
    assert rec.phase_s == {"forward": 2, "noise": 2}
    assert rec.other_s == 2
    assert sum(rec.phase_s.values()) <= rec.total_s


def test_repeated_phase_accumulates_and_counts():
    timer = StepTimer(clock=fake_clock(0, 1, 2, 3, 5, 9), sync=False)
    with timer.step():
        for _ in range(2):  # forward at 1..2 and 3..5 (the two SPSA queries)
            with phase("forward"):
                pass
    (rec,) = timer.records
    assert rec.phase_s == {"forward": 3}
    assert rec.counts == {"forward": 2}


def test_exception_inside_phase_still_records_and_closes_the_step():
    timer = StepTimer(clock=fake_clock(0, 1, 4, 6), sync=False)
    with pytest.raises(ZeroDivisionError):
        with timer.step():
            with phase("update"):
                1 / 0
    (rec,) = timer.records
    assert rec.phase_s == {"update": 3} and rec.total_s == 6
    assert phase("update") is phase("x")  # inert again after the step


def test_steps_do_not_nest():
    timer = StepTimer(clock=fake_clock(0, 1, 2, 3), sync=False)
    with pytest.raises(RuntimeError, match="do not nest"):
        with timer.step():
            with timer.step():
                pass


def test_sync_runs_before_every_clock_reading():
    calls = []
    timer = StepTimer(clock=lambda: len(calls), sync=lambda: calls.append(1))
    with timer.step():
        with phase("forward"):
            with phase("noise"):
                pass
    assert len(calls) == 6  # step start/end + two boundaries per phase


def test_report_medians_and_zero_for_missing_phase():
    records_clock = fake_clock(
        0, 1, 3, 5,  # step 1: forward 2, total 5
        0, 0, 1, 1,  # step 2: forward 1, total 1
        0, 0, 2, 2, 3, 3,  # step 3: forward 2, backward 1, total 3
    )
    timer = StepTimer(clock=records_clock, sync=False)
    with timer.step():
        with phase("forward"):
            pass
    with timer.step():
        with phase("forward"):
            pass
    with timer.step():
        with phase("forward"):
            pass
        with phase("backward"):
            pass
    report = timer.report()
    assert report.steps == 3
    assert report.step_s == (5, 1, 3)
    assert report.median_step_s == 3
    assert report.phase_s == {"forward": (2, 1, 2), "backward": (0, 0, 1), OTHER: (3, 0, 0)}
    assert report.median_phase_s == {"forward": 2, "backward": 0, OTHER: 0}
    assert report.counts == {"forward": (1, 1, 1), "backward": (0, 0, 1)}
    assert timer.report(skip=2).step_s == (3,)
    assert "3 steps" in report.report() and "backward" in report.report()


def test_time_steps_warmup_is_untimed_and_medians_are_per_step():
    ticks = iter(range(1000))
    calls = []

    def step():
        calls.append(1)
        with phase("forward"):
            pass

    report = time_steps(step, steps=4, warmup=2, clock=lambda: next(ticks), sync=False)
    assert len(calls) == 6
    assert report.steps == 4
    # Per step 4 readings (start, enter, exit, end), one apart: total 3, forward 1.
    assert report.step_s == (3, 3, 3, 3)
    assert report.median_phase_s == {"forward": 1, OTHER: 2}
    assert next(ticks) == 16  # the warm-up steps read no clock at all


def test_time_steps_validates_arguments():
    with pytest.raises(ValueError, match="steps=0"):
        time_steps(lambda: None, steps=0)
    with pytest.raises(ValueError, match="warmup=-1"):
        time_steps(lambda: None, steps=1, warmup=-1)


def test_empty_report():
    report = TimingReport.from_records([])
    assert report.steps == 0 and report.phase_s == {OTHER: ()}


# A step is a random tree of phases; each clock reading advances by a random whole number.
names = st.sampled_from(["forward", "noise", "backward", "update"])
trees = st.recursive(st.just([]), lambda kids: st.lists(st.tuples(names, kids), max_size=3), max_leaves=12)


def run_tree(tree) -> None:
    for name, children in tree:
        with phase(name):
            run_tree(children)


def count_entries(tree, counts) -> None:
    for name, children in tree:
        counts[name] = counts.get(name, 0) + 1
        count_entries(children, counts)


@settings(max_examples=60, deadline=None)
@given(tree=trees, steps=st.lists(st.integers(0, 5), min_size=64, max_size=64))
def test_phase_times_partition_the_step(tree, steps):
    deltas = iter(steps)
    now = [0]

    def clock():
        now[0] += next(deltas)
        return now[0]

    timer = StepTimer(clock=clock, sync=False)
    with timer.step():
        run_tree(tree)
    (rec,) = timer.records
    expected_counts: dict[str, int] = {}
    count_entries(tree, expected_counts)
    assert rec.counts == expected_counts
    assert all(v >= 0 for v in rec.phase_s.values())
    assert sum(rec.phase_s.values()) + rec.other_s == rec.total_s  # integers: exact
    assert rec.other_s >= 0
