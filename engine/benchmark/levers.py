"""What each change of the agent DAG buys, on the same seeded draws (the "levers").

Each lever is the previous one plus one change, applied to the shipped agents; every
row runs the whole pipeline (contexts, prompts, the executor with hedging, the state
update) on the same scripted actions and seeds, in virtual time, so the rows differ
only by what the engine does — never by faster simulated agents:

* ``today`` — the DAG before these levers: archivist -> arbiter -> narrator (150 tokens,
  after the ruling and the scene), free-text answers;
* ``retrieval`` — the archivist answers from retrieval (no LLM call);
* ``structured`` — rulings and scenes as short structured answers;
* ``two_part`` — the narrator's opening (what is attempted, what is seen)
  streams before the ruling, the outcome after it;
* ``ruling_only`` — the outcome waits for the ruling only (the scene goes to
  the session state), and a rules question is answered without a ruling: the shipped
  default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ..config import AgentConfig, Config

__all__ = ["LEVERS", "lever_configs", "run_levers"]

_TODAY_AGENTS = {
    "archivist": AgentConfig(budget_tokens=1500, output_tokens=80, hedge_after="p95"),
    "module_keeper": AgentConfig(budget_tokens=1200, output_tokens=60, hedge_after="p95"),
    "arbiter": AgentConfig(
        depends_on=("archivist",), budget_tokens=1500, output_tokens=80, hedge_after="p95"
    ),
    "narrator": AgentConfig(
        depends_on=("arbiter", "module_keeper"),
        budget_tokens=2000,
        output_tokens=150,
        hedge_after="p95",
        narrates=True,
    ),
}
_TODAY_ACTIONS = {
    "combat": ("archivist", "module_keeper", "arbiter", "narrator"),
    "exploration": ("archivist", "module_keeper", "arbiter", "narrator"),
    "roleplay": ("archivist", "module_keeper", "narrator"),
    "question": ("archivist", "arbiter", "narrator"),
    "rest": ("module_keeper", "arbiter", "narrator"),
    "system": ("module_keeper",),
    "other": ("archivist", "module_keeper", "narrator"),
}


def _with(agents: Mapping[str, AgentConfig], name: str, **changes: Any) -> dict[str, AgentConfig]:
    return {**agents, name: attrs.evolve(agents[name], **changes)}


def _retrieval(agents: dict[str, AgentConfig], actions: dict[str, tuple[str, ...]]) -> None:
    agents.update(_with(agents, "archivist", from_retrieval=True, hedge_after="off"))


def _structured(agents: dict[str, AgentConfig], actions: dict[str, tuple[str, ...]]) -> None:
    agents.update(_with(agents, "arbiter", output="ruling", output_tokens=30, max_tokens=100))
    agents.update(_with(agents, "module_keeper", output="scene", output_tokens=40, max_tokens=120))


def _two_part(agents: dict[str, AgentConfig], actions: dict[str, tuple[str, ...]]) -> None:
    agents["narrator_opening"] = AgentConfig(
        budget_tokens=1200, output_tokens=45, hedge_after="p95", narrates=True, max_tokens=90
    )
    agents.update(_with(agents, "narrator", output_tokens=70, budget_tokens=1500, max_tokens=160))
    for kind, names in list(actions.items()):
        if "narrator" in names and kind != "question":
            i = names.index("narrator")
            actions[kind] = (*names[:i], "narrator_opening", *names[i:])


def _ruling_only(agents: dict[str, AgentConfig], actions: dict[str, tuple[str, ...]]) -> None:
    agents.update(_with(agents, "narrator", depends_on=("arbiter",)))
    actions["question"] = ("archivist", "narrator")


Lever = Callable[[dict[str, AgentConfig], dict[str, tuple[str, ...]]], None]

#: (name, what it changes), cumulative, in order.
LEVERS: tuple[tuple[str, str, Lever | None], ...] = (
    ("today", "archivist -> arbiter -> narrator, free text", None),
    ("retrieval", "+ the archivist answers from retrieval", _retrieval),
    ("structured", "+ short structured rulings and scenes", _structured),
    ("two_part", "+ the opening streams before the ruling", _two_part),
    ("ruling_only", "+ the outcome waits for the ruling only", _ruling_only),
)


def lever_configs(config: Config) -> dict[str, Config]:
    """``config`` with each lever's agents and actions (cumulative), by lever name."""
    agents = {
        name: attrs.evolve(spec, timeout_seconds=config.agents[name].timeout_seconds)
        if name in config.agents
        else spec
        for name, spec in _TODAY_AGENTS.items()
    }
    actions = dict(_TODAY_ACTIONS)
    configs: dict[str, Config] = {}
    for name, _what, lever in LEVERS:
        if lever is not None:
            lever(agents, actions)
        lever_agents: Mapping[str, AgentConfig] = dict(agents)
        lever_actions: Mapping[str, tuple[str, ...]] = dict(actions)
        configs[name] = attrs.evolve(config, agents=lever_agents, actions=lever_actions)
    return configs


async def run_levers(
    config: Config, iterations: int, progress: Callable[[str, int], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Each lever through the whole pipeline: latency percentiles, first_token,
    degraded actions, agent calls (hedges included) and tokens, same draws."""
    from .suite import PerformanceBenchmark  # the suite imports this module's users

    rows: dict[str, dict[str, Any]] = {}
    for name, lever_config in lever_configs(config).items():
        if progress is not None:
            progress(f"lever {name}", 0)
        bench = PerformanceBenchmark(lever_config, warmup=20)
        ops = await bench.benchmark_action_processing(iterations)
        action, first = ops["player_action"], ops["first_token"]
        rows[name] = {
            "what": next(w for n, w, _ in LEVERS if n == name),
            "p50": action.p50,
            "p95": action.p95,
            "p99": action.p99,
            "first_token_p50": first.p50,
            "first_token_p95": first.p95,
            "degraded_actions": bench.degraded,
            "agent_calls": bench.agent_calls,
            "prompt_tokens": bench.tokens.get("prompt", 0),
            "cached_tokens": bench.tokens.get("cached", 0),
            "generated_tokens": bench.tokens.get("generated", 0),
        }
    today = rows["today"]
    for row in rows.values():
        row["extra_calls"] = row["agent_calls"] / today["agent_calls"] - 1
        row["extra_tokens"] = (row["prompt_tokens"] + row["generated_tokens"]) / (
            today["prompt_tokens"] + today["generated_tokens"]
        ) - 1
    return rows
