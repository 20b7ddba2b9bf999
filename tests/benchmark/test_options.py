"""The pieces every bench command shares (benchmark/options.py), and that no command
module imports another to get them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.benchmark.options import environment, with_overrides
from engine.config import Config


@pytest.mark.parametrize(
    "module",
    ["engine.benchmark.load_command", "engine.benchmark.worker", "engine.benchmark.processes"],
)
def test_no_command_module_is_imported_for_the_shared_pieces(module: str) -> None:
    code = f"import sys, {module}; print('engine.benchmark.command' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


def test_with_overrides_keeps_what_is_not_given() -> None:
    config = Config()
    assert with_overrides(config, None, None) == config
    changed = with_overrides(config, "hosted", 7, time_scale=0.5).simulation
    assert (changed.scenario, changed.seed, changed.time_scale) == ("hosted", 7, 0.5)
    assert with_overrides(config, None, 0).simulation.seed == 0  # 0 is a seed, not "unset"


def test_environment_names_the_run() -> None:
    config = with_overrides(Config(), "hosted", 7)
    env = environment(config, "asyncio")
    assert (env["backend"], env["seed"], env["scenario"]) == ("asyncio", 7, "hosted")
    assert {"python", "trio", "anyio", "cpu_count", "platform"} <= set(env)
