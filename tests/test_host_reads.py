"""Issue 13, part 1: the hot path. Counts device→host reads and allocations per call.

Every way Python can read a tensor's values (``item``, ``tolist``, ``float()``, ``int()``,
``bool()``, ``cpu()``) and every tensor constructor the runtime could call is wrapped while the
compiled model runs. Under the pipeline clock a cached step reads nothing and allocates nothing,
and a full step reads at most once (the statistics the next decision needs; at the first step,
the timestep, to check the batch).
"""

from __future__ import annotations

import pytest
import torch
from test_clock import EAGER, LoopPipeline, _latents

import sc_compile
from sc_compile.runtime.dispatch import ScalingCacheRuntime

from dummy_dit import DummyDiT

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu")
CONSTRUCTORS = ("tensor", "zeros", "ones", "empty", "full", "zeros_like", "empty_like", "as_tensor")


class Counter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.reads = 0
        self.allocations = 0
        self.host_views: list[int] = []  # data pointers of host tensors viewed through numpy
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original, "reads"))
        for name in CONSTRUCTORS:
            monkeypatch.setattr(torch, name, self._counting(getattr(torch, name), "allocations"))
        stack = torch.stack

        def counting_stack(*args, **kwargs):
            if kwargs.get("out") is None:  # stacking into preallocated memory allocates nothing
                self.allocations += 1
            return stack(*args, **kwargs)

        monkeypatch.setattr(torch, "stack", counting_stack)
        numpy = torch.Tensor.numpy

        def counting_numpy(tensor, *args, **kwargs):
            self.host_views.append(tensor.data_ptr())
            return numpy(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "numpy", counting_numpy)

    def _counting(self, original, field):
        def wrapped(*args, **kwargs):
            setattr(self, field, getattr(self, field) + 1)
            return original(*args, **kwargs)

        return wrapped


def _per_call(monkeypatch, run):
    """(full, reads, allocations, numpy views) of every call of a compiled graph during ``run``."""
    counter = Counter(monkeypatch)
    calls = []
    original = ScalingCacheRuntime.__call__

    def counted(self, *args):
        reads, allocations, views = counter.reads, counter.allocations, len(counter.host_views)
        full_before = self.num_full_calls
        out = original(self, *args)
        calls.append(
            (
                self.num_full_calls > full_before,
                counter.reads - reads,
                counter.allocations - allocations,
                counter.host_views[views:],
            )
        )
        return out

    monkeypatch.setattr(ScalingCacheRuntime, "__call__", counted)
    run()
    monkeypatch.undo()
    return calls


def _pipeline_calls(monkeypatch, options):
    """The per-call counts of a 16-step generation under the pipeline clock (compiled beforehand)."""
    model = DummyDiT()
    pipe = sc_compile.enable(LoopPipeline(torch.compile(model, backend="scalingcache", options=options)))
    with torch.no_grad():
        pipe(_latents(), 16)  # compile outside the count

    def run():
        with torch.no_grad():
            pipe(_latents(1), 16)

    return model, _per_call(monkeypatch, run)


def test_pipeline_clock_cached_steps_read_nothing_and_allocate_nothing(monkeypatch):
    model, calls = _pipeline_calls(monkeypatch, EAGER)
    report = sc_compile.report(model)
    assert len(calls) == 16 and report.cached_steps
    print("pipeline clock, per call (full, reads, allocations):", [(f, r, a) for f, r, a, _ in calls])
    for index, (full, reads, allocations, _) in enumerate(calls):
        # The statistics of a full step are read once, when the next call decides (not those of
        # the first step, which measures nothing); the first call reads the timestep once, to
        # check the batch.
        after_full = index > 1 and calls[index - 1][0]
        assert reads == (1 if after_full or index == 0 else 0), (index, calls)
        if not full:
            assert allocations == 0, (index, calls)
    assert sum(r for _, r, _, _ in calls) <= sum(f for f, *_ in calls)  # at most one read per full step
    # Coefficients are written into preallocated host memory (the device buffers, on the CPU):
    # the generation's fixed first-step and catch-up vectors once, then one buffer every step.
    views = [ptrs for *_, ptrs in calls]
    assert len(views[0]) == 3 and all(v == views[1] for v in views[1:]) and len(views[1]) == 1


def test_a_planned_schedule_reads_nothing_after_the_first_call(monkeypatch):
    """A budget (or a static interval) does not depend on the changes: no statistics are read."""
    model, calls = _pipeline_calls(monkeypatch, {**EAGER, "warmup_steps": 2, "full_steps": 6})
    report = sc_compile.report(model)
    assert report.num_full_steps == 6 and len(calls) == 16
    # The first call checks the batch's timestep and plans the schedule (a search over host
    # tensors of the α table); after it nothing is read, at full steps either.
    assert [reads for _, reads, _, _ in calls[1:]] == [0] * 15, calls
    assert all(allocations == 0 for full, _, allocations, _ in calls if not full)


def test_timestep_clock_reads_the_timestep_once_per_call_until_the_loop_repeats(monkeypatch):
    """A hand-written loop: its generations read every call's timestep until two in a row made the
    same calls (here the second and third runs: the compile run had another schedule); the next
    reads only its first call's (its other calls are placed by count, their timesteps copied and
    compared after full steps)."""
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options=EAGER)
    values = [16.0, 12.0, 10.0, 9.0, 8.5, 8.0, 4.0]

    def run(first=1000.0):
        with torch.no_grad():
            for i, value in enumerate(values):
                compiled(torch.ones(1, 4, 8) * value, torch.tensor([first - 100.0 * i]))

    run(first=999.0)  # compile
    for counted in (False, True):
        if counted:
            run()  # a second generation with the same calls: the loop has repeated itself
        calls = _per_call(monkeypatch, run)
        print(f"timestep clock, counted={counted}, per call (full, reads, allocations):", [c[:3] for c in calls])
        for index, (full, reads, allocations, _) in enumerate(calls):
            after_full = index > 1 and calls[index - 1][0]
            timestep_read = not counted or index == 0
            assert reads == timestep_read + after_full, (index, calls)  # the timestep, the statistics
            if not full:
                assert allocations == 0, (index, calls)
        assert sc_compile.report(model).clock_note.startswith("calls after the first placed by count") == counted


def test_outputs_never_alias_the_cache_state():
    """What a caller keeps is never storage a later step writes (the contract CUDA graphs need)."""
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options=EAGER)
    from sc_compile.runtime.dispatch import latest_runtime

    outputs = []
    with torch.no_grad():
        for i, value in enumerate([16.0, 12.0, 10.0, 9.0, 8.5, 8.0, 4.0]):
            outputs.append(compiled(torch.ones(1, 4, 8) * value, torch.tensor([1000.0 - 100.0 * i])))
    runtime = latest_runtime(model)
    state_pointers = {b.untyped_storage().data_ptr() for s in runtime.streams for b in (*s.buffers, s.stats)}
    assert state_pointers
    assert all(out.untyped_storage().data_ptr() not in state_pointers for out in outputs)
    assert all(getattr(b, "_dynamo_static_input_type", None) for s in runtime.streams for b in s.buffers)


def test_a_cached_step_mutates_nothing():
    """The cached-step graph reads the state and writes nothing: not the state, not the inputs."""
    from sc_compile.runtime.dispatch import latest_runtime

    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options=EAGER)
    with torch.no_grad():
        for i, value in enumerate([16.0, 12.0, 10.0]):  # the warm-up: full steps
            compiled(torch.ones(1, 4, 8) * value, torch.tensor([1000.0 - 100.0 * i]))
        runtime = latest_runtime(model)
        state = [t for s in runtime.streams for t in (*s.buffers, s.stats)]
        inputs = (torch.ones(1, 4, 8) * 9.0, torch.tensor([700.0]))
        versions = [t._version for t in (*state, *inputs)]
        cached_before = runtime.num_cached_calls
        compiled(*inputs)
    assert runtime.num_cached_calls == cached_before + 1  # the call was a cached step
    assert [t._version for t in (*state, *inputs)] == versions
