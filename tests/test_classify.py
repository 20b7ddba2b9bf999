from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.classify import PRECEDENCE, classify_action
from engine.config import ACTION_TYPES

CASES = [
    ("I attack the goblin with my sword", "combat"),
    ("I cast fireball at the goblins", "combat"),
    ("I grapple the ogre", "combat"),
    ("I search the altar for traps", "exploration"),
    ("We climb down the flooded stair", "exploration"),
    ("I open the reliquary and inspect the bones", "exploration"),
    ("I ask the innkeeper about the chapel", "roleplay"),
    ("I try to persuade the guard to let us pass", "roleplay"),
    ("Hello there, stranger", "roleplay"),
    ("How does grappling work?", "question"),
    ("What does a dragon's frightful presence do?", "question"),
    ("Can I use my bonus action to hide?", "question"),
    ("We take a long rest", "rest"),
    ("I sleep by the fire", "rest"),
    ("/save", "system"),
    ("save", "system"),
    ("quit", "system"),
    ("I help the wounded farmer", "other"),
    ("Hmm.", "other"),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_classifies_the_action_type(text: str, expected: str) -> None:
    assert classify_action(text) == expected


def test_every_type_is_a_configured_action_type() -> None:
    assert set(PRECEDENCE) | {"system", "other"} == set(ACTION_TYPES)


@given(st.text(max_size=300))
def test_any_text_gets_a_known_type(text: str) -> None:
    assert classify_action(text) in ACTION_TYPES
