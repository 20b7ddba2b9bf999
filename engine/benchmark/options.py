"""What every bench command shares: the simulation overrides of its command line, the
``environment`` block of the results document it writes, and the table of figures the
load tests print.

``command`` (``dm-engine bench``), ``load_command`` (``--load``), ``load``,
``processes`` and ``worker`` all import these from here, so no command module
imports another.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import attrs
from rich.table import Table

from ..config import Config

if TYPE_CHECKING:
    from .load import Figures

__all__ = ["add_figures", "environment", "figures_table", "with_overrides"]


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


def figures_table(title: str) -> Table:
    """An empty table of per-measure figures (count, p50, p95, p99, max in ms)."""
    table = Table(title=title)
    for col in ("measure", "count", "p50", "p95", "p99", "max"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    return table


def add_figures(table: Table, name: str, figures: Figures, style: str = "") -> None:
    """One row of :func:`figures_table`: ``figures`` (seconds) in milliseconds."""
    ms = (f"{v * 1e3:.2f}" for v in (figures.p50, figures.p95, figures.p99, figures.max))
    table.add_row(name, str(figures.count), *ms, style=style)
