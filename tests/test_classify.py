from __future__ import annotations

from collections import Counter
from pathlib import Path

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


def test_a_cue_is_a_whole_word() -> None:
    # The right-hand word boundary: "rest" is no cue in campfire, restrain, restoration.
    assert classify_action("I walk to the campfire") == "exploration"
    assert classify_action("I restrain the prisoner") == "combat"
    assert classify_action("I read the restoration scroll") == "exploration"
    # Inflections still match.
    assert classify_action("We are resting") == "rest"
    assert classify_action("I keep attacking") == "combat"
    assert classify_action("stabbing it") == "combat"


def test_quoted_speech_is_roleplay_even_when_it_asks() -> None:
    assert classify_action('"Who sent you?" I demand') == "roleplay"
    assert classify_action('"Well met. What news?"') == "roleplay"


def test_can_i_asks_to_attempt_the_action() -> None:
    assert classify_action("Can I persuade the guard?") == "roleplay"
    assert classify_action("can i use a bonus action to hide") == "question"


def test_a_misspelled_cue_counts_only_when_nothing_else_matched() -> None:
    assert classify_action("i attak the orc") == "combat"
    assert classify_action("serch the bookshelf") == "exploration"
    assert classify_action("is it night or day?") == "question"  # night is no typo of fight


LABELLED = Path(__file__).parent / "data" / "classify_labelled.tsv"
# Measured at 172/174 = 0.989 overall and 54/56 = 0.964 on the held-out rows (the
# rows whose failures were not looked at while tuning). The floors leave room for
# about four more misses overall and two on the held-out rows before the test fails.
MIN_ACCURACY = 0.95
MIN_HELD_OUT_ACCURACY = 0.9


def _labelled() -> list[tuple[str, str, str]]:
    rows = []
    for line in LABELLED.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            label, split, text = line.split("\t")
            rows.append((label, split, text))
    return rows


def test_the_labelled_set_covers_every_action_type() -> None:
    rows = _labelled()
    assert len(rows) >= 100
    assert {label for label, _, _ in rows} == set(ACTION_TYPES)
    assert {split for _, split, _ in rows} == {"dev", "held"}


def test_accuracy_on_the_labelled_set() -> None:
    rows = _labelled()
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    misses = []
    for label, split, text in rows:
        got = classify_action(text)
        for key in ("all", split, label):
            total[key] += 1
            right[key] += got == label
        if got != label:
            misses.append(f"  {text!r}: {got}, labelled {label}")
    accuracy = {key: right[key] / total[key] for key in total}
    print(f"\nclassify_action accuracy: {right['all']}/{total['all']} = {accuracy['all']:.3f}")
    print(f"  held-out rows: {right['held']}/{total['held']} = {accuracy['held']:.3f}")
    for kind in ACTION_TYPES:
        print(f"  {kind:12} {right[kind]}/{total[kind]}")
    print("\n".join(misses))
    assert accuracy["all"] >= MIN_ACCURACY, misses
    assert accuracy["held"] >= MIN_HELD_OUT_ACCURACY, misses


@given(st.text(max_size=300))
def test_any_text_gets_a_known_type(text: str) -> None:
    assert classify_action(text) in ACTION_TYPES
