"""Compiled modules shared by the content tests (compiling the SRD takes a while)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from engine.content.store import open_module


def _compile(name: str, folder: Path) -> Path:
    async def main() -> None:
        store = await open_module(name, cache_dir=folder)
        await store.aclose()

    anyio.run(main)
    return folder


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache folder holding the default module (adventure + SRD), compiled once."""
    return _compile("default", tmp_path_factory.mktemp("modules"))


@pytest.fixture(scope="session")
def srd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache folder holding the SRD module, compiled once."""
    return _compile("srd", tmp_path_factory.mktemp("srd"))
