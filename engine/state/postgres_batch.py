"""A group-commit batch on PostgreSQL as ONE pipelined transaction, from the loop.

The store's commit lane (:class:`~engine.state.postgres_lane.Lane`) sends ``BEGIN``,
the creation of the sessions whose first action this is, the lock of the batch's
sessions (in one order, so two engines' batches never deadlock on them) and ONE
statement per action in one round trip, then ``COMMIT`` in a second. Each action's
statement is a data-modifying CTE that locks its session, checks ``turn_expected``,
bumps the turn, inserts the transcript row and applies the state changes; an unknown
session or a stale ``turn_expected`` changes nothing and says so, failing that action
alone. Only a real failure (a constraint, a trigger, a lock timeout, the server) fails
the transaction: then nothing was written, and the store runs the batch again on its
main connection with one SAVEPOINT per action, which isolates the failing action.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import SessionError
from .group_commit import Pending
from .postgres_lane import CommitOutcomeUnknown, Lane, Statement
from .records import turn_moved_on, unknown_session

__all__ = ["write_on_lane"]

# turn_expected 0 creates the session if it does not exist yet (its first action)
_CREATE = b"""
INSERT INTO sessions (session_id, turn, created, updated)
SELECT id, 0, t, t FROM unnest($1::text[], $2::float8[]) AS n (id, t) ORDER BY id
ON CONFLICT (session_id) DO NOTHING
"""
_LOCK = b"""
SELECT 1 FROM sessions WHERE session_id = ANY($1::text[]) ORDER BY session_id FOR UPDATE
"""
_APPLY = b"""
WITH cur AS (
    SELECT turn FROM sessions WHERE session_id = $1::text FOR UPDATE
), bumped AS (
    UPDATE sessions SET turn = cur.turn + 1, updated = $2::float8 FROM cur
    WHERE sessions.session_id = $1::text
      AND ($3::integer IS NULL OR cur.turn = $3::integer)
    RETURNING sessions.turn
), logged AS (
    INSERT INTO transcript (session_id, turn, action_text, action_type, narrative,
                            state_changes, responses, created)
    SELECT $1::text, turn, $4::text, $5::text, $6::text, $7::text, $8::text, $2::float8
    FROM bumped RETURNING turn
), gone AS (
    DELETE FROM state WHERE session_id = $1::text AND key = ANY($9::text[])
      AND EXISTS (SELECT 1 FROM logged)
), kept AS (
    INSERT INTO state (session_id, key, value)
    SELECT $1::text, k, v FROM unnest($10::text[], $11::text[]) AS c (k, v)
    WHERE EXISTS (SELECT 1 FROM logged)
    ON CONFLICT (session_id, key) DO UPDATE SET value = excluded.value
)
SELECT (SELECT turn FROM cur), (SELECT turn FROM logged)
"""


async def write_on_lane(lane: Lane, batch: Sequence[Pending], clock: Callable[[], float]) -> bool:
    """Write the batch in one transaction on ``lane``; set every action's ``result``
    or ``error`` and return True, or return False when the transaction failed and
    wrote nothing (the savepoint path then runs)."""
    statements: list[Statement] = []
    times = [clock() for _ in batch]
    created: dict[str, float] = {}  # a session its first action may create: its time
    for pending, now in zip(batch, times, strict=True):
        if pending.action.turn_expected == 0:
            created.setdefault(pending.action.session_id, now)
    if created:
        ids = sorted(created)
        statements.append((_CREATE, (ids, [created[sid] for sid in ids])))
    statements.append((_LOCK, (sorted({p.action.session_id for p in batch}),)))
    head = len(statements)
    for pending, now in zip(batch, times, strict=True):
        action = pending.action
        kept = [(k, v) for k, v in action.values if v is not None]
        statements.append(
            (
                _APPLY,
                (
                    action.session_id,
                    now,
                    action.turn_expected,
                    action.action_text,
                    action.action_type,
                    action.narrative,
                    action.changes_json,
                    action.responses_json,
                    [k for k, v in action.values if v is None],
                    [k for k, _ in kept],
                    [v for _, v in kept],
                ),
            )
        )
    try:
        results = await lane.transaction("record_action", statements)
    except CommitOutcomeUnknown as exc:
        for pending in batch:
            pending.error = SessionError(
                f"{exc}: whether the batch of {len(batch)} actions was stored is unknown; "
                "reread the session"
            )
        return True
    except SessionError:
        return False
    for pending, result in zip(batch, results[head:], strict=True):
        ((current, new),) = result.rows
        sid = pending.action.session_id
        if new is not None:
            pending.result = int(new)
        elif current is None:
            pending.error = unknown_session(sid)
        else:
            pending.error = turn_moved_on(sid, current, pending.action.turn_expected)
    return True
