"""Query repair and expansion (engine/content/query.py) against a small vocabulary."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.content.query import (
    ALIASES,
    _alias_words,
    aliases,
    expand_query,
    forget_alias_matches,
    related_forms,
    singulars,
    words,
)

VOCAB = {
    "initiative": 40,
    "listening": 1,
    "listed": 9,
    "stop": 12,
    "step": 30,
    "breath": 150,
    "breathe": 64,
    "deal": 900,
    "wield": 20,
    "tome": 5,
    "next": 50,
    "owlbear": 6,
    "fireball": 8,
    "wolf": 43,
    "wolves": 1,
    "mouse": 2,
    "attack": 2000,
}


def known_in(vocab: Mapping[str, int]):
    calls: list[list[str]] = []

    def known(words: Sequence[str]) -> dict[str, int]:
        calls.append(list(words))
        return {w: vocab[w] for w in words if w in vocab}

    return known, calls


def test_a_typo_becomes_the_most_frequent_known_word_one_edit_away() -> None:
    known, calls = known_in(VOCAB)
    assert expand_query("I roll initative", known)[0] == "i roll initiative"
    assert len(calls) == 2  # the words, then the typo's neighbours


def test_a_word_whose_inflection_is_known_is_not_a_typo() -> None:
    # "listen" is one edit from "listed", but the module says "listening"
    known, _ = known_in(VOCAB)
    assert expand_query("I listen at the door", known)[0] == "I listen at the door"
    # and the other way: "stopping" stems to "stop", "breather" to "breath"
    assert expand_query("without stopping", known)[0] == "without stopping"
    assert "breather" in expand_query("we take a breather", known)[0]


def test_a_word_an_alias_names_is_kept_and_the_alias_still_applies() -> None:
    # "dual" is one edit from "deal", the most common word; the alias table knows it
    known, _ = known_in(VOCAB)
    segments = expand_query("I dual wield my shortswords", known)
    assert "deal" not in segments[0]
    assert any("two-weapon fighting" in s for s in segments[1:])


def test_aliases_of_the_text_as_typed_survive_a_repair_elsewhere() -> None:
    known, _ = known_in(VOCAB)
    segments = expand_query("initative for a breather", known)
    assert segments[0] == "initiative for a breather"
    assert any("short rest" in s for s in segments[1:])


def test_adjacent_words_join_only_when_both_are_content_words() -> None:
    known, _ = known_in(VOCAB)
    assert expand_query("the owl bear charges", known)[0] == "the owlbear charges"
    assert expand_query("I cast fire ball", known)[0] == "i cast fireball"
    # "to" + "me" would make "tome": stop words never join
    assert "tome" not in expand_query("the goblin next to me", known)[0]


def test_irregular_plurals_add_their_known_singular() -> None:
    known, _ = known_in(VOCAB)
    segments = expand_query("the wolves howl", known)
    assert segments[0] == "the wolves howl"
    assert segments[-1] == "wolf"
    assert expand_query("mice everywhere", known)[-1] == "mouse"
    # an unknown singular adds nothing
    assert expand_query("the elves sing", known) == ("the elves sing",)


@pytest.mark.parametrize(
    ("word", "expected"),
    [("listen", {"listening", "listens", "listened"}), ("stopping", {"stop", "stopp"})],
)
def test_related_forms(word: str, expected: set[str]) -> None:
    assert expected <= related_forms(word)
    assert word not in related_forms(word)


def test_singulars() -> None:
    assert singulars("wolves") == ("wolf", "wolfe")
    assert singulars("teeth") == ("tooth",)
    assert singulars("swords") == ()


def test_no_words_no_expansion() -> None:
    known, calls = known_in(VOCAB)
    assert expand_query("?!", known) == ("?!",)
    assert calls == []


# words the alias patterns spell, so that drawn texts hit them (and their overlaps)
_ALIAS_WORDS = sorted({w for p, _ in ALIASES for w in re.findall(r"[a-z0-9]+", p)} - {"w", "s"})


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(st.sampled_from(_ALIAS_WORDS), st.sampled_from(["the", "my", "on", "0", "x"])),
        max_size=12,
    ),
    st.sampled_from([" ", "-", ", ", "  "]),
)
def test_alias_matches_equal_each_pattern_run_on_its_own(parts: list[str], sep: str) -> None:
    """The groups' shared pattern only skips groups no member matches: the aliases
    found, and the words they match, are those of every pattern run alone."""
    text = sep.join(parts)
    found: dict[str, None] = {}
    matched: set[str] = set()
    for pattern, expansion in ALIASES:
        for m in re.finditer(rf"(?<![a-z0-9])(?:{pattern})(?![a-z0-9])", text.lower()):
            found[expansion] = None
            matched.update(words(m.group(0)))
    forget_alias_matches()
    assert aliases(text) == tuple(found)
    assert _alias_words(text) == frozenset(matched)


# vocabulary words, typos of them, words an alias names, unknown words, stop words
_TEXT_WORDS = [*VOCAB, "initative", "listen", "stopping", "breather", "fire", "ball", "owl"]
_TEXT_WORDS += ["bear", "dual", "wield", "aoo", "zzqx", "goblin", "the", "to", "me", "deel"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_TEXT_WORDS), max_size=8), min_size=1, max_size=6))
@example([["dual"], ["i", "dual", "wield"]])  # a typo remembered, then named by an alias
def test_what_repairs_remember_changes_no_expansion(texts: list[list[str]]) -> None:
    """Every text expands exactly as with nothing remembered (the sequential model: a
    fresh call), looking up no word the fresh call does not; a text expanded again
    looks up no typo's neighbours."""
    known, calls = known_in(VOCAB)
    repairs: dict[str, str | None] = {}
    for parts in texts:
        text = " ".join(parts)
        fresh, fresh_calls = known_in(VOCAB)
        want = expand_query(text, fresh)
        calls.clear()
        assert expand_query(text, known, repairs) == want
        assert {w for c in calls for w in c} <= {w for c in fresh_calls for w in c}
        calls.clear()
        assert expand_query(text, known, repairs) == want
        assert len(calls) <= 1
