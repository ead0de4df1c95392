"""The session registry: every piece of state that outlives one call of a compiled graph.

One object, :data:`REGISTRY`, owns what the runtime keeps across calls; nothing else in
``sc_compile`` holds cross-call state in a module global. Everything in it is held weakly by the
object it describes, so an entry goes when that object goes (nothing is keyed by a bare ``id()``
that could outlive it and be reused):

* ``sessions``: per module (its first parameter, held weakly), per session token (the
  ``torch.compile`` call; one token for all per-block graphs of a model), the
  :class:`~sc_compile.runtime.generations.ModuleSession`, held *weakly*.
* ``holders``: per ``torch.compile`` call (its compile token, held weakly), the sessions its graphs
  served, held strongly. A session therefore lives while a ``torch.compile`` that ran it lives (or a
  generation of it runs), and dies with its pool of buffers when the compiled module is freed
  (``del compiled`` and ``torch._dynamo.reset()``, which drops Dynamo's references) or its module
  is. Runtimes hold their compile token weakly: Dynamo may keep a compiled graph (a graph
  break's resume function) after its compiled module is gone.
* ``model_of_parameter``: the model each block parameter belongs to (per-block graphs find their
  model from a parameter); both weak.
* ``cached_compiles``: the compile tokens of the ``torch.compile`` calls that built a graph that
  caches blocks (a split forward's piece without blocks refuses to run when there is none); weak.
* ``threads``: per thread, the forward a split model's pieces run in (by compile token, weak) and
  the parameter that identified the last per-block unit that ran (weak).
* ``activity``: a counter that orders sessions by their last call (``sc_compile.report`` reads
  the latest).
* ``live_states``: every live :class:`~sc_compile.runtime.state.StreamState` (a weak set): the
  accounting tests use to check that buffers are freed.
* ``enabled_classes``: the pipeline subclasses ``sc_compile.enable`` made, per pipeline class (a
  class lives as long as the process; its subclass holds it anyway).

Context variables are per-context by design (each thread and asyncio task sees its own) and stay
beside the code that sets them: ``_SCOPES`` (the open generation scopes), ``_UNCACHED`` (modules
whose calls run outside any generation) and ``_STREAM_NAMES`` (``cache_context`` names) in
``sc_compile/runtime/generations.py``, and ``_RUNS`` (the pipeline calls running under
``sc_compile.enable``) in ``sc_compile/clock/pipeline.py``. They hold nothing after their context
exits.

:meth:`Registry.reset` forgets everything (tests call it between tests).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import torch

# The registry sits below the runtime modules that use it (it imports none of them, not even for
# types): a session is any object (sc_compile.runtime.generations.ModuleSession), a live state any
# object with ``nbytes`` (sc_compile.runtime.state.StreamState).
Session = Any
State = Any

__all__ = ["LIVE_STREAM_STATES", "REGISTRY", "IdentityMap", "Registry", "held_weakly", "reset"]

K = TypeVar("K")
V = TypeVar("V")


class IdentityMap(Generic[K, V]):
    """A map keyed by object identity whose entries go when their key is garbage collected.

    Not a ``weakref.WeakKeyDictionary``: that compares keys with ``==``, which on tensors is
    element-wise. A key that cannot be weakly referenced (``None``, a tuple constant) is held.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Callable[[], Any], V]] = {}

    def _pruner(self, key_id: int) -> Callable[[Any], None]:
        entries = self._entries

        def prune(ref: Any) -> None:
            entry = entries.get(key_id)
            if entry is not None and entry[0] is ref:
                entries.pop(key_id, None)

        return prune

    def get(self, key: K) -> V | None:
        entry = self._entries.get(id(key))
        if entry is not None and entry[0]() is key:
            return entry[1]
        return None

    def __contains__(self, key: K) -> bool:
        entry = self._entries.get(id(key))
        return entry is not None and entry[0]() is key

    def set(self, key: K, value: V) -> None:
        try:
            ref: Callable[[], Any] = weakref.ref(key, self._pruner(id(key)))
        except TypeError:
            ref = _Strong(key)
        self._entries[id(key)] = (ref, value)

    def setdefault(self, key: K, make: Callable[[], V]) -> V:
        value = self.get(key)
        if value is None:
            value = make()
            self.set(key, value)
        return value

    def pop(self, key: K) -> V | None:
        value = self.get(key)
        if value is not None:
            self._entries.pop(id(key), None)
        return value

    def values(self) -> list[V]:
        return [value for ref, value in list(self._entries.values()) if ref() is not None or isinstance(ref, _Strong)]

    def items(self) -> Iterator[tuple[K, V]]:
        for ref, value in list(self._entries.values()):
            key = ref()
            if key is not None or isinstance(ref, _Strong):
                yield key, value

    def __len__(self) -> int:
        return len(self.values())

    def clear(self) -> None:
        self._entries.clear()


def held_weakly(value: Any) -> Callable[[], Any]:
    """A weak reference to ``value``, or a strong one where it cannot be weakly referenced."""
    try:
        return weakref.ref(value)
    except TypeError:
        return _Strong(value)


class _Strong:
    """A strong reference that reads like a weak one (for keys that cannot be weakly referenced)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __call__(self) -> Any:
        return self.value


class _Thread(threading.local):
    """What one thread remembers between calls."""

    def __init__(self) -> None:
        # compile token -> the forward of a split model running in this thread (see dispatch.py).
        self.forwards: IdentityMap[Any, Any] = IdentityMap()
        # The parameter that identified the last per-block unit that ran in this thread.
        self._anchor: Callable[[], Any] = lambda: None

    @property
    def anchor(self) -> torch.Tensor | None:
        return self._anchor()

    @anchor.setter
    def anchor(self, parameter: torch.Tensor | None) -> None:
        self._anchor = (lambda: None) if parameter is None else weakref.ref(parameter)


class Registry:
    """All cross-call state of the runtime (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        # One set for the process (``reset`` empties it): ``LIVE_STREAM_STATES`` names it.
        self.live_states: weakref.WeakSet[State] = weakref.WeakSet()
        self._reset()

    def _reset(self) -> None:
        # module key -> (session token, session) pairs, both held weakly.
        self.sessions: IdentityMap[Any, list[tuple[Callable[[], Any], Callable[[], Any]]]] = IdentityMap()
        # compile token -> the sessions its graphs served (they live as long as it does).
        self.holders: IdentityMap[Any, list[Session]] = IdentityMap()
        # parameter -> weak reference to the model holding it.
        self.model_of_parameter: IdentityMap[Any, weakref.ReferenceType[Any]] = IdentityMap()
        self.cached_compiles: IdentityMap[Any, bool] = IdentityMap()
        self.threads = _Thread()
        self._activity = itertools.count(1)
        self.live_states.clear()
        self.enabled_classes: dict[type, type] = {}

    def reset(self) -> None:
        """Forget every session, model, compile, thread record and activity count (for tests).
        The sessions' pools are emptied: a runtime still alive starts a new session."""
        with self.lock:
            for _, entries in self.sessions.items():
                for _, ref in entries:
                    session = ref()
                    if session is not None:
                        session.pool.clear()
            self._reset()

    # -- sessions ------------------------------------------------------------------------------
    def session(self, key: Any, token: Any, make: Callable[[], Session], holder: Any) -> Session:
        """The live session of module ``key`` under session ``token`` (``make`` one where none
        lives), held by the ``torch.compile`` call ``holder`` (its compile token)."""
        with self.lock:
            entries = self.sessions.setdefault(key, list)
            session, same = _find(entries, token)
            if session is None or not same:
                # Neither the token nor the session is held here. Equal tokens share a session
                # (torch.compile's wrappers of one backend and options compare equal): each is noted.
                session = session or make()
                entries[:] = [(t, s) for t, s in entries if s() is not None and not _dead(t)]
                entries.append((held_weakly(token), weakref.ref(session)))
            if holder is not None:  # None: the caller holds it (a graph built outside a torch.compile call)
                held = self.holders.setdefault(holder, list)
                if not any(s is session for s in held):
                    held.append(session)
            return session

    def sessions_of(self, key: Any) -> list[Session]:
        with self.lock:
            return [s for _, ref in list(self.sessions.get(key) or []) if (s := ref()) is not None]

    def activity(self) -> int:
        """The next activity count (a session's last call)."""
        return next(self._activity)

    # -- per-block graphs ----------------------------------------------------------------------
    def register_model(self, model: torch.nn.Module) -> None:
        """Remember which model each of ``model``'s parameters belongs to."""
        model_ref = weakref.ref(model)
        with self.lock:
            for parameter in model.parameters():
                self.model_of_parameter.set(parameter, model_ref)

    def model_of(self, parameter: torch.Tensor) -> torch.nn.Module | None:
        ref = self.model_of_parameter.get(parameter)
        return ref() if ref is not None else None

    # -- compiles ------------------------------------------------------------------------------
    def note_cached_compile(self, token: Any) -> None:
        """A graph that caches blocks was built under the ``torch.compile`` call ``token``."""
        self.cached_compiles.set(token, True)

    def compile_caches(self, token: Any) -> bool:
        return token in self.cached_compiles

    # -- accounting ----------------------------------------------------------------------------
    def add_state(self, state: State) -> None:
        self.live_states.add(state)

    def live_state_count(self) -> int:
        """The number of stream states alive now (pooled, in use, or awaiting collection)."""
        return len(self.live_states)

    def live_state_bytes(self) -> int:
        return sum(state.nbytes for state in list(self.live_states))


def _find(entries: list[tuple[Callable[[], Any], Callable[[], Any]]], token: Any) -> tuple[Session | None, bool]:
    """The live session of ``token`` among ``entries``, and whether it was noted for this very token."""
    equal = None
    for token_ref, session_ref in entries:
        known, session = token_ref(), session_ref()
        if session is None or _dead(token_ref):
            continue
        if known is token:
            return session, True
        if equal is None and known is not None and known == token:
            equal = session
    return equal, False


def _dead(token_ref: Callable[[], Any]) -> bool:
    """Whether a token held weakly was collected (a token held strongly, ``None`` included, is not:
    a graph built outside a ``torch.compile`` call, or one whose call was collected while Dynamo
    still runs its graph, has the token ``None``, and its session must be found again)."""
    return not isinstance(token_ref, _Strong) and token_ref() is None


REGISTRY = Registry()
# Every live StreamState (the registry's accounting), so tests can check that buffers are freed.
LIVE_STREAM_STATES = REGISTRY.live_states


def reset() -> None:
    """Forget all cross-call state (``REGISTRY.reset()``)."""
    REGISTRY.reset()
