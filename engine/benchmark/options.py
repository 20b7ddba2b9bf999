"""What every bench command shares: the simulation overrides of its command line and
the ``environment`` block of the results document it writes.

``command`` (``dm-engine bench``), ``load_command`` (``--load``), ``load``,
``processes`` and ``worker`` all import these from here, so no command module
imports another.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import version
from typing import Any

import attrs

from ..config import Config

__all__ = ["environment", "with_overrides"]


def with_overrides(
    config: Config,
    scenario: str | None,
    seed: int | None,
    *,
    time_scale: float | None = None,
) -> Config:
    """``config`` with ``[simulation]`` overridden where an argument is given
    (``None``: keep the configured value)."""
    sim = config.simulation
    sim = attrs.evolve(
        sim,
        scenario=scenario or sim.scenario,
        seed=sim.seed if seed is None else seed,
        time_scale=sim.time_scale if time_scale is None else time_scale,
    )
    return attrs.evolve(config, simulation=sim)


def environment(config: Config, backend: str) -> dict[str, Any]:
    """Where and how a run ran: versions, event-loop backend, CPUs, seed, scenario."""
    return {
        "python": platform.python_version(),
        "trio": version("trio"),
        "anyio": version("anyio"),
        "backend": backend,
        "cpu_count": os.cpu_count(),
        "seed": config.simulation.seed,
        "scenario": config.simulation.scenario,
        "platform": platform.platform(),
    }
