"""Structured answers: validation against the schemas, the engine's d20, and finish()."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from engine.agents.schemas import (
    INSTRUCTIONS,
    KINDS,
    SCHEMAS,
    StructuredAnswerError,
    finish,
    parse_structured,
    repair_instruction,
    roll_d20,
)

RULING = {"check": "ability_check", "ability": "dex", "dc": 15, "reason": "The ledge is slick."}
SCENE = {"location": "The Ossuary", "present": ["Sister Maud", "a ghoul"], "changes": []}


def keys_rolling(value: int) -> str:
    """A dice key whose d20 shows ``value``."""
    for i in range(10_000):
        key = f"seed|s:{i}"
        if roll_d20(key) == value:
            return key
    raise AssertionError(f"no key rolls {value}")  # pragma: no cover


# ----------------------------------------------------------------------- parsing


def test_kinds_and_schemas() -> None:
    assert KINDS == ("text", "ruling", "scene")
    assert set(SCHEMAS) == set(INSTRUCTIONS) == {"ruling", "scene"}


@pytest.mark.parametrize(
    "data",
    [
        RULING,
        {**RULING, "check": "none", "ability": "none", "dc": 1},
        {**RULING, "check": "attack", "ability": "str", "dc": 30},
        {**RULING, "check": "saving_throw", "ability": "wis", "reason": ""},
    ],
)
def test_valid_rulings_are_accepted(data: dict[str, Any]) -> None:
    assert parse_structured("ruling", json.dumps(data)) == data


@pytest.mark.parametrize(
    "data",
    [
        SCENE,
        {"location": "", "present": [], "changes": []},
        {"location": "x" * 60, "present": ["a" * 40] * 4, "changes": ["c" * 80] * 2},
    ],
)
def test_valid_scenes_are_accepted(data: dict[str, Any]) -> None:
    assert parse_structured("scene", json.dumps(data)) == data


@pytest.mark.parametrize("text", ["", "Sure! The DC is 15.", '{"check": "attack"', "[1, 2"])
def test_non_json_is_rejected(text: str) -> None:
    with pytest.raises(StructuredAnswerError, match=r"^not JSON \("):
        parse_structured("ruling", text)


@pytest.mark.parametrize(
    ("kind", "data", "path", "reason"),
    [
        ("ruling", {**RULING, "check": "grapple"}, "check", "is not one of"),
        ("ruling", {**RULING, "ability": "luck"}, "ability", "is not one of"),
        ("ruling", {**RULING, "dc": 31}, "dc", "greater than the maximum of 30"),
        ("ruling", {**RULING, "dc": 0}, "dc", "less than the minimum of 1"),
        ("ruling", {**RULING, "dc": 12.5}, "dc", "is not of type 'integer'"),
        ("ruling", {**RULING, "dc": "15"}, "dc", "is not of type 'integer'"),
        ("ruling", {**RULING, "reason": "r" * 101}, "reason", "is too long"),
        ("scene", {**SCENE, "present": ["x" * 41]}, "present/0", "is too long"),
        ("scene", {**SCENE, "present": ["a"] * 5}, "present", "is too long"),
        ("scene", {**SCENE, "changes": ["ok", 3]}, "changes/1", "is not of type 'string'"),
        ("scene", {**SCENE, "location": None}, "location", "is not of type 'string'"),
    ],
)
def test_schema_violations_name_their_path(
    kind: str, data: dict[str, Any], path: str, reason: str
) -> None:
    with pytest.raises(StructuredAnswerError) as info:
        parse_structured(kind, json.dumps(data))
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert reason in message


@pytest.mark.parametrize(
    ("kind", "data"),
    [("ruling", {**RULING, "roll": 20}), ("scene", {**SCENE, "weather": "rain"})],
)
def test_extra_keys_are_rejected(kind: str, data: dict[str, Any]) -> None:
    extra = next(k for k in data if k not in SCHEMAS[kind]["properties"])
    with pytest.raises(StructuredAnswerError) as info:
        parse_structured(kind, json.dumps(data))
    # an extra key is a fault of the whole object; the message names the key
    assert str(info.value).startswith("the answer: ")
    assert "Additional properties are not allowed" in str(info.value)
    assert repr(extra) in str(info.value)


@pytest.mark.parametrize(
    ("kind", "data", "missing"),
    [
        ("ruling", {k: v for k, v in RULING.items() if k != "dc"}, "dc"),
        ("scene", {k: v for k, v in SCENE.items() if k != "present"}, "present"),
    ],
)
def test_missing_keys_are_rejected(kind: str, data: dict[str, Any], missing: str) -> None:
    with pytest.raises(StructuredAnswerError, match=f"'{missing}' is a required property"):
        parse_structured(kind, json.dumps(data))


@pytest.mark.parametrize("text", ["[]", "15", '"attack"', "null"])
def test_json_that_is_not_an_object_is_rejected(text: str) -> None:
    with pytest.raises(StructuredAnswerError, match="is not of type 'object'"):
        parse_structured("ruling", text)


def test_a_kind_without_a_schema_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        parse_structured("text", "{}")
    with pytest.raises(KeyError):
        finish("poem", {}, "k")


def test_repair_instruction_says_what_was_wrong_and_the_format() -> None:
    with pytest.raises(StructuredAnswerError) as info:
        parse_structured("ruling", json.dumps({**RULING, "dc": 99}))
    text = repair_instruction("ruling", info.value)
    assert str(info.value) in text and text.endswith(INSTRUCTIONS["ruling"])


# ----------------------------------------------------------------------- dice


def test_roll_d20_is_a_pure_function_of_its_key() -> None:
    keys = [f"20261126|s{i}:{t}" for i in range(50) for t in range(1, 5)]
    assert [roll_d20(k) for k in keys] == [roll_d20(k) for k in keys]
    assert all(1 <= roll_d20(k) <= 20 for k in keys)
    assert len({roll_d20(k) for k in keys}) > 1


def test_roll_d20_is_roughly_uniform() -> None:
    n = 20_000
    counts = Counter(roll_d20(f"seed|session:{i}") for i in range(n))
    assert set(counts) == set(range(1, 21))
    expected = n / 20
    # chi-square with 19 degrees of freedom: 43.8 is its 99.9th percentile
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 43.8, counts
    assert all(abs(c - expected) < 0.15 * expected for c in counts.values()), counts


# ----------------------------------------------------------------------- finish


def test_a_ruling_rolls_with_the_dice_key() -> None:
    key = "42|s1:3"
    out = finish("ruling", RULING, key)
    roll = roll_d20(key)
    assert out["structured"] == {**RULING, "roll": roll, "success": roll >= 15 or roll == 20}
    assert out["state_changes"] == {}
    assert f"the d20 shows {roll}" in out["text"]
    assert out["text"].startswith("Ruling: a DC 15 Dexterity check;")
    assert out["text"].endswith("The ledge is slick.")
    # the same key, the same roll; the input is not modified
    assert finish("ruling", RULING, key) == out
    assert "roll" not in RULING


@pytest.mark.parametrize("roll", range(2, 20))
def test_a_ruling_succeeds_when_the_roll_meets_the_dc(roll: int) -> None:
    key = keys_rolling(roll)
    meets = finish("ruling", {**RULING, "dc": roll}, key)
    assert meets["structured"]["roll"] == roll and meets["structured"]["success"] is True
    assert "so the attempt succeeds" in meets["text"]
    misses = finish("ruling", {**RULING, "dc": roll + 1}, key)
    assert misses["structured"]["success"] is False
    assert "so the attempt fails" in misses["text"]


def test_a_natural_20_always_succeeds_and_a_natural_1_always_fails() -> None:
    twenty, one = keys_rolling(20), keys_rolling(1)
    hard = finish("ruling", {**RULING, "dc": 30}, twenty)
    assert hard["structured"]["roll"] == 20 and hard["structured"]["success"] is True
    easy = finish("ruling", {**RULING, "dc": 1}, one)
    assert easy["structured"]["roll"] == 1 and easy["structured"]["success"] is False


@pytest.mark.parametrize(
    ("check", "ability", "what"),
    [
        ("attack", "str", "an attack against AC 15"),
        ("saving_throw", "con", "a DC 15 Constitution saving throw"),
        ("ability_check", "none", "a DC 15 check"),
        ("saving_throw", "none", "a DC 15 saving throw"),
    ],
)
def test_the_ruling_text_names_the_check(check: str, ability: str, what: str) -> None:
    out = finish("ruling", {**RULING, "check": check, "ability": ability}, "k")
    assert out["text"].startswith(f"Ruling: {what}; the d20 shows ")


def test_a_ruling_without_a_check_needs_no_roll() -> None:
    data = {"check": "none", "ability": "none", "dc": 10, "reason": "Walking is free."}
    outs = [finish("ruling", data, key) for key in ("a", "b", keys_rolling(1))]
    assert all(o == outs[0] for o in outs)  # the dice key does not matter
    assert outs[0]["structured"] == {**data, "roll": None, "success": True}
    assert outs[0]["text"] == "Ruling: no roll needed; Walking is free."
    assert outs[0]["state_changes"] == {}


def test_a_scene_becomes_state_changes() -> None:
    data = {
        "location": "  The Drowned Bell Tower ",
        "present": ["Sister Maud", "  ", " a giant spider "],
        "changes": ["The bell rope snapped.", " "],
    }
    out = finish("scene", data, "k")
    assert out["state_changes"] == {
        "scene": "The Drowned Bell Tower",
        "npcs_present": ["Sister Maud", "a giant spider"],
    }
    assert out["text"] == (
        "The scene: The Drowned Bell Tower. Present: Sister Maud, a giant spider. "
        "The bell rope snapped."
    )
    assert out["structured"] == data


def test_a_scene_without_a_location_leaves_the_scene_alone() -> None:
    out = finish("scene", {"location": " ", "present": [], "changes": []}, "k")
    assert out["state_changes"] == {"npcs_present": []}  # nobody is present any more
    assert out["text"] == "The scene is unchanged."


def test_parse_then_finish_round_trip() -> None:
    data = parse_structured("scene", json.dumps(SCENE))
    out = finish("scene", data, "k")
    assert out["state_changes"] == {"scene": "The Ossuary", "npcs_present": SCENE["present"]}
