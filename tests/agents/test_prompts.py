"""Prompt layout: what a server's prefix cache can reuse, and what never enters a prompt."""

from __future__ import annotations

from typing import Any

import pytest

from engine.agents.base import AgentRequest
from engine.agents.prompts import DEFAULT_PROMPTS, LAYOUTS, PREAMBLE, Prompt, as_text, build_prompt
from engine.agents.schemas import INSTRUCTIONS

REFERENCE = (
    "Locations > The Reliquary\nA low vault of black stone. Niches line the walls.\n\n"
    "Encounters > Reliquary Ghoul\nThe ghoul waits behind the altar."
)
ACTION = "I pry open the reliquary with my dagger"
_GENERIC_BARD = "You are the bard agent. Answer for the player's action, tersely."


def request(**context: Any) -> AgentRequest:
    base: dict[str, Any] = {
        "action": ACTION,
        "action_type": "exploration",
        "text": REFERENCE,
        "notes": "The party is at The Reliquary. Present: Sister Maud.",
        "module": "The Ember Vault",
        "session": "session-7f3a",
        "draw_key": "session-7f3a:12",
        "dice_key": "20261126|session-7f3a:12",
    }
    base.update(context)
    return AgentRequest(id=str(base.pop("id", "r")), agent="x", context=base)


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ----------------------------------------------------------------------- stable_first


def test_two_agents_share_the_system_reference_and_action_prefix() -> None:
    req = request()
    arbiter = build_prompt("arbiter", req, {"archivist": {"text": "Pry: DC 12."}}, output="ruling")
    narrator = build_prompt("narrator_opening", req, {})
    assert arbiter.system == narrator.system
    assert arbiter.reference == narrator.reference == f"Reference:\n{REFERENCE}"
    prefix = f"{arbiter.system}\n\n{arbiter.reference}\n\nPlayer action: {ACTION}\n\n"
    assert arbiter.text().startswith(prefix) and narrator.text().startswith(prefix)
    # they differ right after it: the arbiter has an answer to read, the opening none
    assert common_prefix(arbiter.text(), narrator.text()) == len(prefix)
    assert arbiter.task.endswith(f"{DEFAULT_PROMPTS['arbiter']}\n{INSTRUCTIONS['ruling']}")
    assert narrator.task.endswith(DEFAULT_PROMPTS["narrator_opening"])


def test_the_system_part_holds_the_preamble_the_synopsis_and_the_session_notes() -> None:
    prompt = build_prompt("narrator", request(), {})
    preamble = PREAMBLE.replace("{module}", "The Ember Vault")
    notes = "Session notes: The party is at The Reliquary. Present: Sister Maud."
    assert prompt.system == f"{preamble}\n\n{notes}"
    no_notes = build_prompt("narrator", request(notes="  "), {})
    assert no_notes.system == preamble
    assert "the module" in build_prompt("narrator", request(module=""), {}).system
    synopsis = "The Ember Vault > Background\nA vault beneath a drowned chapel."
    with_synopsis = build_prompt("narrator", request(synopsis=synopsis), {})
    assert with_synopsis.system == f"{preamble}\n\nThe adventure:\n{synopsis}\n\n{notes}"


def test_a_chain_of_agents_extends_one_prompt() -> None:
    """On a one-request server an action's agents run one after another: each finds
    the previous one's prompt, up to that agent's instructions, in the server's cache."""
    req = request()
    opening = {"text": "You kneel by the reliquary."}
    ruling = {"text": "Ruling: DC 12 Strength."}
    told = {"text": "The lid gives with a crack."}
    arbiter = build_prompt("arbiter", req, {"narrator_opening": opening}, output="ruling")
    narrator = build_prompt("narrator", req, {"narrator_opening": opening, "arbiter": ruling})
    keeper = build_prompt(
        "module_keeper",
        req,
        {"narrator_opening": opening, "arbiter": ruling, "narrator": told},
        output="scene",
    )
    for before, after, agent in ((arbiter, narrator, "arbiter"), (narrator, keeper, "narrator")):
        instructions = before.text().rindex(DEFAULT_PROMPTS[agent])
        shared = before.text()[:instructions].rstrip("\n")
        assert after.text().startswith(shared)


def test_nothing_per_call_enters_the_prompt() -> None:
    one = request(id="req-QX1", session="s-AAAA", draw_key="s-AAAA:1", dice_key="99|s-AAAA:1")
    two = request(
        id="req-QX2", session="s-BBBB", draw_key="s-BBBB:2", dice_key="7|s-BBBB:2", attempt=2
    )
    agents = [("arbiter", "ruling"), ("narrator", "text"), ("module_keeper", "scene")]
    for layout in LAYOUTS:
        for agent, output in agents:
            a = build_prompt(agent, one, {}, output=output, layout=layout)
            b = build_prompt(agent, two, {}, output=output, layout=layout)
            assert a == b  # ids, session, draw and dice keys, attempt: none of them matter
            for value in ("s-AAAA", "99|", "req-QX"):
                assert value not in a.text()


@pytest.mark.parametrize("output", ["text", "ruling", "scene"])
def test_the_agents_instructions_come_last(output: str) -> None:
    inputs = {"archivist": {"text": "Pry: DC 12."}, "arbiter": "Ruling: DC 12."}
    prompt = build_prompt("narrator", request(), inputs, output=output)
    instructions = DEFAULT_PROMPTS["narrator"]
    if output != "text":
        instructions = f"{instructions}\n{INSTRUCTIONS[output]}"
    assert prompt.text().endswith(instructions)
    # the player's text, then the other agents' answers in the order given, before them
    assert prompt.task.startswith(
        f"Player action: {ACTION}\n\n"
        "What the other agents said:\n- archivist: Pry: DC 12.\n- arbiter: Ruling: DC 12."
    )


@pytest.mark.parametrize("kind", ["ruling", "scene"])
def test_structured_kinds_append_the_format_instruction(kind: str) -> None:
    agent = {"ruling": "arbiter", "scene": "module_keeper"}[kind]
    structured = build_prompt(agent, request(), {}, output=kind)
    plain = build_prompt(agent, request(), {}, output="text")
    assert f"{DEFAULT_PROMPTS[agent]}\n{INSTRUCTIONS[kind]}" in structured.task
    assert INSTRUCTIONS[kind] not in plain.text()
    # the format instruction is the agent's own: the shared prefix is unchanged
    assert structured.system == plain.system and structured.reference == plain.reference


def test_without_reference_text_the_user_message_is_the_task() -> None:
    prompt = build_prompt("narrator", request(text=""), {})
    assert prompt.reference == "" and prompt.user == prompt.task
    assert prompt.messages() == [
        {"role": "system", "content": prompt.system},
        {"role": "user", "content": prompt.task},
    ]
    with_ref = build_prompt("narrator", request(), {})
    assert with_ref.messages()[1]["content"] == f"{with_ref.reference}\n\n{with_ref.task}"


def test_custom_instructions_fill_known_placeholders_only() -> None:
    prompt = build_prompt(
        "bard",
        request(location="the Reliquary"),
        {},
        instructions="You are the {agent}; at {location}, sing about {missing} {{braces}}.",
    )
    assert "You are the bard; at the Reliquary, sing about {missing} {{braces}}." in prompt.task
    generic = build_prompt("bard", request(), {})
    assert generic.task.endswith(_GENERIC_BARD)


# ----------------------------------------------------------------------- action_first


def test_action_first_puts_the_players_text_first() -> None:
    inputs = {"archivist": {"text": "Pry: DC 12."}}
    req = request(synopsis="A vault beneath a drowned chapel.")
    prompt = build_prompt("arbiter", req, inputs, output="ruling", layout="action_first")
    assert prompt.reference == ""
    assert prompt.user.startswith(f"Player action: {ACTION}")
    assert prompt.messages()[1]["content"].startswith(f"Player action: {ACTION}")
    # the agent's instructions lead the system message, before the shared preamble
    assert prompt.system.startswith(f"{DEFAULT_PROMPTS['arbiter']}\n{INSTRUCTIONS['ruling']}")
    order = [
        prompt.task.index(part)
        for part in (
            "Player action",
            "What the other agents said",
            "Reference:",
            "The adventure:",
            "Notes:",
        )
    ]
    assert order == sorted(order)
    # two agents' prompts now differ from the first character on
    other = build_prompt("narrator", request(), {}, layout="action_first")
    assert common_prefix(prompt.text(), other.text()) < len("You are the ") + 1


def test_unknown_layout_is_rejected() -> None:
    assert LAYOUTS == ("stable_first", "action_first")
    with pytest.raises(ValueError, match="layout must be one of"):
        build_prompt("narrator", request(), {}, layout="random")


# ----------------------------------------------------------------------- as_text


@pytest.mark.parametrize(
    ("output", "text"),
    [
        ({"text": "A ruling.", "structured": {"dc": 3}}, "A ruling."),
        ("plain", "plain"),
        ({"dc": 3}, '{"dc": 3}'),
        ({"text": 5}, '{"text": 5}'),
        (["é"], '["é"]'),
    ],
)
def test_as_text(output: Any, text: str) -> None:
    assert as_text(output) == text


def test_prompt_text_joins_its_parts() -> None:
    prompt = Prompt(system="S", reference="R", task="T")
    assert prompt.user == "R\n\nT" and prompt.text() == "S\n\nR\n\nT"
