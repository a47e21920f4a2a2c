"""llava_phi_ros/core/sessions.py on its own: the session table's TTL, LRU eviction, the ids
that ended, and the history of answered turns. A fake steady clock; no model, no worker."""

from __future__ import annotations

import threading

from llava_phi_ros.core import sessions as S
from llava_phi_ros.core.sessions import Session, SessionTable

from .core_helpers import T0_NS, WAIT, SteadyClock, frame


def table(clock: SteadyClock, ttl_s: float = 10.0, max_sessions: int = 3,
          max_turns: int = 2) -> SessionTable:
    return SessionTable(clock, ttl_s, max_sessions, max_turns)


def started(sessions: SessionTable, sid: str) -> Session:
    """A new session whose first turn was accepted and answered."""
    session = Session(sid, frame(T0_NS))
    sessions.begin_turn(session)
    sessions.end_turn(session, ("First?", "yes"))
    return session


def test_a_new_id_is_neither_live_nor_ended() -> None:
    sessions = table(SteadyClock())
    assert sessions.find("s") == (None, None) and len(sessions) == 0


def test_a_session_is_added_when_its_first_turn_begins() -> None:
    clock = SteadyClock()
    sessions = table(clock)
    session = Session("s", frame(T0_NS))
    sessions.begin_turn(session)
    assert sessions.find("s") == (session, None) and len(sessions) == 1
    assert session.in_flight == 1 and session.last_used == clock.t
    sessions.end_turn(session, ("What?", "A cup."))
    assert session.in_flight == 0 and sessions.history(session) == [("What?", "A cup.")]


def test_answered_turns_are_kept_cleaned_and_bounded() -> None:
    sessions = table(SteadyClock(), max_turns=2)
    session = started(sessions, "s")
    for i in range(3):
        sessions.begin_turn(session)
        sessions.end_turn(session, (f"  Q{i}? ", f"<image>A{i}<|endoftext|>"))
    assert sessions.history(session) == [("Q1?", "A1"), ("Q2?", "A2")]
    snapshot = sessions.history(session)
    snapshot.append(("x", "y"))  # a copy: the table is not changed through it
    assert len(sessions.history(session)) == 2


def test_a_lower_turn_limit_applies_to_the_next_history() -> None:
    sessions = table(SteadyClock(), max_turns=8)
    session = started(sessions, "s")
    for i in range(3):
        sessions.begin_turn(session)
        sessions.end_turn(session, (f"Q{i}?", f"A{i}"))
    sessions.set_limits(ttl_s=10.0, max_sessions=3, max_turns=1)
    assert sessions.history(session) == [("Q2?", "A2")]


def test_stopped_failed_and_empty_turns_are_not_remembered() -> None:
    clock = SteadyClock()
    sessions = table(clock)
    session = started(sessions, "s")
    clock.advance(1.0)
    sessions.begin_turn(session)
    clock.advance(1.0)
    sessions.end_turn(session, None)  # cancelled, timed out, failed: the TTL is not refreshed
    assert session.last_used == clock.t - 1.0 and session.in_flight == 0
    sessions.begin_turn(session)
    clock.advance(1.0)
    sessions.end_turn(session, ("Hm?", "<|endoftext|> <image> "))  # nothing left of the answer
    assert sessions.history(session) == [("First?", "yes")] and session.in_flight == 0
    assert session.last_used == clock.t  # answered, though not carried: the TTL is refreshed


def test_idle_sessions_expire_but_not_while_a_turn_is_in_flight() -> None:
    clock = SteadyClock()
    sessions = table(clock, ttl_s=10.0)
    idle, busy = started(sessions, "idle"), started(sessions, "busy")
    sessions.begin_turn(busy)
    clock.advance(9.0)
    assert sessions.find("idle") == (idle, None)  # not yet
    clock.advance(2.0)
    sessions.expire()
    assert sessions.find("busy") == (busy, None)
    assert sessions.find("idle") == (None, "idle for more than session_ttl_s = 10 s")
    sessions.end_turn(busy, ("Q?", "A"))  # the answer refreshes its TTL
    clock.advance(9.0)
    assert sessions.find("busy")[0] is busy
    clock.advance(2.0)
    assert sessions.find("busy") == (None, "idle for more than session_ttl_s = 10 s")
    assert len(sessions) == 0


def test_the_least_recently_used_session_is_evicted() -> None:
    clock = SteadyClock()
    sessions = table(clock, max_sessions=2)
    s1 = started(sessions, "s1")
    clock.advance(1.0)
    started(sessions, "s2")
    clock.advance(1.0)
    sessions.begin_turn(s1)  # s2 is now the least recently used
    sessions.end_turn(s1, None)
    started(sessions, "s3")
    assert sessions.find("s2") == (None, "evicted: more than max_sessions = 2 sessions")
    assert sessions.find("s1")[0] is s1 and len(sessions) == 2
    sessions.set_limits(ttl_s=10.0, max_sessions=1, max_turns=2)  # a lower limit: at once
    assert sessions.find("s1") == (None, "evicted: more than max_sessions = 1 sessions")
    assert sessions.find("s3")[0] is not None


def test_an_ended_id_can_start_again_and_ended_ids_are_bounded(monkeypatch) -> None:
    monkeypatch.setattr(S, "ENDED_SESSIONS_REMEMBERED", 3)
    sessions = table(SteadyClock())
    for sid in ("a", "b", "c", "d"):
        started(sessions, sid)
    sessions.end_all("the model was unloaded")
    assert len(sessions) == 0
    assert sessions.find("a") == (None, None)  # forgotten: only the last 3 are remembered
    assert sessions.find("d") == (None, "the model was unloaded")
    again = started(sessions, "d")  # a client may start that id again
    assert sessions.find("d") == (again, None)


def test_concurrent_turns_keep_the_counts_right() -> None:
    sessions = table(SteadyClock(), max_sessions=100, max_turns=1000)
    shared = started(sessions, "shared")
    go = threading.Event()

    def client(k: int) -> None:
        assert go.wait(WAIT)
        for i in range(200):
            sessions.begin_turn(shared)
            sessions.find("shared")
            sessions.end_turn(shared, (f"Q{k}.{i}?", "A"))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(WAIT)
    assert shared.in_flight == 0 and len(sessions.history(shared)) == 801
