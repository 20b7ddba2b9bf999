"""Structured answers: the arbiter's ruling and the module keeper's scene.

A model answers in JSON that must validate against the schema of its kind (sent to
OpenAI-compatible servers as ``response_format``/``json_schema``, where llama.cpp
turns it into a grammar, and to Anthropic as a tool's ``input_schema``). The engine,
not the model, rolls the dice: :func:`finish` adds a d20 roll drawn from the action's
seeded ``dice_key``, the outcome and the player-facing text, and turns a scene into
session-state changes. Simulated agents go through the same functions, so both kinds
of agent produce the same outputs.

The schemas are short by construction (a few enums, one integer, short strings with
a ``maxLength`` and arrays with a ``maxItems`` that a server's grammar enforces), so a
structured answer costs few output tokens: a valid ruling has at most about 180
characters, a valid scene about 450 (their ``max_tokens`` should leave room for that).
"""

from __future__ import annotations

import hashlib
import json
import types
from collections.abc import Mapping
from typing import Any, Final

import jsonschema

from .base import AgentOutput

__all__ = [
    "KINDS",
    "SCHEMAS",
    "StructuredAnswerError",
    "finish",
    "parse_structured",
    "repair_instruction",
    "roll_d20",
]

#: Output kinds an agent can be configured with (``agents.<name>.output``).
KINDS: Final = ("text", "ruling", "scene")

RULING_SCHEMA: Final[Mapping[str, Any]] = types.MappingProxyType(
    {
        "type": "object",
        "properties": {
            "check": {"enum": ["attack", "ability_check", "saving_throw", "none"]},
            "ability": {"enum": ["str", "dex", "con", "int", "wis", "cha", "none"]},
            "dc": {"type": "integer", "minimum": 1, "maximum": 30},
            "reason": {"type": "string", "maxLength": 100},
        },
        "required": ["check", "ability", "dc", "reason"],
        "additionalProperties": False,
    }
)

SCENE_SCHEMA: Final[Mapping[str, Any]] = types.MappingProxyType(
    {
        "type": "object",
        "properties": {
            "location": {"type": "string", "maxLength": 60},
            "present": {
                "type": "array",
                "items": {"type": "string", "maxLength": 40},
                "maxItems": 4,
            },
            "changes": {
                "type": "array",
                "items": {"type": "string", "maxLength": 80},
                "maxItems": 2,
            },
        },
        "required": ["location", "present", "changes"],
        "additionalProperties": False,
    }
)

#: Output kind -> JSON schema (``text`` has none).
SCHEMAS: Final[Mapping[str, Mapping[str, Any]]] = types.MappingProxyType(
    {"ruling": RULING_SCHEMA, "scene": SCENE_SCHEMA}
)

#: What each structured kind is asked to produce, appended to the agent's instructions.
INSTRUCTIONS: Final[Mapping[str, str]] = types.MappingProxyType(
    {
        "ruling": (
            'Answer with JSON only: {"check": "attack" | "ability_check" | "saving_throw" '
            '| "none", "ability": "str" | "dex" | "con" | "int" | "wis" | "cha" | "none", '
            '"dc": the DC or the target\'s AC (1-30), "reason": one short sentence}. '
            "Do not roll: the engine rolls the d20."
        ),
        "scene": (
            'Answer with JSON only: {"location": where the party is, "present": the names '
            'of the creatures and people present, "changes": at most two short facts '
            "that changed}."
        ),
    }
)

_VALIDATORS = {
    kind: jsonschema.Draft202012Validator(dict(schema)) for kind, schema in SCHEMAS.items()
}


class StructuredAnswerError(ValueError):
    """A model's structured answer is not JSON or does not validate; says where."""


def parse_structured(kind: str, text: str) -> dict[str, Any]:
    """The JSON object in ``text``, validated against the schema of ``kind``.

    Raises:
        StructuredAnswerError: not JSON, or the first schema violation (path and reason).
        KeyError: ``kind`` has no schema.
    """
    validator = _VALIDATORS[kind]
    try:
        data = json.loads(text, strict=False)  # grammars may let raw newlines into strings
    except ValueError as exc:
        raise StructuredAnswerError(f"not JSON ({exc})") from None
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "the answer"
        raise StructuredAnswerError(f"{where}: {error.message}")
    assert isinstance(data, dict)
    return data


def repair_instruction(kind: str, error: StructuredAnswerError) -> str:
    """The follow-up message that asks a model to fix an invalid answer once."""
    return (
        f"Your answer was invalid: {error}. Reply again with one JSON object that "
        f"follows the format exactly. {INSTRUCTIONS[kind]}"
    )


def roll_d20(dice_key: str) -> int:
    """A d20 roll that is a pure function of ``dice_key`` (seeded, replayable)."""
    digest = hashlib.blake2b(f"d20|{dice_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 20 + 1


_ABILITY = {
    "str": "Strength",
    "dex": "Dexterity",
    "con": "Constitution",
    "int": "Intelligence",
    "wis": "Wisdom",
    "cha": "Charisma",
}


def finish(kind: str, data: Mapping[str, Any], dice_key: str) -> AgentOutput:
    """The agent output for a validated structured answer.

    A ruling with a check gets the engine's d20 roll (from ``dice_key``), its
    outcome (a natural 20 always succeeds, a natural 1 always fails) and a one-line
    text; a scene becomes state changes (``scene``, ``npcs_present``) and a text.
    """
    structured = dict(data)
    if kind == "ruling":
        check = str(data["check"])
        if check == "none":
            structured.update(roll=None, success=True)
            text = f"Ruling: no roll needed; {data['reason']}".rstrip()
            return {"text": text, "structured": structured, "state_changes": {}}
        roll = roll_d20(dice_key)
        dc = int(data["dc"])
        success = roll == 20 or (roll != 1 and roll >= dc)
        ability = _ABILITY.get(str(data["ability"]), "")
        what = {
            "attack": f"an attack against AC {dc}",
            "ability_check": f"a DC {dc} {ability} check".replace("  ", " "),
            "saving_throw": f"a DC {dc} {ability} saving throw".replace("  ", " "),
        }[check]
        verdict = "succeeds" if success else "fails"
        text = f"Ruling: {what}; the d20 shows {roll}, so the attempt {verdict}. {data['reason']}"
        structured.update(roll=roll, success=success)
        return {"text": text.rstrip(), "structured": structured, "state_changes": {}}
    if kind == "scene":
        location = str(data["location"]).strip()
        present = [str(p).strip() for p in data["present"] if str(p).strip()]
        parts = [f"The scene: {location}." if location else "The scene is unchanged."]
        if present:
            parts.append(f"Present: {', '.join(present)}.")
        parts.extend(str(c).strip() for c in data["changes"] if str(c).strip())
        changes: dict[str, Any] = {"npcs_present": present}
        if location:
            changes["scene"] = location
        return {"text": " ".join(parts), "structured": structured, "state_changes": changes}
    raise KeyError(kind)
