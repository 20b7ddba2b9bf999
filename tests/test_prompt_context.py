"""What the pipeline puts in each agent's request context for its prompt: the module's
synopsis (``[performance.prompts] synopsis_tokens``) and, for ``budget_tokens = 0``,
no retrieved text at all."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest

import engine
from engine.agents.base import AgentRequest
from engine.config import AgentConfig, Config, parse_config
from engine.content.lazy import LazyLoadManager
from engine.errors import ConfigError, LoadError

pytestmark = pytest.mark.anyio


@attrs.define(eq=False)
class Capture:
    """Answers at once and keeps each request's context."""

    contexts: list[Mapping[str, Any]] = attrs.field(factory=list)

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        self.contexts.append(request.context)
        return {"text": f"{request.agent} answers."}


def make_config(tmp_path: Path, synopsis_tokens: int) -> Config:
    config = Config()
    agents = {
        "opening": AgentConfig(budget_tokens=0, narrates=True),
        "arbiter": AgentConfig(budget_tokens=300, depends_on=("opening",)),
    }
    actions = {kind: ("opening", "arbiter") for kind in config.actions}
    module = attrs.evolve(
        config.module, include_srd=False, cache_dir=str(tmp_path), query_in_thread=False
    )
    state = attrs.evolve(config.state, write_in_thread=False)
    prompts = attrs.evolve(config.performance.prompts, synopsis_tokens=synopsis_tokens)
    performance = attrs.evolve(config.performance, prompts=prompts)
    return attrs.evolve(
        config, agents=agents, actions=actions, module=module, state=state, performance=performance
    )


async def play(tmp_path: Path, synopsis_tokens: int) -> tuple[Capture, Capture, Any]:
    opening, arbiter = Capture(), Capture()
    config = make_config(tmp_path, synopsis_tokens)
    agents = {"opening": opening, "arbiter": arbiter}
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        first = await dm.player_action("s1", "I search the altar for traps")
        await dm.player_action("s2", "I attack the ghoul")
        section = await dm.builder.module.load_section(dm.builder.module.section_names()[0])
    return opening, arbiter, (first, list(section))


async def test_an_agent_with_budget_zero_reads_no_module_text(tmp_path: Path) -> None:
    opening, arbiter, (first, _) = await play(tmp_path, 0)
    assert [c["text"] for c in opening.contexts] == ["", ""]
    assert opening.contexts[0]["sources"] == []
    assert all(c["text"] for c in arbiter.contexts)  # the other agent still gets its context
    assert first.contexts["opening"].tokens == 0


async def test_the_synopsis_is_the_modules_opening_passages_within_its_budget(
    tmp_path: Path,
) -> None:
    opening, arbiter, (_, chunks) = await play(tmp_path, 250)
    synopsis = opening.contexts[0]["synopsis"]
    # the longest run of the first section's passages, in order, that fits 250 tokens
    fitting, used = [], 0
    for chunk in chunks:
        if used + chunk.tokens > 250:
            break
        fitting.append(chunk.text)
        used += chunk.tokens
    assert fitting and synopsis == "\n\n".join(fitting)
    # the same text in every prompt of every session: a prefix a server can cache
    assert {c["synopsis"] for c in opening.contexts + arbiter.contexts} == {synopsis}


async def test_a_synopsis_that_fails_to_load_is_left_out_and_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opening, arbiter = Capture(), Capture()
    config = make_config(tmp_path, 250)
    agents = {"opening": opening, "arbiter": arbiter}
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        real = LazyLoadManager.ensure_loaded
        failures = [LoadError("chapters", "disk on fire")]

        async def flaky(self: LazyLoadManager, *sections: str) -> dict[str, Any]:
            if failures:
                raise failures.pop()
            return await real(self, *sections)

        monkeypatch.setattr(LazyLoadManager, "ensure_loaded", flaky)
        first = await dm.player_action("s1", "I search the altar for traps")
        second = await dm.player_action("s1", "I attack the ghoul")
    assert not first.missing and first.turn == 1  # the action went on without it
    assert opening.contexts[0]["synopsis"] == ""
    assert opening.contexts[1]["synopsis"] != "" and second.turn == 2  # read this time


async def test_no_synopsis_by_default(tmp_path: Path) -> None:
    opening, _, _ = await play(tmp_path, 0)
    assert {c["synopsis"] for c in opening.contexts} == {""}


def test_synopsis_and_budget_limits_are_checked() -> None:
    with pytest.raises(ConfigError, match="synopsis_tokens"):
        parse_config({"performance": {"prompts": {"synopsis_tokens": -1}}})
    names = list(Config().agents)

    def agents(budget: int) -> dict[str, Any]:
        return {"agents": {name: {"budget_tokens": budget} for name in names}}

    with pytest.raises(ConfigError, match=r"budget_tokens.*must be >= 0"):
        parse_config(agents(-5))
    assert parse_config(agents(0)).agents["narrator"].budget_tokens == 0
