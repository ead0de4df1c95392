"""``sc_compile.enable(pipe)``: the pipeline's own step clock for a ScalingCache-compiled denoiser.

Enabling a diffusers pipeline (any object with a ``scheduler`` and denoiser components) makes
every call of it one generation of each denoiser (``transformer``, ``transformer_2``, ``unet``):

* the generation starts when the pipeline call starts and ends (its report built, its buffers
  freed) when the call returns or raises;
* a step ends when the pipeline's ``scheduler.step`` returns, and the step count is the scheduler's
  (``len(scheduler.timesteps)`` less its begin index, after ``set_timesteps``), so warm-up and
  ``final_full_steps`` know it exactly;
* streams are named by the pipeline's ``transformer.cache_context("cond" | "uncond")`` where the
  pipeline uses one (numbered by call order in the step where it does not); a call the pipeline
  makes outside any ``cache_context`` while it names its streams, and any call inside a
  ``callback_on_step_end`` function, is a side call: it runs in full on scratch state and leaves
  the generation alone;
* a scheduler step that draws random numbers (a stochastic sampler) is detected by comparing the
  random generators' states around it.

The pipeline object's class is swapped for a subclass whose ``__call__`` does the above; the
scheduler's ``step`` and the denoisers' ``cache_context`` are wrapped per instance.
``sc_compile.disable(pipe)`` undoes all of it.

**The one line.** ``enable`` is optional for a ``diffusers.DiffusionPipeline``: a call of a
compiled denoiser with no generation open looks up the Python stack for the ``__call__`` of a
pipeline that holds the denoiser (:func:`scope_for_call`; a walk over frames, no tensor read).
Found, the pipeline is enabled as above for its next calls, and the call already running is
*adopted*: a generation of each of its denoisers that starts at the scheduler step it is at and ends
at its last ``scheduler.step`` (or, interrupted, when the next call finds the pipeline call gone).
Its first call ran inside a ``cache_context`` entered before the integration could name it; the
clock lets that unnamed stream be claimed by the first new name of the next step. A call inside
the adopted call's ``callback_on_step_end`` (found on the stack) is a side call; a call after its
last scheduler step runs in full on scratch state. ``disable(pipe)`` also stops the adoption of that
pipeline. Without a pipeline on the stack (a hand-written loop) the timestep clock places calls.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import sys
import types
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from sc_compile.runtime.generations import (
    GenerationScope,
    PipelineRun,
    active_scope,
    module_key,
    pop_scope,
    pop_stream_name,
    pop_uncached,
    push_scope,
    push_stream_name,
    push_uncached,
    remove_scope,
    scheduler_calls,
    scheduler_order,
    sessions_of,
)
from sc_compile.runtime.registry import REGISTRY

_MARK = "_sc_compile_wrapper"
_RUNS: contextvars.ContextVar[tuple[PipelineRun, ...]] = contextvars.ContextVar("sc_compile_runs", default=())


def _found_denoisers(pipe: Any) -> tuple[str, ...]:
    """The pipeline's denoiser components: every ``transformer*`` and ``unet`` module."""
    components = {**vars(pipe), **(getattr(pipe, "components", None) or {})}
    return tuple(
        n
        for n, c in components.items()
        if isinstance(c, torch.nn.Module) and (n.startswith("transformer") or n == "unet")
    )


def _denoiser_names(pipe: Any, names: Sequence[str] | None) -> tuple[str, ...]:
    if names is not None:
        missing = [n for n in names if not isinstance(getattr(pipe, n, None), torch.nn.Module)]
        if missing:
            raise ValueError(f"sc_compile.enable: the pipeline has no module(s) {missing}")
        return tuple(names)
    found = _found_denoisers(pipe)
    if not found:
        raise ValueError(
            f"sc_compile.enable: {type(pipe).__name__} has no `transformer*` or `unet` component; name the "
            "denoiser(s) with enable(pipe, denoisers=['...'])."
        )
    return found


def enable(pipe: Any, *, denoisers: Sequence[str] | None = None) -> Any:
    """Give the ScalingCache-compiled denoisers of ``pipe`` the pipeline's step clock (see module doc).

    ``denoisers`` names the pipeline attributes holding the denoisers (default: every
    ``transformer*`` and ``unet`` component). Returns ``pipe``.
    """
    if not hasattr(pipe, "scheduler"):
        raise ValueError(f"sc_compile.enable needs a pipeline with a scheduler, but {type(pipe).__name__} has none")
    names = _denoiser_names(pipe, denoisers)
    cls = type(pipe)
    if not getattr(cls, "_sc_compile_enabled", False):
        enabled = REGISTRY.enabled_classes.get(cls)
        if enabled is None:
            enabled = REGISTRY.enabled_classes[cls] = type(
                cls.__name__,
                (cls,),
                {
                    "__call__": _call,
                    "_sc_compile_enabled": True,
                    "__module__": cls.__module__,
                    "__qualname__": cls.__qualname__,
                },
            )
        pipe.__class__ = enabled
    pipe._sc_compile_denoisers = names
    vars(pipe).pop(_NO_ADOPTION, None)
    return pipe


def disable(pipe: Any) -> Any:
    """Undo :func:`enable`, and stop the adoption of ``pipe``'s calls (the one line)."""
    cls = type(pipe)
    if getattr(cls, "_sc_compile_enabled", False):
        pipe.__class__ = cls.__mro__[1]
    for name in getattr(pipe, "_sc_compile_denoisers", ()):
        module = getattr(pipe, name, None)
        inner = getattr(module, "_orig_mod", module)
        if inner is not None and getattr(vars(inner).get("cache_context"), _MARK, False):
            del inner.__dict__["cache_context"]
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is not None and getattr(vars(scheduler).get("step"), _MARK, False):
        del scheduler.__dict__["step"]
    vars(pipe).pop("_sc_compile_denoisers", None)
    vars(pipe)[_NO_ADOPTION] = True
    return pipe


def _modules(pipe: Any) -> list[torch.nn.Module]:
    """The pipeline's enabled denoisers, one per module (one module may serve as two experts)."""
    modules: list[torch.nn.Module] = []
    keys: list[Any] = []
    for name in pipe._sc_compile_denoisers:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module) and not any(k is module_key(module) for k in keys):
            modules.append(module)
            keys.append(module_key(module))
    return modules


def _call(self: Any, *args: Any, **kwargs: Any) -> Any:
    scheduler = self.scheduler
    _wrap_scheduler_step(scheduler)
    modules = _modules(self)
    for module in modules:
        _wrap_cache_context(module)
    end_stale_adoptions(ending=self)
    run = PipelineRun(scheduler, order=scheduler_order(scheduler))
    scopes = [GenerationScope(key=module_key(m), pipeline=run) for m in modules]
    for module in modules:
        _end_ambient(module)
    for key in ("callback_on_step_end", "callback"):
        callback = kwargs.get(key)
        if callable(callback) and _is_plain_callable(callback):
            kwargs[key] = _side_calls_inside(callback, [s.key for s in scopes])
    tokens = [push_scope(scope) for scope in scopes]
    run_token = _RUNS.set((*_RUNS.get(), run))
    error: BaseException | None = None
    try:
        return super(type(self), self).__call__(*args, **kwargs)
    except BaseException as caught:
        error = caught
        raise
    finally:
        _RUNS.reset(run_token)
        for token in reversed(tokens):
            pop_scope(token)
        for scope in scopes:
            scope.finish(error)


def _is_plain_callable(callback: Any) -> bool:
    """A function or method; diffusers' callback objects carry ``tensor_inputs`` the pipeline reads,
    so they are left as they are (calls they make outside ``cache_context`` are side calls anyway)."""
    return not hasattr(callback, "tensor_inputs")


def _side_calls_inside(callback: Any, keys: list[Any]) -> Any:
    @functools.wraps(callback)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        tokens = [push_uncached(key) for key in keys]
        try:
            return callback(*args, **kwargs)
        finally:
            for token in reversed(tokens):
                pop_uncached(token)

    return wrapped


def _end_ambient(module: torch.nn.Module) -> None:
    """Free a timestep-placed generation this thread left running on ``module``."""
    import threading

    for session in sessions_of(module):
        ambient = session.ambient
        if ambient is not None and ambient.owner == threading.get_ident():
            session.end_ambient()


def _generator_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    generators = kwargs.get("generator")
    if generators is None:
        generators = []
    elif isinstance(generators, torch.Generator):
        generators = [generators]
    states = [g.get_state() for g in generators if isinstance(g, torch.Generator)]
    states.append(torch.default_generator.get_state())
    if torch.cuda.is_initialized():
        states.extend(g.get_state() for g in torch.cuda.default_generators)
    return states


def _wrap_scheduler_step(scheduler: Any) -> None:
    if getattr(vars(scheduler).get("step"), _MARK, False):
        return
    original = scheduler.step

    @functools.wraps(original)
    def step(*args: Any, **kwargs: Any) -> Any:
        runs = [run for run in _RUNS.get() if run.scheduler is scheduler]
        if not runs:
            return original(*args, **kwargs)
        run = runs[-1]
        before = None if run.stochastic else _generator_states(args, kwargs)
        result = original(*args, **kwargs)
        if before is not None:
            after = _generator_states(args, kwargs)
            run.stochastic = any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        run.steps_taken += 1
        _end_adopted_after_last_step(run)
        return result

    setattr(step, _MARK, True)
    scheduler.step = step


def _wrap_cache_context(module: torch.nn.Module) -> None:
    inner = getattr(module, "_orig_mod", module)
    original = getattr(inner, "cache_context", None)
    if original is None or getattr(original, _MARK, False):
        return
    key = module_key(inner)

    @contextlib.contextmanager
    def cache_context(name: str, **kwargs: Any) -> Iterator[None]:
        token = push_stream_name(key, name)
        try:
            with original(name, **kwargs):
                yield
        finally:
            pop_stream_name(token)

    setattr(cache_context, _MARK, True)
    inner.__dict__["cache_context"] = cache_context


# -- the one line: adopting a pipeline call already running ---------------------------------------
_NO_ADOPTION = "_sc_compile_no_adoption"


@dataclasses.dataclass(eq=False)
class _Adopted:
    """A pipeline call adopted while running: its generations, and how to find its frame."""

    pipe: weakref.ReferenceType[Any]
    run: PipelineRun
    scopes: list[GenerationScope]
    keys: list[Any]
    # The frame running the pipeline's __call__, by identity (a frame object is never held: it
    # would keep the call's locals alive); unique while the call runs.
    frame_id: int
    code: types.CodeType
    # Code of the step callbacks the call was given: a model call under one is a side call.
    callback_codes: frozenset[types.CodeType]
    finished: bool = False


# Adopted pipeline calls of this thread (or task); finished ones are kept until their frame is gone,
# so that a call after the last scheduler step of the same pipeline call is known as one.
_ADOPTED: contextvars.ContextVar[tuple[_Adopted, ...]] = contextvars.ContextVar("sc_compile_adopted", default=())


def scope_for_call(key: Any) -> tuple[GenerationScope | None, bool]:
    """The generation scope of a call of the compiled module ``key``, and whether the call is a side
    call (run in full on scratch state, outside any generation).

    The scope opened in this context, else the pipeline call found on the stack (adopted), else
    ``None`` (the timestep clock). Costs nothing but a context-variable read where no pipeline call
    was adopted in this context and a scope is open.
    """
    scope = active_scope(key)
    adopted = _ADOPTED.get()
    if scope is not None and not adopted:
        return scope, _after_last_step(scope)
    if adopted:
        record = next((a for a in adopted if not a.finished and any(k is key for k in a.keys)), None)
        if record is not None:
            where = _find_frame(record)
            if where is None:  # the adopted call returned or raised before its last scheduler step
                _finish(record, interrupted=True)
            else:
                scope = active_scope(key)
                return scope, where or _after_last_step(scope)
        scope = active_scope(key)
        if scope is not None:
            return scope, _after_last_step(scope)
    found = _pipeline_frame(key)
    if found is None:
        return None, False
    frame, pipe = found
    for record in _ADOPTED.get():
        if record.finished and record.frame_id == id(frame) and record.code is frame.f_code and record.pipe() is pipe:
            return None, True  # a call after the adopted call's last scheduler step
    calls = scheduler_calls(pipe.scheduler)
    if calls is not None and _steps_taken(pipe.scheduler) >= calls:
        return None, True  # the loop has run (a refinement after it): nothing of a generation is left
    return _adopt(frame, pipe, key), False


def _after_last_step(scope: GenerationScope | None) -> bool:
    """Whether a call in ``scope`` comes after the pipeline call's last scheduler step (a call after
    the denoising loop): it runs in full on scratch state, outside the finished generation."""
    run = scope.pipeline if scope is not None else None
    if run is None or not run.steps_taken:
        return False
    calls = scheduler_calls(run.scheduler)
    return calls is not None and run.steps_taken >= calls


def _pipeline_frame(key: Any) -> tuple[types.FrameType, Any] | None:
    """The innermost frame running ``__call__`` of a diffusers ``DiffusionPipeline`` that holds the
    module ``key`` among its denoisers and has not been disabled, and that pipeline."""
    diffusers = sys.modules.get("diffusers")
    if diffusers is None:  # no diffusers pipeline can be running
        return None
    pipeline_class = getattr(diffusers, "DiffusionPipeline", None)
    if pipeline_class is None:
        return None
    frame: types.FrameType | None = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__call__" and code.co_argcount and code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            if isinstance(owner, pipeline_class):
                if vars(owner).get(_NO_ADOPTION) or not hasattr(owner, "scheduler"):
                    return None
                names = getattr(owner, "_sc_compile_denoisers", None) or _found_denoisers(owner)
                if any(
                    module_key(m) is key for n in names if isinstance(m := getattr(owner, n, None), torch.nn.Module)
                ):
                    return frame, owner
                return None
        frame = frame.f_back
    return None


def _adopt(frame: types.FrameType, pipe: Any, key: Any) -> GenerationScope | None:
    """Enable ``pipe`` for its next calls and open the generations of the call ``frame`` runs."""
    if not getattr(type(pipe), "_sc_compile_enabled", False):
        enable(pipe)
    scheduler = pipe.scheduler
    _wrap_scheduler_step(scheduler)
    modules = _modules(pipe)
    for module in modules:
        _wrap_cache_context(module)
    end_stale_adoptions(ending=pipe)
    for module in modules:
        _end_ambient(module)
    run = PipelineRun(scheduler, order=scheduler_order(scheduler))
    run.steps_taken = run.adopted_at = _steps_taken(scheduler)
    scopes = [GenerationScope(key=module_key(m), pipeline=run) for m in modules]
    callbacks = [frame.f_locals.get(name) for name in ("callback_on_step_end", "callback")]
    record = _Adopted(
        pipe=weakref.ref(pipe),
        run=run,
        scopes=scopes,
        keys=[s.key for s in scopes],
        frame_id=id(frame),
        code=frame.f_code,
        callback_codes=frozenset(
            code for c in callbacks if callable(c) and _is_plain_callable(c) and (code := _code_of(c)) is not None
        ),
    )
    for scope in scopes:
        push_scope(scope)
    _RUNS.set((*_RUNS.get(), run))
    _ADOPTED.set((*(a for a in _ADOPTED.get() if not a.finished), record))
    return active_scope(key)


def _steps_taken(scheduler: Any) -> int:
    """The ``scheduler.step`` calls made so far in the running pipeline call (diffusers schedulers
    count them in ``step_index``, ``None`` before the first)."""
    index = getattr(scheduler, "step_index", None)
    if not isinstance(index, int):
        return 0
    return max(index - (getattr(scheduler, "begin_index", None) or 0), 0)


def _code_of(callback: Any) -> types.CodeType | None:
    function = getattr(callback, "__func__", callback)
    code = getattr(function, "__code__", None)
    if code is None:
        call = next((vars(k)["__call__"] for k in type(callback).__mro__ if "__call__" in vars(k)), None)
        code = getattr(call, "__code__", None)
    return code if isinstance(code, types.CodeType) else None


def _find_frame(record: _Adopted) -> bool | None:
    """Whether the current call runs under a step callback of ``record``'s pipeline call (``None``:
    that call's frame is no longer on the stack)."""
    frame: types.FrameType | None = sys._getframe(2)
    in_callback = False
    while frame is not None:
        if id(frame) == record.frame_id and frame.f_code is record.code:
            return in_callback
        if frame.f_code in record.callback_codes:
            in_callback = True
        frame = frame.f_back
    return None


def _finish(record: _Adopted, interrupted: bool) -> None:
    """End ``record``'s generations (their reports built, their buffers freed) and close its scopes."""
    if record.finished:
        return
    record.finished = True
    _RUNS.set(tuple(r for r in _RUNS.get() if r is not record.run))
    for scope in record.scopes:
        remove_scope(scope)
    for scope in record.scopes:
        for generation in list(scope.generations.values()):
            generation.session.finish(generation, interrupted=interrupted)
        scope.generations.clear()


def _end_adopted_after_last_step(run: PipelineRun) -> None:
    if run.adopted_at is None:
        return
    calls = scheduler_calls(run.scheduler)
    if calls is not None and run.steps_taken >= calls:
        for record in _ADOPTED.get():
            if record.run is run:
                _finish(record, interrupted=False)


def end_stale_adoptions(ending: Any = None) -> None:
    """End the adopted pipeline calls of this context whose frame has left the stack (interrupted
    ones), and every one of the pipeline ``ending`` (a new call of it starts), then forget them."""
    records = _ADOPTED.get()
    if not records:
        return
    for record in records:
        if not record.finished and (record.pipe() is ending or _find_frame(record) is None):
            _finish(record, interrupted=True)
    _ADOPTED.set(tuple(a for a in records if not a.finished))
