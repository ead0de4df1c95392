"""Threads sharing one compiled model without a context (issue 21, item 2): never a silent wrong
answer. Each thread gets a generation of its own; a call whose timestep continues another thread's
running generation (one generation run across threads, which the timestep cannot place) is refused
before it touches that generation's state."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from sc_compile.clock.step_clock import ClockError

from dummy_dit import DummyDiT

EAGER = {"compiler": "eager", "warmup_steps": 3, "alpha": "ones"}
VALUES = [16.0, 12.0, 10.0, 9.0, 8.5, 8.0, 4.0]


def _schedule(offset: float) -> list[float]:
    return [1000.0 - offset - 100.0 * i for i in range(len(VALUES))]


def _generation(compiled, timesteps, scale=1.0, pause=None) -> list[torch.Tensor]:
    outputs = []
    with torch.no_grad():
        for i, (value, t) in enumerate(zip(VALUES, timesteps, strict=True)):
            outputs.append(compiled(torch.ones(1, 4, 8) * value * scale, torch.tensor([t])))
            if pause is not None:
                pause(i)
    return outputs


def test_a_second_thread_gets_its_own_generation():
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options=EAGER)
    serial = [_generation(compiled, _schedule(0.0), scale) for scale in (1.0, 2.0)]
    turn = threading.Barrier(2)
    results: dict[int, list[torch.Tensor]] = {}

    def work(index: int) -> None:
        results[index] = _generation(compiled, _schedule(0.0), (1.0, 2.0)[index], pause=lambda i: turn.wait(30))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(2):  # interleaved call by call, each equal to its serial run
        for ours, theirs in zip(results[index], serial[index], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_a_thread_continuing_another_threads_generation_is_refused_before_touching_it():
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options=EAGER)
    serial = _generation(compiled, _schedule(0.0))
    halfway, resume = threading.Event(), threading.Event()
    results: list[torch.Tensor] = []

    def pause(i: int) -> None:
        if i == 3:
            halfway.set()
            resume.wait(30)

    thread = threading.Thread(target=lambda: results.extend(_generation(compiled, _schedule(0.0), pause=pause)))
    thread.start()
    halfway.wait(30)
    try:
        with torch.no_grad(), pytest.raises(ClockError, match="continues the generation another thread"):
            compiled(torch.ones(1, 4, 8) * VALUES[4], torch.tensor([_schedule(0.0)[4]]))  # its next step
    finally:
        resume.set()
        thread.join()
    for ours, theirs in zip(results, serial, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_a_thread_that_falls_behind_another_keeps_its_own_generation():
    """Thread A runs steps 0-3, thread B a whole generation of the same schedule, then A steps 4-6:
    A's next timestep goes back against B's schedule. Each generation equals its serial run (the
    former shared ambient generation let A end B's generation and start a new one mid-schedule,
    silently: A's steps 4-6 differed from its serial run)."""
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options=EAGER)
    serial = [_generation(compiled, _schedule(0.0), scale) for scale in (1.0, 2.0)]
    halfway, resume = threading.Event(), threading.Event()
    results: dict[int, list[torch.Tensor]] = {}

    def pause(i: int) -> None:
        if i == 3:
            halfway.set()
            resume.wait(30)

    thread = threading.Thread(target=lambda: results.__setitem__(0, _generation(compiled, _schedule(0.0), 1.0, pause)))
    thread.start()
    halfway.wait(30)
    try:
        results[1] = _generation(compiled, _schedule(0.0), 2.0)
    finally:
        resume.set()
        thread.join()
    for index in range(2):
        for ours, theirs in zip(results[index], serial[index], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("num_threads", [2, 3, 4])
def test_stress_threads_without_a_context(num_threads):
    """``num_threads`` threads × 20 generations each, free-running with random pauses, one schedule
    per pair of threads (shifted, so a thread's first timestep may look like another's next step): every
    generation equals its serial run, or our ClockError was raised in it."""
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options=EAGER)
    schedules = [_schedule(37.0 * (index % 2)) for index in range(num_threads)]
    serial = [_generation(compiled, schedule, 1.0 + index) for index, schedule in enumerate(schedules)]
    outcomes: dict[int, list[str]] = {index: [] for index in range(num_threads)}
    failures: list[str] = []

    def work(index: int) -> None:
        rng = random.Random(index)

        def pause(i: int) -> None:
            if rng.random() < 0.5:
                threading.Event().wait(rng.random() * 0.003)

        for trial in range(20):
            try:
                outputs = _generation(compiled, schedules[index], 1.0 + index, pause=pause)
            except ClockError:
                outcomes[index].append("refused")
                continue
            equal = all(torch.equal(a, b) for a, b in zip(outputs, serial[index], strict=True))
            outcomes[index].append("equal" if equal else "wrong")
            if not equal:
                failures.append(f"thread {index} trial {trial}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts = {kind: sum(o.count(kind) for o in outcomes.values()) for kind in ("equal", "refused", "wrong")}
    print(f"{num_threads} threads x 20 generations: {counts}")
    assert not failures, (failures, counts)
    assert sum(counts.values()) == 20 * num_threads and counts["equal"] > 0
