"""The ``dm-engine`` command: ``bench``, ``play``, ``mcp`` and ``config check``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import Config, load_config
from .errors import ConfigError

__all__ = ["main"]

_NO_MCP = "dm-engine mcp needs the MCP SDK (mcp 2.x): pip install 'dm-engine[mcp]'"


def _config_path(path: str | None) -> str | None:
    """``--config PATH``; else ./config.toml when present; else None (the defaults)."""
    if path is not None:
        return path
    return "config.toml" if Path("config.toml").is_file() else None


def _load(path: str | None) -> Config | None:
    """The configuration at ``path`` (None: the defaults), or None after printing
    ``PATH: <key> = <value>: <what is allowed>`` (one line) to stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path or '<defaults>'}: {exc}", file=sys.stderr)
        return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dm-engine", description=__doc__)
    parser.add_argument("--config", help="configuration file (default: ./config.toml if present)")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="run the benchmark suite and check the targets")
    bench.add_argument("--scenario", choices=("targets", "hosted"), default=None)
    bench.add_argument("--iterations", type=int, default=2000, help="actions per strategy")
    bench.add_argument("--sessions", type=int, default=None, help="concurrent sessions")
    bench.add_argument("--seed", type=int, default=None)
    bench.add_argument("--out", default="out", help="folder for results.json and report.html")
    bench.add_argument("--real-time", action="store_true", help="agent latencies in real time")
    bench.add_argument("--load", action="store_true", help="run the concurrent-sessions load test")
    bench.add_argument("--actions", type=int, default=5, help="--load: actions per session")
    bench.add_argument(
        "--time-scale", type=float, default=0.02, help="--load: multiply simulated latencies"
    )
    bench.add_argument(
        "--think-time", type=float, default=10.0, help="--load: seconds between a player's actions"
    )
    bench.add_argument(
        "--processes",
        type=int,
        default=None,
        help="--load: N engine processes sharing --config's PostgreSQL and Redis, "
        "actions sent to random ones, one SIGKILLed mid-run (docs/scale-out.md)",
    )
    bench.add_argument("--backend", choices=("trio", "asyncio"), default="trio")
    bench.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a target is missed")
    bench.add_argument(
        "--llm",
        nargs="?",
        const="start",
        metavar="URL",
        help="play the script on a real OpenAI-compatible server at URL (real time); "
        "without URL, start the bundled llama.cpp server (the [llm] extra)",
    )
    bench.add_argument("--rounds", type=int, default=3, help="--llm: times the script is played")
    bench.add_argument(
        "--lever-actions",
        type=int,
        default=500,
        help="actions per row of the DAG-lever comparison (0: skip it)",
    )

    play = sub.add_parser("play", help="play the default adventure with simulated agents")
    play.add_argument("text", nargs="?", help="one action (default: an interactive prompt)")
    play.add_argument("--session", default="player", help="session id")
    play.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply simulated latencies (e.g. 0.1)"
    )

    sub.add_parser("mcp", help="serve the engine over MCP on stdio (the [mcp] extra)")

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a configuration file")
    check.add_argument("path", nargs="?", default="config.toml")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config":
        if _load(args.path) is None:
            return 1
        print("ok")
        return 0
    config = _load(_config_path(args.config))
    if config is None:
        return 1
    if args.command == "play":
        from .play import run_play_command

        return run_play_command(config, args)
    if args.command == "mcp":
        try:
            from .mcp_server import run_mcp_command
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] != "mcp":
                raise
            print(_NO_MCP, file=sys.stderr)
            return 1
        return run_mcp_command(config)
    from .benchmark.command import run_bench_command

    return run_bench_command(config, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
