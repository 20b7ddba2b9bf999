"""Rules-based action classification: microseconds, no LLM.

Each action type has a set of cue phrases, matched as whole words with their
inflections: "attack" matches "attacks", "attacked" and "attacking", and "rest"
matches "rests" and "resting" but not "restrain", "restoration" or "campfire" (a cue
ends on a word boundary on both sides). The type with the most cue hits wins; ties go
to the earlier type in :data:`PRECEDENCE` (combat before rest before …), and no cue at
all gives ``"other"``.

Besides the cue lists:

* Text that starts with ``/`` or with a system command word (save, quit, help …) is
  ``"system"``.
* Quoted speech (``"…"`` or ``“…”``) is one ``"roleplay"`` cue, and the words inside
  the quotes are not scored: what a character says is not what the player does.
* A question is an interrogative opening ("how", "what's", "does", "is" …) and a final
  question mark outside quotes, one ``"question"`` cue each; rules vocabulary (DC,
  bonus action, spell slots …) adds more.
* "Can I X" / "could we try to X" asks to attempt X: when X is a cue of another type,
  that type gets the cue instead of ``"question"``.
* Only when nothing matched, a word within one typo of a cue word (a missing, extra
  or swapped letter, for cue words of five letters or more: "attak", "serch",
  "sleeep") counts as that cue.

Accuracy on the labelled set tests/data/classify_labelled.tsv is in docs/content.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = ["PRECEDENCE", "classify_action"]

PRECEDENCE = ("combat", "rest", "roleplay", "exploration", "question")

_SYSTEM = re.compile(
    r"^\s*(?:/|(?:save|load|quit|exit|help|undo|redo|settings|options|inventory|menu)\b)", re.I
)

# Plain cue phrases: every word but a few function words also matches its
# inflections (see _inflect).
_CUES: Mapping[str, tuple[str, ...]] = {
    "combat": (
        "attack",
        "counterattack",
        "sneak attack",
        "strike",
        "struck",
        "stab",
        "slash",
        "shoot",
        "shot",
        "fire at",
        "hit",
        "kill",
        "fight",
        "fought",
        "charge",
        "parry",
        "riposte",
        "dodge",
        "grapple",
        "restrain",
        "pin him",
        "pin her",
        "pin it",
        "pin them",
        "shove",
        "smite",
        "cleave",
        "lunge",
        "bash",
        "smack",
        "initiative",
        "swing",
        "swung",
        "punch",
        "kick",
        "ambush",
        "defend",
        "block",
        # attack spells, named as players type them
        "fireball",
        "magic missile",
        "eldritch blast",
        "sacred flame",
        "fire bolt",
        "firebolt",
        "ray of frost",
        "guiding bolt",
        "lightning bolt",
        "shocking grasp",
        "thunderwave",
        "toll the dead",
        "chill touch",
        "vicious mockery",
        "hellish rebuke",
        "inflict wounds",
    ),
    "rest": (
        "rest",
        "short rest",
        "long rest",
        "sleep",
        "slept",
        "nap",
        "doze",
        "camp",
        "make camp",
        "set up camp",
        "bed down",
        "lie down",
        "lay down",
        "lying down",
        "meditate",
        "heal up",
        "heal",
        "hit dice",
        "hit die",
        "bandage",
        "catch my breath",
        "catch our breath",
        "breather",
        "take a break",
        "recover",
        "hole up",
        "keep watch",
        "for the night",
        "until dawn",
        "until morning",
    ),
    "roleplay": (
        "talk",
        "speak",
        "spoke",
        "ask",
        "tell",
        "told",
        "say",
        "said",
        "chat",
        "greet",
        "hello",
        "hail",
        "hey",
        "well met",
        "greetings",
        "introduce",
        "persuade",
        "convince",
        "intimidate",
        "interrogate",
        "deceive",
        "lying to",
        "bribe",
        "haggle",
        "negotiate",
        "barter",
        "flirt",
        "threaten",
        "apologize",
        "apologise",
        "thank",
        "reassure",
        "comfort",
        "beg",
        "plead",
        "demand",
        "yell",
        "shout",
        "whisper",
        "growl",
        "reply",
        "insult",
        "compliment",
        "charm",
    ),
    "exploration": (
        "search",
        "look",
        "peek",
        "peer",
        "examine",
        "inspect",
        "investigate",
        "explore",
        "scout",
        "open",
        "go",
        "went",
        "walk",
        "run",
        "head back",
        "head north",
        "head south",
        "head east",
        "head west",
        "head into",
        "head to",
        "head toward",
        "head towards",
        "enter",
        "climb",
        "crawl",
        "jump",
        "leap",
        "swim",
        "cross",
        "continue",
        "proceed",
        "approach",
        "sneak",
        "hide",
        "follow",
        "track",
        "listen",
        "check",
        "move",
        "travel",
        "read",
        "touch",
        "pick",
        "grab",
        "pull",
        "push",
        "disarm",
        "light",
        "map",
        "north",
        "south",
        "east",
        "west",
        "upstairs",
        "downstairs",
        # things in the world that players handle
        "door",
        "chest",
        "lever",
        "statue",
        "altar",
        "mechanism",
        "keyhole",
        "corridor",
        "tunnel",
        "stairs",
        "passage",
        "room",
        "cave",
        "crypt",
    ),
    "question": (
        "rule",
        "explain",
        "dc",
        "ac",
        "hp",
        "hit points",
        "modifier",
        "proficiency",
        "bonus action",
        "reaction",
        "advantage",
        "disadvantage",
        "saving throw",
        "spell slot",
        "concentration",
        "opportunity attack",
        "range",
        "per turn",
        "one turn",
        "my turn",
        "each turn",
    ),
}

# Cues that need more than a phrase.
_EXTRA: Mapping[str, tuple[str, ...]] = {
    "combat": (
        r"\bcast(?:s|ing)?\b[^.!?;]{0,40}?\bat\b",  # cast <anything> at <a target>
        r"\bthrow(?:s|ing)?\b[^.!?;]{0,40}?\bat\b",  # throw <a weapon> at <a target>
    ),
    "roleplay": (r"\blie(?:s|d)?\b(?!\s+down)",),  # lie to someone, not lie down
}

# Words that never inflect (so "i" does not match "is", "at" not "ats").
_PLAIN = frozenset({"i", "a", "an", "the", "my", "our", "at", "to", "up", "of", "on", "in", "it"})

# Fillers a question may open with ("wait, does …", "ok so how …").
_FILLERS = r"(?:(?:wait|so|ok|okay|um+|uh+|hmm+|hey|dm|quick question|question)\b[\s,:;.!-]*)*"
_LEAD = re.compile(
    r"^\s*" + _FILLERS + r"(?:how|what|whats|why|who|whos|where|wheres|when|which|whose"
    r"|is|are|am|was|were|does|do|did|should|will|would|isn't|aren't|don't|doesn't)\b",
)
# "can I …", "could we try to …": the offset just past it, where the asked-for action is.
_ASK = re.compile(
    r"^\s*" + _FILLERS + r"(?:can|could|may|might)\s+(?:i|we)\s+(?:(?:try|attempt)\s+(?:to\s+)?)?"
)
_QUOTED = re.compile(r"\"[^\"]*(?:\"|$)|“[^”]*(?:”|$)")
_WORD = re.compile(r"[a-z]+")


def _inflect(word: str) -> str:
    """A regex for ``word`` and its inflections (attack → attacks, attacked, attacking)."""
    w = re.escape(word)
    if word in _PLAIN or not word.isalpha():
        return w
    if word.endswith("e"):  # charge → charges, charged, charging
        return w[:-1] + "(?:e|es|ed|ing|ers?)"
    if len(word) > 2 and word.endswith("y") and word[-2] not in "aeiou":  # reply → replies
        return w[:-1] + "(?:y|ies|ied|ying)"
    last = re.escape(word[-1])
    # stab → stabbing, hit → hitting (a doubled consonant), look → looks, looked
    return w + f"(?:s|es|ed|ing|ers?|{last}(?:ed|ing|ers?))?"


def _phrase(cue: str) -> str:
    return r"\s+".join(_inflect(w) for w in cue.split())


def _pattern(cues: Iterable[str], extra: Iterable[str]) -> re.Pattern[str]:
    """One regex for a kind's cues, on lower-cased text.

    Cues are grouped by first letter (``a(?:ttack|sk)|s(?:tab|…)``): a branch that
    cannot start at a position is skipped after one comparison, which halves the time.
    Longest first within a group, so "short rest" is one hit, not "rest" after "short".
    """
    groups: dict[str, list[str]] = {}
    for cue in sorted(cues, key=len, reverse=True):
        assert cue[0].isalpha(), cue  # the group's first letter is a literal
        groups.setdefault(cue[0], []).append(_phrase(cue)[1:])
    alts = [f"{first}(?:{'|'.join(rest)})" for first, rest in groups.items()]
    return re.compile(r"\b(?:" + "|".join([*alts, *extra]) + r")\b")


_PATTERNS: Mapping[str, re.Pattern[str]] = {
    kind: _pattern(cues, _EXTRA.get(kind, ())) for kind, cues in _CUES.items()
}


def _typo_table() -> tuple[Mapping[str, str], Mapping[str, str]]:
    """Misspellings of single-word cues: (missing or swapped letter → kind, cue → kind)."""
    words: dict[str, str] = {}
    for kind in PRECEDENCE:
        for cue in _CUES[kind]:
            if " " not in cue and len(cue) >= 5:
                words.setdefault(cue, kind)
    variants: dict[str, str] = {}
    for word, kind in words.items():
        for i in range(len(word)):
            variants.setdefault(word[:i] + word[i + 1 :], kind)  # a letter missing
            if i + 1 < len(word) and word[i] != word[i + 1]:  # two letters swapped
                variants.setdefault(word[:i] + word[i + 1] + word[i] + word[i + 2 :], kind)
    for word in words:
        variants.pop(word, None)
    return variants, words


_TYPOS, _TYPO_WORDS = _typo_table()


def _typo_kind(word: str) -> str | None:
    if len(word) < 4:
        return None
    kind = _TYPOS.get(word)
    if kind is None and len(word) >= 6:  # one letter too many: "sleeep", "attackk"
        for i in range(len(word)):
            kind = _TYPO_WORDS.get(word[:i] + word[i + 1 :])
            if kind is not None:
                break
    return kind


def classify_action(text: str) -> str:
    """The action type of ``text``: ``"system"``, one of PRECEDENCE, or ``"other"``."""
    if _SYSTEM.match(text):
        return "system"
    scores = dict.fromkeys(PRECEDENCE, 0)
    text = text.lower()
    if _QUOTED.search(text) is not None:
        scores["roleplay"] += 1
        text = _QUOTED.sub(" ", text)
    text = text.strip()
    for kind in PRECEDENCE:
        scores[kind] += len(_PATTERNS[kind].findall(text))
    if text.endswith("?"):
        scores["question"] += 1
    if _LEAD.match(text):
        scores["question"] += 1
    elif (ask := _ASK.match(text)) is not None:
        asked = "question"
        for kind in PRECEDENCE:
            if kind != "question" and _PATTERNS[kind].match(text, ask.end()):
                asked = kind
                break
        scores[asked] += 1
    if not any(scores.values()):
        for word in _WORD.findall(text):
            typo = _typo_kind(word)
            if typo is not None:
                scores[typo] += 1
    best, best_hits = "other", 0
    for kind in PRECEDENCE:
        if scores[kind] > best_hits:
            best, best_hits = kind, scores[kind]
    return best
