"""Player phrasing to the module's vocabulary: a curated alias table and typo repair.

Players type "dual wield", "AoO", "nat 20", "hold my breath"; the SRD says
"two-weapon fighting", "opportunity attack", "rolling 1 or 20", "suffocating".
:func:`aliases` returns the SRD phrasing of every alias found in a text (matched as
whole words, case-insensitive); the store adds them to the FTS5 query as extra
segments (their terms and adjacent pairs, OR-ed with the player's own).

Typos: :func:`edits1` gives the words one edit (delete, transpose, replace, insert)
away from a word; the store keeps the compiled module's vocabulary (every word of
its text with its frequency) and replaces a query word the vocabulary does not know
by its most frequent neighbour one edit away, and two adjacent words whose
concatenation it knows ("owl bear", "fire ball") by that word.

The table is small on purpose: game vocabulary a player uses that the rules text
does not, not a thesaurus. Each entry is (pattern, expansion); a pattern is a
regular expression over the lower-cased text, anchored at word boundaries.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

__all__ = [
    "ALIASES",
    "STOPWORDS",
    "aliases",
    "edits1",
    "expand_query",
    "forget_alias_matches",
    "is_term",
    "words",
]

STOPWORDS: Final = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "do",
        "does",
        "for",
        "from",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "me",
        "my",
        "of",
        "on",
        "or",
        "our",
        "so",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "this",
        "to",
        "us",
        "was",
        "we",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
    ]
)

ALIASES: Final[tuple[tuple[str, str], ...]] = (
    # ---- combat slang
    (
        r"dual[- ]?wield\w*|(?:weapon|dagger|sword|axe)s? in (?:each|both|either) hands?|"
        r"off[- ]?hand|two weapons",
        "two-weapon fighting light melee weapon",
    ),
    (r"aoos?|attacks? of opportunity|run(?:ning)? past|provoke\w*", "opportunity attacks"),
    (r"nat(?:ural)? ?20|crit(?:s|ical)?(?! fail)|crit!", "critical hits rolling 20"),
    (r"nat(?:ural)? ?1|fumble\w*|crit(?:ical)? fail\w*", "rolling 1 attack misses"),
    (
        r"hold\w* (?:my |your |his |her |their |our |its )?breath|drown\w*|suffocat\w*",
        "suffocating hold its breath",
    ),
    (r"temp(?:orary)? ?hp|thp", "temporary hit points"),
    (r"hp", "hit points"),
    (r"ac", "armor class"),
    (r"death sav\w*|bleed\w* out|dying", "death saving throws"),
    (r"(?:0|zero) ?(?:hp|hit points)|go(?:es)? down|downed", "dropping to 0 hit points"),
    (
        r"up[- ]?cast\w*|higher[- ]level slot|\d(?:st|nd|rd|th)[- ]level slot",
        "casting a spell at a higher level",
    ),
    (r"concentrat\w*", "concentration"),
    (r"breather|short rest", "short rest hit dice"),
    (r"sleep for the night|long rest|make camp|camp for the night", "long rest"),
    (r"knock\w* (?:him|her|them|it) out|knock\w* out|non-?lethal", "knocking a creature out"),
    (r"jump\w* (?:off|down)|fall\w*", "falling bludgeoning damage every 10 feet"),
    (r"leap\w*|jump\w*", "jumping high jump long jump"),
    (r"get\w* up|stand\w* up|off the (?:floor|ground)", "standing up being prone"),
    (r"punch\w*|kick\w*|head-?butt\w*|fists?|brawl\w*", "unarmed strike"),
    (r"sneak\w*|stealth\w*|hid(?:e|ing)", "hiding stealth"),
    (r"wrestl\w*|grab\w*|tackl\w*|grapple\w*", "grappling"),
    (r"shove\w*|push\w*", "shoving a creature"),
    (r"passive (?:perception|insight|investigation)", "passive checks"),
    (r"who goes first|turn order", "initiative"),
    (r"ambush\w*|surprise\w*|catch (?:them|him|her) off guard", "surprise"),
    (
        r"(?:hop|get|climb)s? (?:on|onto|off) (?:my |the )?(?:horse|mount)|mount\w*|dismount\w*",
        "mounting and dismounting mounted combat",
    ),
    (r"swamp|mud|rubble|wad(?:e|ing)|undergrowth", "difficult terrain"),
    (r"climb\w*|scal(?:e|ing) the", "climbing swimming and crawling"),
    (r"(?:cast\w*|wizard|spells?) in (?:plate |heavy |my )?armou?r", "casting in armor"),
    (r"two spells|same turn|cantrip", "bonus action cantrip casting time of 1 action"),
    (r"team up|work\w* (?:together|with)|help\w*", "working together help"),
    (r"craft\w*|forg(?:e|ing)", "crafting downtime"),
    (r"carry\w*|encumb\w*|how much can (?:i|we) (?:lift|carry)", "lifting and carrying capacity"),
    (r"food|rations?|starv\w*|thirst\w*", "food and water"),
    (r"far away|long range|out of range|past (?:my |its )?\w*\s?range", "range long range"),
    (r"next to me|point[- ]blank|adjacent", "ranged attacks in close combat"),
    (r"can'?t see|in the dark|unseen|invisible (?:enemy|attacker)", "unseen attackers and targets"),
    (
        r"insta-?kill\w*|instant(?:ly)? (?:death|kill)|kill \w+ outright|one[- ]shot\w*",
        "instant death massive damage",
    ),
    (r"stabili[sz]\w*|first aid", "stabilizing a creature medicine"),
    (r"full defen[cs]e", "dodge action"),
    (r"back off|retreat\w*|withdraw\w*|disengag\w*", "disengage"),
    (r"wait for|hold my action|when the \w+ (?:opens|comes|appears)", "ready action"),
    # ---- conditions
    (r"tied up|stuck in|webbed|entangled", "restrained"),
    (r"turn\w* (?:\w+ )?(?:to|into) stone|petrif\w*|stoned", "petrified"),
    (r"knocked (?:down|over)|on the (?:ground|floor)|knocked prone", "prone"),
    (r"exhausted|tired|fatigue\w*", "exhaustion"),
    # ---- monsters, spells, items
    (r"regenerat\w*|keeps? (?:getting|coming) back|heals? itself", "regeneration"),
    (r"drains? (?:my |your |his |her )?life", "life drain"),
    (r"breathes? fire|fire breath|breath weapon", "fire breath"),
    (r"go(?:es)? invisible|turn\w* invisible|become\w* invisible", "invisibility"),
    (r"(?:check|sense|scan)\w* (?:\w+ ){0,3}for magic|is it magic\w*", "detect magic"),
    (r"talk to the (?:corpse|dead|body)|question the (?:corpse|dead|body)", "speak with dead"),
    (r"put (?:\w+ ){0,3}to sleep", "sleep"),
    (r"bring (?:\w+ ){0,3}back|resurrect\w*|raise (?:him|her|them) from", "revivify raise dead"),
    (r"plate", "plate armor"),
    (r"lock ?pick\w*|pick\w* (?:the |a )?lock", "thieves' tools"),
    # ---- adventure and roleplay
    (r"bribe\w*|pay (?:him|her|them) off", "bargaining gp trade"),
    (r"gossip\w*|rumou?rs?", "rumours"),
    (r"reward\w*|paid|pay", "offers gp"),
    (r"nun|priestess", "ghost priestess"),
    (r"diary", "journal"),
    (r"kid|lad|the boy", "son"),
    (r"tavern|pub|bar", "inn"),
)


def _whole_words(pattern: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![a-z0-9])(?:{pattern})(?![a-z0-9])")


def _alias_groups(
    size: int,
) -> tuple[tuple[re.Pattern[str], tuple[tuple[re.Pattern[str], str], ...]], ...]:
    """The table in groups of ``size``, each with one pattern that matches where any
    of its members does: a text no member of a group matches costs one search for the
    group (each pattern's own scan costs about as much as the group's: 0.7 us)."""
    groups = []
    for start in range(0, len(ALIASES), size):
        part = ALIASES[start : start + size]
        any_member = _whole_words("|".join(f"(?:{p})" for p, _ in part))
        groups.append((any_member, tuple((_whole_words(p), e) for p, e in part)))
    return tuple(groups)


_ALIAS_GROUPS: Final = _alias_groups(8)

_WORD: Final = re.compile(r"[a-z0-9]+")
_LETTERS: Final = "abcdefghijklmnopqrstuvwxyz"


def aliases(text: str) -> tuple[str, ...]:
    """The SRD phrasing of every alias in ``text``, in table order, without repeats."""
    return _alias_matches(text)[0]


def _alias_words(text: str) -> frozenset[str]:
    """The words of ``text`` that some alias matches (never "repaired" as typos)."""
    return _alias_matches(text)[1]


@functools.lru_cache(maxsize=1024)
def _alias_matches(text: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """(:func:`aliases`, :func:`_alias_words`) of ``text``: one pass over the table."""
    low = text.lower()
    found: dict[str, None] = {}
    matched: set[str] = set()
    for any_member, members in _ALIAS_GROUPS:
        if any_member.search(low) is None:
            continue
        for rx, expansion in members:
            for m in rx.finditer(low):
                found[expansion] = None
                matched.update(words(m.group(0)))
    return tuple(found), frozenset(matched)


def forget_alias_matches() -> None:
    """Drop the memo of texts' alias matches (a benchmark's "never seen" texts)."""
    _alias_matches.cache_clear()


def is_term(word: str) -> bool:
    """Whether a lower-case word is a query term: 2+ characters, not a stop word."""
    return len(word) > 1 and word not in STOPWORDS


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words of ``text`` (the vocabulary's unit)."""
    return _WORD.findall(text.lower())


def edits1(word: str) -> set[str]:
    """Words one delete, adjacent transpose, replace or insert away from ``word``."""
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    out = {a + b[1:] for a, b in splits if b}
    out.update(a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1)
    out.update(a + c + b[1:] for a, b in splits if b for c in _LETTERS)
    out.update(a + c + b for a, b in splits for c in _LETTERS)
    out.discard(word)
    return out


_SUFFIXES: Final = ("s", "es", "ed", "d", "ing", "er", "ers", "ly")
#: irregular plurals of the game's nouns the -ves rule below does not cover
_IRREGULAR: Final = {
    "mice": "mouse",
    "teeth": "tooth",
    "feet": "foot",
    "geese": "goose",
    "men": "man",
    "women": "woman",
    "children": "child",
    "oxen": "ox",
    "lice": "louse",
    "fungi": "fungus",
}


@functools.lru_cache(maxsize=8192)
def related_forms(word: str) -> frozenset[str]:
    """Inflections of ``word`` and the stems it may inflect ("listen": "listening";
    "stopping": "stop"; "breather": "breath"): a word with a known relative is not a
    typo, however the module happens to spell it."""
    out = {word + s for s in _SUFFIXES}
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            stem = word[: -len(suffix)]
            out.update((stem, stem + "e"))
            if stem[-1] == stem[-2]:  # stopping -> stop
                out.add(stem[:-1])
    out.discard(word)
    return frozenset(out)


def singulars(word: str) -> tuple[str, ...]:
    """Singulars ``word`` may be the irregular plural of ("wolves": wolf, wolfe);
    FTS5's porter stemmer leaves them apart ("wolv" is not "wolf")."""
    if word in _IRREGULAR:
        return (_IRREGULAR[word],)
    if word.endswith("ves") and len(word) > 4:
        return (word[:-3] + "f", word[:-3] + "fe")
    return ()


_UNKNOWN: Final = object()  # a word ``repairs`` has no answer for yet


def expand_query(
    text: str,
    known: Callable[[Sequence[str]], Mapping[str, int]],
    repairs: dict[str, str | None] | None = None,
) -> tuple[str, ...]:
    """``text`` with its typos repaired, then the alias table's expansions of it (and
    of the text as typed), then known singulars of its irregular plurals.

    ``known(words)`` returns which of ``words`` the module's vocabulary has (with
    their frequencies). A query word of 4+ letters is a typo when neither it nor any
    of its :func:`related_forms` is known and no alias names it; it is replaced by
    the most frequent known word one edit away (ties: alphabetical). Two adjacent
    words of 3+ letters, neither a stop word, whose concatenation is known ("owl
    bear") are replaced by it. One call for the words, their relatives and the pairs;
    one more only when some word is unknown. ``repairs``, a dict the caller keeps for
    the same vocabulary, remembers what was learnt of each word checked (the word
    itself: not a typo; its repair; None: no repair), so that it is not checked again."""
    tokens = words(text)
    if not tokens:
        return (text,)
    joined = [
        a + b
        for a, b in itertools.pairwise(tokens)
        if len(a) >= 3
        and len(b) >= 3
        and a.isalpha()
        and b.isalpha()
        and a not in STOPWORDS
        and b not in STOPWORDS
    ]
    protected = _alias_words(text)
    checkable = [w for w in dict.fromkeys(tokens) if len(w) >= 4 and w.isalpha()]
    # read once, written once: another thread may clear ``repairs`` meanwhile
    settled = (
        {w: fix for w in checkable if (fix := repairs.get(w, _UNKNOWN)) is not _UNKNOWN}
        if repairs
        else {}
    )
    fresh = [w for w in checkable if w not in settled]
    relatives = {w: related_forms(w) for w in fresh}
    plurals = {w: singulars(w) for w in dict.fromkeys(tokens)}
    lookup = [*fresh, *joined, *itertools.chain(*relatives.values(), *plurals.values())]
    found = known(list(dict.fromkeys(lookup))) if lookup else {}
    learnt: dict[str, str | None] = {
        w: w for w in fresh if w in found or not found.keys().isdisjoint(relatives[w])
    }
    typos = [w for w in fresh if w not in learnt and w not in protected]
    if typos:
        neighbours = {w: edits1(w) for w in typos}
        pool = known(list(set().union(*neighbours.values())))
        for w, near in neighbours.items():
            best = min(((-pool[c], c) for c in near if c in pool), default=None)
            learnt[w] = best[1] if best is not None else None
    if repairs is not None:
        repairs.update(learnt)
    # a word an alias names is kept as typed, whatever the vocabulary says of it
    fixes = {
        w: fix
        for w, fix in (*settled.items(), *learnt.items())
        if isinstance(fix, str) and fix != w and w not in protected
    }
    out: list[str] = []
    i = 0
    changed = False
    while i < len(tokens):
        w = tokens[i]
        if i + 1 < len(tokens) and w + tokens[i + 1] in found and w + tokens[i + 1] in joined:
            out.append(w + tokens[i + 1])
            i += 2
            changed = True
            continue
        if w in fixes:
            changed = True
        out.append(fixes.get(w, w))
        i += 1
    repaired = " ".join(out) if changed else text
    expansions = dict.fromkeys(aliases(repaired))
    if changed:
        expansions.update(dict.fromkeys(aliases(text)))
    singles = [s for forms in plurals.values() for s in forms if s in found]
    if singles:
        expansions[" ".join(singles)] = None
    return (repaired, *expansions)


def vocabulary(texts: Iterable[str]) -> dict[str, int]:
    """Word -> number of occurrences over ``texts`` (what the compiler stores)."""
    counts: dict[str, int] = {}
    for t in texts:
        for w in _WORD.findall(t.lower()):
            counts[w] = counts.get(w, 0) + 1
    return counts
