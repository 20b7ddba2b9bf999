"""A bad configuration file gives one line on stderr and exit status 1, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import main

DEEP = "[" * 10_000 + "]" * 10_000

#: (file text, what the message must contain)
BAD_FILES: list[tuple[str, str]] = [
    ("[performance.parallelization]\naction_deadline_seconds = nan", "86400"),
    ("[agents.narrator]\ntimeout_seconds = nan", "agents.narrator.timeout_seconds = nan"),
    ("[agents.narrator]\nhedge_after = nan", "agents.narrator.hedge_after = nan"),
    ("[performance.cache]\nttl_minutes = nan", "performance.cache.ttl_minutes = nan"),
    ("[scenarios.targets]\nttft_median_seconds = nan", "ttft_median_seconds = nan"),
    ("[performance.cache]\nmax_size_mb = 1e308", "at most 1 TiB"),
    ("[performance.cache]\nmax_size_mb = inf", "max_size_mb = inf"),
    ("[performance.cache]\nmax_size_mb = 1" + "0" * 400, "must be a finite number"),
    ("[performance.monitoring]\nmetrics_port = 70000", "between 0 and 65535"),
    ('[performance.monitoring]\nmetrics_host = ""', "metrics_host = ''"),
    ('[performance.monitoring]\nspan_log_path = "a\\u0000b"', "NUL"),
    ('[module]\ncache_dir = "a\\u0000b"', "module.cache_dir"),
    ('[module]\nname = "a\\u0000b"', "module.name"),
    ('[state]\npath = "a\\u0000b"', "state.path"),
    ('[agents.narrator]\nbackend = "openai"', "agents.narrator.model = ''"),
    ('[agents.narrator]\nbackend = "anthropic"', "must name the model"),
    ("performance = 3", "performance = 3: must be a table"),
    ("performance = true", "performance = True: must be a table"),
    ('performance = "ab"', "must be a table"),
    ("[agents.narrator]\ndepends_on = " + DEEP, "nested too deeply"),
    ("[performance.targets.plyer_action]\np95 = 8.0", "unknown operation"),
    ('[performance.lazy_loading.priorities]\ncombt = ["rules"]', "unknown action type"),
    ('[actions]\ncombt = ["narrator"]', "actions.combt"),
    ("[actions]\ncombat = []", "must name at least one agent"),
    ('[servers.gpu]\nbase_url = "ftp://x"', "servers.gpu.base_url"),
    ('[agents." "]\nbackend = "simulated"', "only whitespace"),
    ("[performance\n", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_FILES, ids=[b[1] for b in BAD_FILES])
def test_config_check_prints_one_line_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    assert main(["config", "check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"{path}: ")
    assert err.count("\n") == 1
    assert expected in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv", [["bench", "--iterations", "1"], ["play", "look around"]], ids=["bench", "play"]
)
@pytest.mark.parametrize(
    "text", ["[performance.cache]\nmax_size_mb = 1e308", "[actions]\ncombat = []", "x = " + DEEP]
)
def test_bad_config_stops_bench_and_play_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], text: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    assert main(["--config", str(path), *argv]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"{path}: ")
    assert err.count("\n") == 1


def test_local_config_toml_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config.toml").write_text("[performance.monitoring]\nmetrics_port = 70000\n")
    monkeypatch.chdir(tmp_path)
    assert main(["play", "look around"]) == 1
    assert capsys.readouterr().err.startswith("config.toml: performance.monitoring.metrics_port")
