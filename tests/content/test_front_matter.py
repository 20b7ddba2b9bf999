"""Adventure front matter is YAML (``yaml.safe_load``'s reading): quoted commas and
``# comments`` mean what they mean in YAML, and what is not a mapping of the expected
types is refused naming the file, the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.content.sources import adventure_chunks, parse_front_matter
from engine.errors import ModuleError


def _folder(tmp_path: Path, front_matter: str, body: str = "A room.\n") -> Path:
    folder = tmp_path / "adv"
    folder.mkdir(exist_ok=True)
    (folder / "room.md").write_text(f"---\n{front_matter}---\n{body}")
    return folder


def test_a_quoted_comma_stays_inside_its_list_item(tmp_path: Path) -> None:
    text = 'type: location\nname: The Tipsy Lantern\nnpcs: ["Marta, the elder", Skrit]\n'
    meta, body = parse_front_matter(f"---\n{text}---\nbody\n", Path("room.md"))
    assert meta["npcs"] == ["Marta, the elder", "Skrit"]
    assert body == "body"
    (chunk,) = adventure_chunks(_folder(tmp_path, text), "adv")
    assert chunk.keys == ("the tipsy lantern", "marta, the elder", "skrit")
    assert "NPCs: Marta, the elder, Skrit." in chunk.text


def test_an_inline_comment_is_not_part_of_the_value(tmp_path: Path) -> None:
    text = (
        "type: npc   # who, not where\n"
        "name: Skrit # the goblin boss\n"
        "locations: [The Chapel Ruins]  # where he is met\n"
        "motive: Get paid. # and leave\n"
    )
    meta, _ = parse_front_matter(f"---\n{text}---\n", Path("skrit.md"))
    assert meta == {
        "type": "npc",
        "name": "Skrit",
        "locations": ["The Chapel Ruins"],
        "motive": "Get paid.",
    }
    (chunk,) = adventure_chunks(_folder(tmp_path, text), "adv")
    assert chunk.id == "adv/npcs/room" and chunk.title == "Skrit"
    assert chunk.keys == ("skrit", "the chapel ruins")
    assert "#" not in chunk.text and "Motive: Get paid.." in chunk.text


def test_empty_values_and_other_keys(tmp_path: Path) -> None:
    text = "type: location\nname: Cellar\nid:\nnpcs:\nconnections: []\nmood: {damp: true}\n"
    meta, _ = parse_front_matter(f"---\n{text}---\n", Path("room.md"))
    assert meta["npcs"] is None and meta["mood"] == {"damp": True}  # unknown keys: as parsed
    (chunk,) = adventure_chunks(_folder(tmp_path, text), "adv")
    assert chunk.id == "adv/locations/room" and chunk.keys == ("cellar",)


@pytest.mark.parametrize(
    ("front_matter", "expected"),
    [
        # not a mapping
        ("- type: location\n- name: X\n", r"front matter is a list \(\[\{'type': 'location'\}, "),
        ("just words\n", r"front matter is a string \('just words'\); expected a mapping"),
        # a text key holding something else
        ("type: location\nname: yes\n", r"name: True is a boolean; expected a string \(quote"),
        ("type: location\nname: 1984\n", r"name: 1984 is a number; expected a string"),
        ("type: location\nname: [A, B]\n", r"name: \['A', 'B'\] is a list; expected a string"),
        (
            "type: npc\nname: X\nmotive: 2024-01-01\n",
            r"motive: datetime.date\(2024, 1, 1\) is a date",
        ),
        # a list key holding something else
        (
            "type: location\nname: X\nnpcs: [Skrit, 7]\n",
            r"npcs: \['Skrit', 7\] is a list with an item that is not a string; "
            r"expected a list of strings, e.g. \[The Ossuary, \"Marta, the elder\"\], or one string",
        ),
        (
            "type: location\nname: X\nconnections: {north: Hall}\n",
            r"connections: \{'north': 'Hall'\} is a mapping",
        ),
        # keys
        ("type: location\nname: X\n1: one\n", r"front matter key 1 is a number; keys are names"),
        ("type: location\nname: X\nname: Y\n", r"line 4: front matter: duplicate key 'name'"),
        # not YAML: the file's line
        (
            "type: location\nname: Hall: east\n",
            r"line 3: front matter is not valid YAML \(mapping values",
        ),
        ("type: location\nname: X\nnpcs: [a, b\n", r"line 4: front matter is not valid YAML"),
        (
            "type: location\nname: X\nmotive: *x\n",
            r"line 4: front matter is not valid YAML .*alias",
        ),
        ("[" * 3000 + "\n", r"nested too deeply"),
    ],
)
def test_bad_front_matter_names_file_key_value_and_what_is_allowed(
    tmp_path: Path, front_matter: str, expected: str
) -> None:
    folder = _folder(tmp_path, front_matter)
    with pytest.raises(ModuleError, match=expected) as info:
        list(adventure_chunks(folder, "adv"))
    assert str(info.value).startswith(f"{folder / 'room.md'}: ")


def test_yaml_tags_build_no_objects() -> None:
    """Safe loading: a Python tag is refused, not constructed."""
    text = "---\ntype: location\nname: !!python/object/apply:os.getcwd []\n---\n"
    with pytest.raises(
        ModuleError, match=r"room.md: line 3: front matter: could not determine a constructor"
    ):
        parse_front_matter(text, Path("room.md"))
