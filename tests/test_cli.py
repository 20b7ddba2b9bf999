from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_config_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(ROOT / "config.toml")]) == 0
    assert capsys.readouterr().out.strip() == "ok"


def test_config_check_names_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[performance.profiling]\nsample_rate = 2\n")
    assert main(["config", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "performance.profiling.sample_rate = 2" in err and "between 0.0 and 1.0" in err
