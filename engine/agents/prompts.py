"""How an agent's prompt is laid out, so that a server's prefix cache can reuse it.

Prompt caches (llama.cpp, vLLM, OpenAI, Anthropic) reuse the longest *prefix* a
previous prompt shared with this one; one changed character early on makes every
token after it cost full prefill. The ``stable_first`` layout therefore orders a
prompt from what changes least to what changes most:

1. the preamble: the same for every agent and every turn of the module, with the
   module's synopsis when ``[performance.prompts] synopsis_tokens`` asks for one;
2. the session notes: where the party is and who is present (they change only when
   the scene does);
3. the reference text retrieved for this action: the same for every agent of the
   action that has the same ``budget_tokens`` (they share one ranking);
4. the player's text, the other agents' answers (in the order of the action's
   requests) and, last, this agent's instructions: on a one-request server the
   agents of an action run as a chain, and each finds the previous one's prompt,
   up to that agent's instructions, in the cache.

Nothing that changes per call (ids, draw keys, timestamps) is in the prompt at all.
``action_first`` is the naive order (the player's text and the agent's instructions
first), kept to measure what the layout buys.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Mapping
from typing import Any, Final

import attrs

from .base import AgentRequest
from .schemas import INSTRUCTIONS

__all__ = ["DEFAULT_PROMPTS", "LAYOUTS", "Prompt", "as_text", "build_prompt", "estimate_tokens"]

LAYOUTS: Final = ("stable_first", "action_first")

PREAMBLE: Final = (
    "You are one of the agents of an AI Dungeon Master running a Dungeons & Dragons 5e "
    'adventure ("{module}") for a player. Stay within the rules and the module; never '
    "decide for the player; be brief."
)

#: Instructions of the default agents, used when ``agents.<name>.prompt`` is empty.
DEFAULT_PROMPTS: Mapping[str, str] = types.MappingProxyType(
    {
        "narrator": (
            "You are the narrator. In the second person and at most three sentences, tell "
            "what happens as a result of the player's action. Follow the arbiter's ruling "
            "and the module's facts."
        ),
        "narrator_opening": (
            "You are the narrator. In the second person and at most two sentences, describe "
            "the player's character setting about the action and what they see. Do not tell "
            "the outcome: the rules have not been applied yet."
        ),
        "arbiter": (
            "You are the rules arbiter. Decide which check, saving throw or attack the "
            "player's action needs, with its DC (or the target's AC)."
        ),
        "archivist": (
            "You are the archivist. From the reference text, list the rules and lore facts "
            "that matter for the player's action, as terse bullet points."
        ),
        "module_keeper": (
            "You are the keeper of the adventure module. From the reference text, say where "
            "the party is, who is present and what changed. Never invent what the module "
            "does not say."
        ),
    }
)
_GENERIC: Final = "You are the {agent} agent. Answer for the player's action, tersely."
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@attrs.frozen
class Prompt:
    """A prompt in three parts, most stable first (see the module docstring).

    ``system`` and ``reference`` are the cacheable prefix; ``task`` is this call's.
    """

    system: str
    reference: str
    task: str

    @property
    def user(self) -> str:
        return f"{self.reference}\n\n{self.task}" if self.reference else self.task

    def messages(self) -> list[dict[str, str]]:
        """Chat messages: the system message, then one user message."""
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]

    def text(self) -> str:
        """The whole prompt as one string (what a server would prefill, roughly)."""
        return f"{self.system}\n\n{self.user}"


def estimate_tokens(text: str) -> int:
    """Tokens of a text by the rule of thumb of 4 characters a token (no tokenizer)."""
    return (len(text) + 3) // 4


def as_text(output: Any) -> str:
    """A dependency's output as prompt text: its ``text`` field, a string, or JSON."""
    if isinstance(output, Mapping) and isinstance(output.get("text"), str):
        return str(output["text"])
    if isinstance(output, str):
        return output
    return json.dumps(output, default=str, ensure_ascii=False)


def _render(template: str, values: Mapping[str, str]) -> str:
    """Replace ``{name}`` for known names in one pass; other braces stay literal."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def build_prompt(
    agent: str,
    request: AgentRequest,
    inputs: Mapping[str, Any],
    *,
    instructions: str = "",
    output: str = "text",
    layout: str = "stable_first",
) -> Prompt:
    """The prompt of one call of ``agent``.

    Args:
        agent: the agent's name (picks the default instructions).
        request: its ``context`` supplies ``action`` (the player's text), ``text``
            (the retrieved reference text), ``notes`` (the session notes) and
            ``module`` (the module's name) and ``synopsis`` (its opening passages,
            optional); other string entries may be used as
            ``{placeholders}`` in ``instructions``.
        inputs: the dependencies' outputs (request id -> output).
        instructions: the agent's instructions (empty: the default for ``agent``).
        output: ``text``, ``ruling`` or ``scene``; structured kinds append the format.
        layout: ``stable_first`` or ``action_first``.
    """
    context = request.context
    values = {k: v for k, v in context.items() if isinstance(v, str)}
    values["agent"] = agent
    role = _render(instructions or DEFAULT_PROMPTS.get(agent, _GENERIC), values)
    if output in INSTRUCTIONS:
        role = f"{role}\n{INSTRUCTIONS[output]}"
    preamble = _render(PREAMBLE, {"module": str(context.get("module") or "the module")})
    synopsis = str(context.get("synopsis") or "").strip()
    notes = str(context.get("notes") or "").strip()
    reference = str(context.get("text") or "").strip()
    answers = "\n".join(f"- {rid}: {as_text(out)}" for rid, out in inputs.items())
    action = f"Player action: {context.get('action', '')}"
    if layout == "action_first":
        task = "\n\n".join(
            p
            for p in (
                action,
                f"What the other agents said:\n{answers}" if answers else "",
                f"Reference:\n{reference}" if reference else "",
                f"The adventure:\n{synopsis}" if synopsis else "",
                f"Notes: {notes}" if notes else "",
            )
            if p
        )
        return Prompt(system=f"{role}\n{preamble}", reference="", task=task)
    if layout != "stable_first":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    system = f"{preamble}\n\nThe adventure:\n{synopsis}" if synopsis else preamble
    if notes:
        system = f"{system}\n\nSession notes: {notes}"
    # the player's text, then the answers in request order, then the instructions: the
    # next agent of the chain finds this prompt, up to its own instructions, cached
    task = "\n\n".join(
        p for p in (action, f"What the other agents said:\n{answers}" if answers else "", role) if p
    )
    return Prompt(
        system=system, reference=f"Reference:\n{reference}" if reference else "", task=task
    )
