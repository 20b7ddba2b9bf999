"""What every session-store backend stores and returns, and the checks of its input.

The checks run on the event loop before anything is queued or written, so a bad
call fails alone and at once, whatever the backend.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from ..errors import SessionError

__all__ = [
    "DEFAULT_MAX_ACTION_CHARS",
    "MAX_SESSION_ID_CHARS",
    "ActionRow",
    "SessionState",
    "TranscriptEntry",
    "action_row",
    "check_session_id",
    "turn_moved_on",
    "unknown_session",
]

MAX_SESSION_ID_CHARS = 200
DEFAULT_MAX_ACTION_CHARS = 2000


@attrs.frozen
class SessionState:
    """A snapshot of one session: ``turn`` actions recorded so far, and its state."""

    session_id: str
    turn: int
    state: dict[str, Any]
    created: float  # wall-clock seconds since the epoch (persisted across processes)
    updated: float


@attrs.frozen
class TranscriptEntry:
    """One recorded action, exactly as ``record_action`` received it."""

    turn: int
    action_text: str
    action_type: str
    narrative: str
    state_changes: dict[str, Any]
    responses: dict[str, Any]
    created: float


@attrs.frozen
class ActionRow:
    """A validated ``record_action`` call, serialized so the thread only does SQL."""

    session_id: str
    turn_expected: int | None
    action_text: str
    action_type: str
    narrative: str
    changes_json: str
    responses_json: str
    values: tuple[tuple[str, str | None], ...]  # state key -> JSON value, None deletes


def unknown_session(session_id: str) -> SessionError:
    """The error for a session the store does not have."""
    return SessionError(f"unknown session {session_id!r}")


def turn_moved_on(session_id: str, turn: object, expected: int | None) -> SessionError:
    """The error for a ``turn_expected`` the session's ``turn`` no longer matches."""
    return SessionError(
        f"session {session_id!r} is at turn {turn}, not {expected}: "
        "another action was recorded in between"
    )


def check_text(what: str, text: str) -> None:
    """Refuse text a store cannot bind: a lone surrogate (UTF-8 cannot encode it) or
    a NUL character (PostgreSQL text cannot hold it). Checked for every backend, so
    the same call fails the same way on each, before anything is queued."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SessionError(
            f"{what} contains {text[exc.start : exc.end]!r} at index {exc.start}, a lone "
            "surrogate that UTF-8 cannot encode; the store keeps UTF-8 text only"
        ) from None
    if "\x00" in text:
        raise SessionError(
            f"{what} contains a NUL character at index {text.index(chr(0))}; "
            "the store keeps text without NUL characters"
        )


def check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str):
        raise SessionError(f"session id must be a str, got {type(session_id).__name__}")
    if not session_id.strip():
        raise SessionError("session id must not be empty or whitespace")
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise SessionError(
            f"session id is {len(session_id)} characters long; the limit is {MAX_SESSION_ID_CHARS}"
        )
    if "\x00" in session_id:
        raise SessionError("session id must not contain NUL characters")
    check_text("session id", session_id)
    return session_id


def _to_json(what: str, value: Mapping[str, Any], *, sql_keys: bool = False) -> str:
    """``value`` as JSON (ASCII: a lone surrogate or a NUL becomes an escape);
    ``sql_keys``: its keys are also bound to SQL as text, so they are checked too."""
    if not isinstance(value, Mapping):
        raise SessionError(f"{what} must be a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str) or not key:
            raise SessionError(f"{what} keys must be non-empty strings, got {key!r}")
        if sql_keys:
            check_text(f"{what} key", key)
    try:
        return json.dumps(dict(value), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SessionError(f"{what} is not JSON-serialisable: {exc}") from None


def action_row(
    session_id: str,
    *,
    turn_expected: int | None,
    action_text: str,
    action_type: str,
    narrative: str,
    state_changes: Mapping[str, Any],
    responses: Mapping[str, Any],
    max_action_chars: int,
) -> ActionRow:
    """Check a ``record_action`` call and serialize it (see ``record_action``)."""
    check_session_id(session_id)
    if turn_expected is not None and (
        isinstance(turn_expected, bool) or not isinstance(turn_expected, int)
    ):
        raise SessionError(f"turn_expected must be an int or None, got {turn_expected!r}")
    if not isinstance(action_text, str):
        raise SessionError(f"action text must be a str, got {type(action_text).__name__}")
    if not action_text.strip():
        raise SessionError("action text is empty; say what your character does")
    if len(action_text) > max_action_chars:
        raise SessionError(
            f"action text is {len(action_text)} characters long; the limit is {max_action_chars}"
        )
    if not isinstance(action_type, str) or not action_type:
        raise SessionError(f"action type must be a non-empty str, got {action_type!r}")
    if not isinstance(narrative, str):
        raise SessionError(f"narrative must be a str, got {type(narrative).__name__}")
    check_text("action text", action_text)
    check_text("action type", action_type)
    check_text("narrative", narrative)
    return ActionRow(
        session_id=session_id,
        turn_expected=turn_expected,
        action_text=action_text,
        action_type=action_type,
        narrative=narrative,
        changes_json=_to_json("state_changes", state_changes, sql_keys=True),
        responses_json=_to_json("responses", responses),
        # serialize each value once, here, so the thread only does SQL
        values=tuple(
            (key, None if value is None else json.dumps(value, sort_keys=True))
            for key, value in state_changes.items()
        ),
    )
