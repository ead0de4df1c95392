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
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from sc_compile.runtime.generations import (
    GenerationScope,
    PipelineRun,
    module_key,
    pop_scope,
    pop_stream_name,
    pop_uncached,
    push_scope,
    push_stream_name,
    push_uncached,
    sessions_of,
)
from sc_compile.runtime.registry import REGISTRY

_MARK = "_sc_compile_wrapper"
_RUNS: contextvars.ContextVar[tuple[PipelineRun, ...]] = contextvars.ContextVar("sc_compile_runs", default=())


def _denoiser_names(pipe: Any, names: Sequence[str] | None) -> tuple[str, ...]:
    if names is not None:
        missing = [n for n in names if not isinstance(getattr(pipe, n, None), torch.nn.Module)]
        if missing:
            raise ValueError(f"sc_compile.enable: the pipeline has no module(s) {missing}")
        return tuple(names)
    components = getattr(pipe, "components", None) or vars(pipe)
    found = tuple(
        n
        for n, c in components.items()
        if isinstance(c, torch.nn.Module) and (n.startswith("transformer") or n == "unet")
    )
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
    return pipe


def disable(pipe: Any) -> Any:
    """Undo :func:`enable`."""
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
    return pipe


def _call(self: Any, *args: Any, **kwargs: Any) -> Any:
    scheduler = self.scheduler
    _wrap_scheduler_step(scheduler)
    modules = [m for n in self._sc_compile_denoisers if isinstance(m := getattr(self, n, None), torch.nn.Module)]
    for module in modules:
        _wrap_cache_context(module)
    run = PipelineRun(scheduler)
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
