"""Conversations: the session table (live sessions, least recently used first) and ended ids.

A session is bound to the frame of its first turn (LLaVA conversations are about one image),
carries its finished (question, answer) turns, expires after `session_ttl_s` idle (a session
with a turn in flight is not idle) and is evicted, least recently used first, beyond
`max_sessions`. Ids that ended (expired, evicted, unloaded) are remembered, a bounded number of
them, so that a client continuing one gets UNKNOWN_SESSION instead of a silently new session.
The limits are the live settings, handed in by `set_limits()`.

Locking: the table has its own lock, which guards the table, the ended ids, the limits and
every field of every `Session` it holds (history, last_used, in_flight); a Session's
`session_id` and `frame` never change. Read and change sessions only through the table's
methods. The lock is a leaf: nothing is called out of it and no other lock is taken while it is
held, so callers may hold the core's lock when they call in (the core does, to make a turn's
acceptance and its job's enqueueing one step).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..model.prompt import STOP_STRING, strip_image_token
from .frames import Frame

log = logging.getLogger(__name__)

ENDED_SESSIONS_REMEMBERED = 1024  # expired/evicted session ids that still get UNKNOWN_SESSION


@dataclass(eq=False)
class Session:
    """One conversation: bound to the frame of its first turn."""

    session_id: str
    frame: Frame
    history: list[tuple[str, str]] = field(default_factory=list)
    last_used: float = 0.0  # steady clock
    in_flight: int = 0  # accepted turns not finished yet (the session is not idle meanwhile)


class SessionTable:
    """The live sessions (least recently used first) and the ids that ended, with why."""

    def __init__(self, monotonic: Callable[[], float], ttl_s: float, max_sessions: int,
                 max_turns: int):
        self._lock = threading.Lock()
        self._monotonic = monotonic
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._ended: OrderedDict[str, str] = OrderedDict()  # id -> why it ended
        self.set_limits(ttl_s, max_sessions, max_turns)

    def set_limits(self, ttl_s: float, max_sessions: int, max_turns: int) -> None:
        """New live limits; sessions beyond max_sessions are evicted at once (oldest first)."""
        with self._lock:
            self._ttl_s, self._max_sessions, self._max_turns = ttl_s, max_sessions, max_turns
            self._evict_locked()

    def find(self, session_id: str) -> tuple[Session | None, str | None]:
        """(the live session, None), or (None, why it ended) or (None, None) for a new id.

        Sessions idle longer than the TTL end first.
        """
        with self._lock:
            self._expire_locked()
            return self._sessions.get(session_id), self._ended.get(session_id)

    def begin_turn(self, session: Session) -> None:
        """A turn of `session` was accepted: add it if new, mark it used and in flight."""
        with self._lock:
            session.last_used = self._monotonic()
            session.in_flight += 1
            if self._sessions.get(session.session_id) is session:
                self._sessions.move_to_end(session.session_id)
                return
            self._sessions[session.session_id] = session
            self._ended.pop(session.session_id, None)
            self._evict_locked()

    def end_turn(self, session: Session, turn: tuple[str, str] | None) -> None:
        """A turn of `session` finished; `turn` = (question, answer) when it was answered.

        An answered turn is added to the history (the last max_session_turns are kept) and
        refreshes the TTL; an empty answer is not carried. A stopped or failed one is forgotten.
        """
        with self._lock:
            session.in_flight -= 1
            if turn is None:
                return
            session.last_used = self._monotonic()
            question, answer = turn
            answer = strip_image_token(answer.replace(STOP_STRING, ""))
            if not answer:
                log.debug("session %s: empty answer not added to the history",
                          session.session_id)
                return
            session.history.append((question.strip(), answer))
            del session.history[:-self._max_turns]

    def history(self, session: Session) -> list[tuple[str, str]]:
        """A snapshot of a session's finished turns (the last max_session_turns of them)."""
        with self._lock:
            return list(session.history[-self._max_turns:])

    def end_all(self, why: str) -> None:
        """End every live session (e.g. the model that made their history was unloaded)."""
        with self._lock:
            for sid in list(self._sessions):
                self._end_locked(sid, why)

    def expire(self) -> None:
        """End sessions idle longer than the TTL."""
        with self._lock:
            self._expire_locked()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    # ----- with the lock held ------------------------------------------------------------------
    def _expire_locked(self) -> None:
        now, ttl = self._monotonic(), self._ttl_s
        for sid in [s for s, sess in self._sessions.items()
                    if not sess.in_flight and now - sess.last_used > ttl]:
            self._end_locked(sid, f"idle for more than session_ttl_s = {ttl:g} s")

    def _evict_locked(self) -> None:
        while len(self._sessions) > self._max_sessions:
            self._end_locked(next(iter(self._sessions)), f"evicted: more than max_sessions = "
                                                         f"{self._max_sessions} sessions")

    def _end_locked(self, sid: str, why: str) -> None:
        """Forget a session but remember that it ended (bounded)."""
        self._sessions.pop(sid, None)
        self._ended[sid] = why
        self._ended.move_to_end(sid)
        while len(self._ended) > ENDED_SESSIONS_REMEMBERED:
            self._ended.popitem(last=False)
