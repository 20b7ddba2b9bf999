"""``[simulation] time_scale``: the simulation knob lives in the configuration, not in
``open_engine``'s signature (the embedding face), and scales the simulated agents."""

from __future__ import annotations

import inspect
from pathlib import Path

import attrs
import pytest

import engine
from engine.agents.base import Status
from engine.cli import main
from engine.config import Config, parse_config


def test_open_engine_has_no_simulation_knob() -> None:
    params = inspect.signature(engine.open_engine).parameters
    assert list(params) == ["config", "agents", "module", "state_path", "profiler"]


def test_time_scale_is_read_from_the_simulation_section() -> None:
    assert Config().simulation.time_scale == 1.0
    assert parse_config({"simulation": {"time_scale": 0.25}}).simulation.time_scale == 0.25
    assert parse_config({"simulation": {"time_scale": 0}}).simulation.time_scale == 0.0


@pytest.mark.parametrize("value", [-0.5, 1001.0])
def test_time_scale_out_of_range_names_key_and_value(value: float) -> None:
    with pytest.raises(engine.ConfigError) as info:
        parse_config({"simulation": {"time_scale": value}})
    assert info.value.key == "simulation.time_scale"
    assert repr(value) in str(info.value) and "<= 1000" in str(info.value)


def _config(tmp_path: Path, time_scale: float) -> Config:
    config = Config()
    return attrs.evolve(
        config,
        module=attrs.evolve(
            config.module, include_srd=False, cache_dir=str(tmp_path), query_in_thread=False
        ),
        state=attrs.evolve(config.state, path=str(tmp_path / "s.sqlite"), write_in_thread=False),
        simulation=attrs.evolve(config.simulation, time_scale=time_scale),
    )


@pytest.mark.anyio
@pytest.mark.virtual_clock
async def test_open_engine_scales_the_simulated_agents_by_the_config(tmp_path: Path) -> None:
    """The same seeded action at scale 1 and 0.25: each agent's call (virtual time)
    takes exactly a quarter as long."""
    durations: dict[float, dict[str, float]] = {}
    for scale in (1.0, 0.25):
        folder = tmp_path / str(scale)
        folder.mkdir()
        async with engine.open_engine(_config(folder, scale)) as dm:
            result = await dm.player_action("s1", "I search the altar for traps")
        assert all(r.status is Status.OK for r in result.responses.values())
        durations[scale] = {name: r.duration for name, r in result.responses.items()}
    assert set(durations[1.0]) == set(durations[0.25])
    assert any(d > 0 for d in durations[1.0].values())
    for name, full in durations[1.0].items():
        assert durations[0.25][name] == pytest.approx(full * 0.25, rel=1e-9, abs=1e-12)


def test_play_rejects_a_bad_time_scale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[module]\ninclude_srd = false\ncache_dir = "{tmp_path}"\n')
    code = main(["--config", str(config), "play", "--time-scale", "-1", "I look"])
    assert code == 2
    assert "--time-scale -1.0: must be a finite number >= 0" in capsys.readouterr().out
