"""The public face: every DESIGN.md name is exported, once, from a private home."""

from __future__ import annotations

import ast
from pathlib import Path

import engine

DESIGN_NAMES = [
    "load_config",
    "Config",
    "ConfigError",
    "AgentRequest",
    "AgentResponse",
    "Status",
    "ParallelAgentExecutor",
    "DependencyError",
    "open_module",
    "ModuleCache",
    "CacheStats",
    "LazyLoadManager",
    "LoadError",
    "OptimizedContextBuilder",
    "PerformanceProfiler",
    "PerformanceReport",
    "open_engine",
    "PerformanceBenchmark",
    "ActionStream",
]


def test_design_names_are_exported() -> None:
    missing = [name for name in DESIGN_NAMES if not hasattr(engine, name)]
    assert missing == []


def test_init_only_reexports_each_name_once() -> None:
    tree = ast.parse(Path(engine.__file__).read_text())
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Expr):  # the docstring
            continue
        assert isinstance(node, ast.ImportFrom), ast.dump(node)
        for alias in node.names:
            assert alias.asname == alias.name  # the explicit re-export form
            names.append(alias.name)
    assert len(names) == len(set(names))
    for name in names:
        assert getattr(engine, name).__module__.startswith("engine.")
