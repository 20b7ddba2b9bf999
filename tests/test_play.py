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
