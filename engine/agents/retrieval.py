"""An agent that answers from the retrieved text, calling its model only without any.

The archivist's job is finding the rules and lore text that bear on an action, which
the context builder has already done (BM25 over the module store, well under a
millisecond). :class:`RetrievalFirstAgent` answers with the gist of the best chunks
it was given — no LLM call, no tokens, no time on the critical path — and calls the
wrapped model only when the context is empty (``agents.<name>.from_retrieval``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, final

import attrs

from .base import Agent, AgentRequest

__all__ = ["RetrievalFirstAgent", "retrieval_answer"]


def _gist(text: str, limit: int = 200) -> str:
    """The first sentence of ``text`` (at most ``limit`` characters)."""
    flat = " ".join(text[: 2 * limit + 200].split())
    cut = flat.find(". ")
    sentence = flat if cut < 0 else flat[: cut + 1]
    return sentence if len(sentence) <= limit else sentence[: limit - 1].rstrip() + "…"


def retrieval_answer(request: AgentRequest, top: int = 3) -> dict[str, Any] | None:
    """The best chunks' titles and first sentences, or None without any context.

    The context text is the builder's: chunks joined by blank lines, each opening
    with its title line; ``context["titles"]`` lists the titles in the same order.
    """
    text = str(request.context.get("text") or "").strip()
    titles = [str(t) for t in request.context.get("titles") or ()]
    if not text:
        return None
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    lines: list[str] = []
    for title in titles[:top]:
        short = title.split(" > ")[-1]
        body = next((b for b in blocks if b.startswith((title, short))), "")
        first, _, rest = body.partition("\n")
        gist = _gist(rest if rest else first)
        lines.append(f"From {title}: {gist}" if gist else f"From {title}.")
    if not lines:
        lines.append(f"From the module: {_gist(text)}")
    usage = {"input_tokens": 0, "cached_tokens": 0, "output_tokens": 0}
    return {"text": " ".join(lines), "sources": titles[:top], "usage": usage}


@final
@attrs.define(eq=False)
class RetrievalFirstAgent:
    """Answers from the request's retrieved text; calls ``inner`` only without any."""

    inner: Agent

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        answer = retrieval_answer(request)
        if answer is not None:
            return answer
        return await self.inner.run(request, inputs)
