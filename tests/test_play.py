from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import main
from engine.observability.profiler import Span
from engine.play import render_waterfall


def test_waterfall_places_spans_on_the_timeline() -> None:
    root = Span("player_action", {}, 0.0, end=4.0, status="ok")
    first = Span("agent_query", {"agent": "archivist"}, 0.0, end=1.0, status="ok")
    hedge = Span("agent_query", {"agent": "narrator", "attempt": 2}, 2.0, end=4.0, status="ok")
    late = Span("agent_query", {"agent": "arbiter"}, 1.0, end=3.0, status="cancelled")
    root.children.extend([first, late, hedge])
    lines = render_waterfall(root, width=8).plain.splitlines()
    assert len(lines) == 4
    bars = [line[31:39] for line in lines]
    assert bars == ["████████", "██      ", "  ████  ", "    ████"]
    assert lines[2].endswith("cancelled") and "narrator (hedge)" in lines[3]


def test_waterfall_draws_the_winning_hedge_on_the_critical_path() -> None:
    """A hedge that won is red from its agent's readiness: the module keeper, which
    ended just before the hedge started (after the hedge delay), is not critical."""

    def sp(name: str, start: float, end: float, status: str = "ok", **attrs: object) -> Span:
        return Span(name, dict(attrs), start, end=end, status=status)

    root = sp("player_action", 0.0, 6.0)
    root.children.extend(
        [
            sp("context_building", 0.0, 0.05),
            sp("agent_query", 0.05, 0.051, agent="archivist", attempt=1),
            sp("agent_query", 0.051, 2.4, agent="module_keeper", attempt=1),
            sp("agent_query", 0.053, 2.8, "error", agent="arbiter", attempt=1),
            sp("agent_query", 2.5, 3.2, agent="arbiter", attempt=2),
            sp("agent_query", 3.3, 5.9, agent="narrator", attempt=1),
            sp("state_update", 5.9, 6.0),
        ]
    )
    lines = render_waterfall(root, width=20).split("\n")
    red = [
        line.plain[:30].strip()  # the label column
        for line in lines
        if any(span.style == "red" for span in line.spans)
    ]
    assert red == [
        "player_action",
        "context_building",
        "agent_query archivist",
        "agent_query arbiter (hedge)",
        "agent_query narrator",
        "state_update",
    ]


def test_play_one_action(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[module]\ninclude_srd = false\ncache_dir = "{tmp_path}"\n'
        f'[state]\npath = "{tmp_path / "s.sqlite"}"\n'
    )
    code = main(["--config", str(config), "play", "--time-scale", "0.001", "I search the altar"])
    out = capsys.readouterr().out
    assert code == 0
    assert "(exploration, turn 1, first words after" in out and "You search the altar" in out
    assert "agent_query narrator" in out and "state_update" in out
