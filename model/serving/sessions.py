"""The session cache: each consultation's model state (its KV cache), what that state holds, and the
byte budget of the idle ones.

A session keeps the runner's state of what it has already fed the model, with the `positions` that
describe it. A new prompt is compared position by position with them; only the differing tail is prefilled.
Idle sessions are kept within a byte budget, least recently used dropped first; a dropped session
simply prefills its whole prompt next time. The state is opaque here: the runner makes it, and it
reports its own size (`nbytes()`).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from model.serving.requests import Position, inside_image


@dataclass
class Session:
    state: Any  # the runner's state (None while the decode batch holds it)
    positions: list[Position] = field(default_factory=list)  # exactly what `state` holds
    busy: bool = False  # an answer is decoding into it (or was left open by its consumer)
    name: str | None = None  # None: used for one answer, then freed


def common_prefix(a: list[Position], b: list[Position]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reusable(cached: list[Position], positions: list[Position]) -> int:
    """How many leading positions of `positions` a state holding `cached` can keep."""
    reuse = min(common_prefix(cached, positions), len(positions) - 1)  # the last position must run to give logits
    while reuse > 0 and inside_image(positions[reuse]):
        reuse -= 1  # never start inside an image's run
    return reuse


class SessionCache:
    def __init__(self, new_state: Callable[[], Any], budget_bytes: int,
                 free_state: Callable[[Any], None] = lambda state: None) -> None:
        self.new_state, self.free_state = new_state, free_state
        self.budget_bytes = budget_bytes
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, name: str | None) -> Session:
        """The named session, marked busy for one answer (None: a fresh one of no name). A session still
        busy belongs to an answer whose consumer went away without closing it (a cancelled request, a
        closed tab): waiting for it could wait forever, so the name gets a fresh state and re-prefills."""
        if name is None:
            return Session(self.new_state(), busy=True)
        with self._lock:
            session = self._sessions.get(name)
            if session is None or session.busy or session.state is None:
                session = self._sessions[name] = Session(self.new_state(), name=name)
            session.busy = True
            self._sessions.move_to_end(name)
            return session

    def closest(self, family: str, positions: list[Position]) -> str:
        """The idle session of `family` (a name prefix) sharing the most leading positions with `positions`,
        or a new name in the family when none shares any."""
        with self._lock:
            best, name = 0, None
            for key, session in self._sessions.items():
                if key.startswith(family) and not session.busy and session.state is not None:
                    shared = common_prefix(session.positions, positions)
                    if shared > best:
                        best, name = shared, key
            return name or f"{family}{os.urandom(8).hex()}"

    def positions_of(self, name: str) -> list[Position] | None:
        with self._lock:
            session = self._sessions.get(name)
            return None if session is None else list(session.positions)

    def release(self, session: Session) -> None:
        """An answer left the session: it is idle again (or freed, when it has no name or was forgotten
        meanwhile), and the budget is enforced."""
        with self._lock:
            session.busy = False
            kept = session.name is not None and self._sessions.get(session.name) is session
        if not kept and session.state is not None:
            self.free_state(session.state)
            session.state = None
        self.enforce_budget()

    def reset(self, session: Session) -> None:
        """A half-updated state is never reused: the session starts afresh."""
        old, session.state, session.positions = session.state, self.new_state(), []
        if old is not None:
            self.free_state(old)

    def forget(self, name: str) -> None:
        """Drop a session's state (a new patient, or the session ended)."""
        with self._lock:
            session = self._sessions.pop(name, None)
        if session is not None and not session.busy and session.state is not None:
            self.free_state(session.state)

    def idle_bytes(self) -> int:
        """Bytes held by idle sessions."""
        with self._lock:
            return sum(s.state.nbytes() for s in self._sessions.values() if s.state is not None and not s.busy)

    def drop_oldest_idle(self) -> bool:
        """Drop the least recently used idle session (a runtime's fixed cache is full); False when
        every session is busy."""
        with self._lock:
            name = next((n for n, s in self._sessions.items() if not s.busy and s.state is not None), None)
            session = self._sessions.pop(name) if name is not None else None
        if session is None:
            return False
        self.free_state(session.state)
        return True

    def enforce_budget(self) -> None:
        """Drop idle sessions, least recently used first, until they fit `budget_bytes`."""
        dropped = []
        with self._lock:
            idle = [(name, s) for name, s in self._sessions.items() if not s.busy and s.state is not None]
            total = sum(s.state.nbytes() for _, s in idle)
            for name, session in idle:  # oldest first
                if total <= self.budget_bytes:
                    break
                total -= session.state.nbytes()
                del self._sessions[name]
                dropped.append(session.state)
        for state in dropped:
            self.free_state(state)
