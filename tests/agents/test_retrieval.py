"""RetrievalFirstAgent: answers from the retrieved text; the model only without any."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio.lowlevel
import attrs
import pytest

from engine.agents.base import AgentRequest
from engine.agents.retrieval import RetrievalFirstAgent, retrieval_answer

CONTEXT = (
    "Locations > The Reliquary\n"
    "A low vault of black stone. Niches line the walls, each with a skull.\n\n"
    "Encounters > Reliquary Ghoul\n"
    "The ghoul waits behind the altar. It attacks anyone who touches the reliquary.\n\n"
    "Rules > Grappling\n"
    "Grappling uses an Athletics check. The target contests it."
)
TITLES = ["Locations > The Reliquary", "Encounters > Reliquary Ghoul", "Rules > Grappling"]


@attrs.define(eq=False)
class Model:
    """The wrapped model: records its calls."""

    calls: list[tuple[AgentRequest, dict[str, Any]]] = attrs.field(factory=list)

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        self.calls.append((request, dict(inputs)))
        await anyio.lowlevel.checkpoint()
        return {"text": "from the model", "usage": {"input_tokens": 12}}


def request(text: str = CONTEXT, titles: list[str] | None = None) -> AgentRequest:
    context = {
        "action": "I grab the ghoul",
        "text": text,
        "titles": TITLES if titles is None else titles,
    }
    return AgentRequest(id="archivist", agent="archivist", context=context)


@pytest.mark.anyio
async def test_answers_from_the_context_without_calling_the_model() -> None:
    model = Model()
    out = await RetrievalFirstAgent(model).run(request(), {"module_keeper": {"text": "x"}})
    assert model.calls == []
    assert out["text"] == (
        "From Locations > The Reliquary: A low vault of black stone. "
        "From Encounters > Reliquary Ghoul: The ghoul waits behind the altar. "
        "From Rules > Grappling: Grappling uses an Athletics check."
    )
    assert out["sources"] == TITLES
    assert out["usage"] == {"input_tokens": 0, "cached_tokens": 0, "output_tokens": 0}


@pytest.mark.parametrize("text", ["", "   \n\n  "])
@pytest.mark.anyio
async def test_calls_the_model_when_the_context_is_empty(text: str) -> None:
    model = Model()
    req = request(text)
    inputs = {"module_keeper": {"text": "The scene: the vault."}}
    out = await RetrievalFirstAgent(model).run(req, inputs)
    assert out == {"text": "from the model", "usage": {"input_tokens": 12}}
    assert model.calls == [(req, inputs)]  # the same request and inputs, passed through


@pytest.mark.anyio
async def test_a_missing_text_key_counts_as_empty() -> None:
    model = Model()
    req = AgentRequest(id="a", agent="archivist", context={"action": "I look"})
    await RetrievalFirstAgent(model).run(req, {})
    assert len(model.calls) == 1


def test_only_the_best_three_chunks_are_cited() -> None:
    titles = [*TITLES, "Npcs > Sister Maud"]
    text = CONTEXT + "\n\nNpcs > Sister Maud\nThe priest tends the ruins."
    out = retrieval_answer(request(text, titles))
    assert out is not None
    assert out["sources"] == TITLES
    assert "Sister Maud" not in out["text"]


def test_blocks_may_open_with_the_short_title() -> None:
    text = "The Reliquary\nA low vault of black stone. More."
    out = retrieval_answer(request(text, ["Locations > The Reliquary"]))
    assert out is not None
    assert out["text"] == "From Locations > The Reliquary: A low vault of black stone."


def test_without_titles_the_text_itself_is_summarised() -> None:
    out = retrieval_answer(request("Bells ring at dusk. Nobody knows why.", []))
    assert out is not None
    assert out["text"] == "From the module: Bells ring at dusk."
    assert out["sources"] == []


def test_a_title_without_a_matching_block_is_still_named() -> None:
    out = retrieval_answer(request("Something else entirely. Yes.", ["Rules > Grappling"]))
    assert out is not None
    assert out["text"] == "From Rules > Grappling."


def test_long_first_sentences_are_cut() -> None:
    body = "word " * 100
    out = retrieval_answer(request(f"Rules > Long\n{body}", ["Rules > Long"]))
    assert out is not None
    gist = out["text"].removeprefix("From Rules > Long: ")
    assert len(gist) <= 200 and gist.endswith("…")


def test_no_context_no_answer() -> None:
    assert retrieval_answer(request("")) is None
