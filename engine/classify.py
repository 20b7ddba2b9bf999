"""Rules-based action classification: microseconds, no LLM.

Each action type has a set of cue words (matched on word starts, so "attacks" and
"attacking" match "attack"). The type with the most cues wins; ties go to the
earlier type in :data:`PRECEDENCE` (combat before rest before …), and no cue at all
gives ``"other"``. A final question mark counts as one ``"question"`` cue. Text that
starts with ``/`` or with a system command word (save, quit, help …) is ``"system"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["PRECEDENCE", "classify_action"]

PRECEDENCE = ("combat", "rest", "roleplay", "exploration", "question")

_SYSTEM = re.compile(r"^\s*(?:/|(?:save|load|quit|exit|help|undo|settings|inventory)\b)", re.I)

_CUES: Mapping[str, tuple[str, ...]] = {
    "combat": (
        "attack",
        "strike",
        "stab",
        "slash",
        "shoot",
        "fire at",
        "hit",
        "kill",
        "fight",
        "charge",
        "parry",
        "dodge",
        "grapple",
        "shove",
        "smite",
        "cast fireball",
        "initiative",
        "swing",
        "punch",
        "kick",
        "ambush",
        "defend",
        "block",
    ),
    "rest": ("rest", "sleep", "camp", "short rest", "long rest", "meditate", "heal up"),
    "roleplay": (
        "talk",
        "speak",
        "ask",
        "tell",
        "persuade",
        "convince",
        "intimidate",
        "deceive",
        "lie",
        "bribe",
        "greet",
        "hello",
        "hail",
        "say",
        "haggle",
        "negotiate",
        "flirt",
        "threaten",
        "barter",
    ),
    "exploration": (
        "search",
        "look",
        "examine",
        "inspect",
        "open",
        "explore",
        "go",
        "walk",
        "enter",
        "climb",
        "sneak",
        "follow",
        "investigate",
        "listen",
        "check",
        "move",
        "travel",
        "read",
        "touch",
        "pick",
        "disarm",
        "light",
        "map",
    ),
    "question": (
        "how",
        "what",
        "why",
        "can i",
        "does",
        "do i",
        "rule",
        "rules",
        "explain",
        "is it",
        "which",
        "who",
        "when",
        "where",
    ),
}

_PATTERNS = {
    kind: re.compile(r"\b(?:" + "|".join(re.escape(c) for c in cues) + r")", re.IGNORECASE)
    for kind, cues in _CUES.items()
}


def classify_action(text: str) -> str:
    """The action type of ``text``: ``"system"``, one of PRECEDENCE, or ``"other"``."""
    if _SYSTEM.match(text):
        return "system"
    stripped = text.strip()
    best, best_hits = "other", 0
    for kind in PRECEDENCE:
        hits = len(_PATTERNS[kind].findall(stripped))
        if kind == "question" and stripped.endswith("?"):
            hits += 1
        if hits > best_hits:
            best, best_hits = kind, hits
    return best
