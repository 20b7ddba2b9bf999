"""dm-engine against its peers, LangGraph and pydantic-graph, on the same seeded draws.

Run: ``.venv/bin/python -m bench.bench_peers --out DIR`` (the peers come with the
``[bench]`` extra: ``.venv/bin/pip install -e '.[bench]'``). Writes ``DIR/peers.json``
and prints a table with ratios against ``dm-engine``.

Every runtime runs the shipped agent DAG — the default configuration's ``[actions]``
and ``[agents.*] depends_on``; ``--action-types combat`` by default, the full
five-agent DAG the strategy comparison replays (a comma-separated list is cycled over
the actions) — for the same actions, keyed ``"0"``, ``"1"``, … as in
``compare_strategies``. Each agent sleeps its drawn latency on the runtime's own event
loop, in real time: ``draw_latency`` with the default latency model (``targets``) and
seed, the agent's output tokens and its full context as the prompt (as the strategy
comparison draws them), times ``--time-scale``; the archivist answers from retrieval
and takes no time (``sleep(0)``). The runtimes:

* ``dm-engine`` — ``ParallelAgentExecutor.from_config`` without hedging, on trio (by
  default; ``--engine-loop asyncio``);
* ``dm-engine-hedged`` — the same with the shipped hedging (``hedge_after = "p95"``
  after 20 samples, 10 % budget); a hedge sleeps its own draw (``attempt = 2``), as
  the simulated agents do;
* ``langgraph`` — a ``StateGraph`` compiled once per action type: ``START`` fans out
  to the roots, one edge per dependency (a node with several dependencies waits on
  the list of them), every sink goes to ``END``, and the agents' parallel writes meet
  in a dict-merge reducer; ``ainvoke`` on asyncio;
* ``pydantic-graph`` — ``GraphBuilder``: the start broadcasts to the roots, a parent
  broadcasts to its children, a join (``reduce_dict_update``) gathers the branches
  before the end; ``Graph.run`` on asyncio.

Actions run one at a time; an action's latency is ``time.perf_counter()`` around the
runtime's call (its requests or its input state built inside). The actions are cut
into ``--rounds`` chunks and the runtimes take turns chunk by chunk, in a rotating
order, so a change of machine load falls on all of them alike; each runtime first
runs ``--warmup`` unmeasured actions of their own keys (the hedged executor learns its
p95 there). Then each runtime's own overhead: the same, with agents that take no time,
``--overhead-actions`` actions, the mean and p95 of one action in microseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, Protocol, TypedDict

import anyio
import attrs
from rich.console import Console
from rich.table import Table

from engine.agents.base import AgentRequest
from engine.agents.simulated import draw_latency
from engine.benchmark.options import with_overrides
from engine.benchmark.strategies import action_requests
from engine.config import Config
from engine.quantiles import percentile
from engine.scheduling.dag import RequestGraph
from engine.scheduling.executor import ParallelAgentExecutor

__all__ = [
    "RUNTIMES",
    "Action",
    "Draws",
    "EngineRuntime",
    "LangGraphRuntime",
    "PydanticGraphRuntime",
    "Work",
    "compare",
    "dag_of",
    "main",
    "make_runtimes",
    "run_batch",
]

RUNTIMES = ("dm-engine", "dm-engine-hedged", "langgraph", "pydantic-graph")
PEER_LOOP = "asyncio"  # LangGraph and pydantic-graph: asyncio's event loop

#: An agent call as every runtime makes it: (draw key, agent, attempt) -> its output.
AgentCall = Callable[[str, str, int], Awaitable[Any]]


@attrs.frozen
class Action:
    """One player action: the key of its draws and the action type (its agent DAG)."""

    key: str
    action_type: str


def dag_of(config: Config, action_type: str) -> dict[str, tuple[str, ...]]:
    """The agent DAG of ``action_type``: agent -> the agents it depends on, in the
    configured order (dependencies outside the action's agent set dropped, exactly as
    the engine's pipeline and the strategy comparison build it)."""
    return {r.id: r.depends_on for r in action_requests(config, action_type, "")}


@attrs.define(eq=False)
class Draws:
    """The seeded latency of every agent call, in seconds, precomputed (a lookup in
    the timed path): ``draw_latency`` with the configured latency model and seed, as
    ``compare_strategies`` draws them, times ``time_scale``."""

    config: Config
    time_scale: float = 1.0
    _table: dict[tuple[str, str, int], float] = attrs.field(factory=dict, init=False)

    def draw(self, key: str, agent: str, attempt: int = 1) -> float:
        spec = self.config.agents[agent]
        if spec.from_retrieval:  # answers from retrieval: no model call
            return 0.0
        return self.time_scale * draw_latency(
            self.config.latency_model(),
            spec.output_tokens,
            self.config.simulation.seed,
            key,
            agent,
            attempt,
            uncached_tokens=spec.budget_tokens,  # a full context, as the strategies draw
        )

    def prepare(self, actions: Sequence[Action]) -> None:
        """Draw every call of ``actions``, first attempts and hedges."""
        for action in actions:
            for agent in self.config.agents_for(action.action_type):
                for attempt in (1, 2):
                    self._table[(action.key, agent, attempt)] = self.draw(
                        action.key, agent, attempt
                    )

    def latency(self, key: str, agent: str, attempt: int = 1) -> float:
        found = self._table.get((key, agent, attempt))
        return found if found is not None else self.draw(key, agent, attempt)

    def bounds(self, action: Action) -> tuple[float, float]:
        """(critical path, level barrier) of ``action``'s first-attempt draws: what
        eager dispatch with unlimited capacity achieves, and what a schedule that
        gathers each topological level before the next one does."""
        requests = action_requests(self.config, action.action_type, action.key)
        graph = RequestGraph.build(requests)
        finish: dict[int, float] = {}
        barrier = 0.0
        for level in graph.levels:
            took = {i: self.latency(action.key, graph.requests[i].agent) for i in level}
            for i in level:
                start = max((finish[p] for p in graph.parents[i]), default=0.0)
                finish[i] = start + took[i]
            barrier += max(took.values())
        return max(finish.values(), default=0.0), barrier


@attrs.define(eq=False)
class Work:
    """The fake agents every runtime calls: sleep the drawn latency on the running
    event loop (``anyio.sleep``: asyncio's or trio's own sleep), then answer.

    ``draws=None`` answers after ``sleep(0)`` (the overhead runs). ``trace`` (a list)
    records ``("start" | "finish", key, agent, attempt)`` in order; a cancelled hedge
    records no finish.
    """

    draws: Draws | None = None
    trace: list[tuple[str, str, str, int]] | None = None
    calls: int = 0

    async def __call__(self, key: str, agent: str, attempt: int = 1) -> str:
        self.calls += 1
        trace = self.trace
        if trace is not None:
            trace.append(("start", key, agent, attempt))
        draws = self.draws
        await anyio.sleep(draws.latency(key, agent, attempt) if draws is not None else 0.0)
        if trace is not None:
            trace.append(("finish", key, agent, attempt))
        return f"{agent}@{key}"


class Runtime(Protocol):
    """What the comparison drives: one action at a time on the runtime's own loop."""

    @property
    def name(self) -> str: ...

    @property
    def loop(self) -> str: ...  # "trio" or "asyncio"

    async def run(self, action: Action) -> None: ...


# ------------------------------------------------------------------------ dm-engine


@attrs.define(eq=False)
class _EngineAgent:
    call: AgentCall

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        context = request.context
        return await self.call(str(context["draw_key"]), request.agent, context.get("attempt", 1))


@attrs.define(eq=False)
class EngineRuntime:
    """dm-engine's ``ParallelAgentExecutor`` as the shipped configuration builds it
    (limiter, per-agent timeouts and, when ``hedged``, the hedging policy)."""

    config: Config
    call: AgentCall
    hedged: bool = False
    loop: str = "trio"
    executor: ParallelAgentExecutor = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        agents = {name: _EngineAgent(self.call) for name in self.config.agents}
        extra: dict[str, Any] = {} if self.hedged else {"hedging": None}
        self.executor = ParallelAgentExecutor.from_config(agents, self.config, **extra)

    @property
    def name(self) -> str:
        return "dm-engine-hedged" if self.hedged else "dm-engine"

    def serving(self) -> contextlib.AbstractAsyncContextManager[None]:
        """The executor serving its hedge timer for a batch, as ``open_engine`` does
        for the engine's life."""
        return self.executor.serving()

    async def run(self, action: Action) -> None:
        requests = action_requests(self.config, action.action_type, action.key)
        for response in await self.executor.execute_parallel(requests):
            if not response.ok:
                raise RuntimeError(
                    f"{self.name}: {response.request_id} {response.status}: {response.error}"
                )


# ------------------------------------------------------------------------ LangGraph


def _merge(left: dict[str, Any], right: dict[str, Any]) -> dict[str, Any]:
    """The reducer of the agents' outputs: parallel branches write in one superstep."""
    return {**left, **right}


class _LangGraphState(TypedDict):
    key: str
    outputs: Annotated[dict[str, Any], _merge]


@attrs.define(eq=False)
class _GraphPerActionType:
    """A peer runtime whose graph is built once per action type, on first use."""

    config: Config
    call: AgentCall
    _graphs: dict[str, Any] = attrs.field(factory=dict, init=False)

    def graph(self, action_type: str) -> Any:
        graph = self._graphs.get(action_type)
        if graph is None:
            graph = self._graphs[action_type] = self._build(dag_of(self.config, action_type))
        return graph

    def _build(self, dag: Mapping[str, tuple[str, ...]]) -> Any:
        raise NotImplementedError


@attrs.define(eq=False)
class LangGraphRuntime(_GraphPerActionType):
    """LangGraph: one compiled ``StateGraph`` per action type, ``ainvoke`` per action."""

    name: str = "langgraph"
    loop: str = PEER_LOOP

    def _build(self, dag: Mapping[str, tuple[str, ...]]) -> Any:
        from langgraph.graph import END, START, StateGraph

        builder = StateGraph(_LangGraphState)
        for name, deps in dag.items():
            builder.add_node(name, self._node(name, deps))
        has_children = {d for deps in dag.values() for d in deps}
        for name, deps in dag.items():
            if not deps:
                builder.add_edge(START, name)  # fan-out: every root in the first superstep
            elif len(deps) == 1:
                builder.add_edge(deps[0], name)
            else:
                builder.add_edge(list(deps), name)  # a join: waits for every source
            if name not in has_children:
                builder.add_edge(name, END)
        return builder.compile()

    def _node(self, name: str, deps: tuple[str, ...]) -> Callable[..., Awaitable[Any]]:
        call = self.call

        async def node(state: _LangGraphState) -> dict[str, Any]:
            _inputs = {d: state["outputs"][d] for d in deps}  # what the agent is given
            return {"outputs": {name: await call(state["key"], name, 1)}}

        return node

    async def run(self, action: Action) -> None:
        graph = self.graph(action.action_type)
        state = await graph.ainvoke({"key": action.key, "outputs": {}})
        expected = self.config.agents_for(action.action_type)
        if len(state["outputs"]) != len(expected):
            raise RuntimeError(f"langgraph: {sorted(state['outputs'])} for {expected}")


# ------------------------------------------------------------------- pydantic-graph


@dataclass
class _PydanticGraphState:
    key: str


@attrs.define(eq=False)
class PydanticGraphRuntime(_GraphPerActionType):
    """pydantic-graph's ``GraphBuilder``: one graph per action type, ``run`` per action.

    Broadcasts and a join express a forest (each agent with at most one dependency),
    which every action type of the shipped configuration is; a join there waits for
    every branch of its fork, so a node with several dependencies would need a
    barrier this builder does not emulate (``ValueError``).
    """

    name: str = "pydantic-graph"
    loop: str = PEER_LOOP

    def _build(self, dag: Mapping[str, tuple[str, ...]]) -> Any:
        from pydantic_graph import GraphBuilder, reduce_dict_update

        several = [name for name, deps in dag.items() if len(deps) > 1]
        if several:
            raise ValueError(f"pydantic-graph runner: {several} depend on several agents")
        children: dict[str, list[str]] = {name: [] for name in dag}
        for name, deps in dag.items():
            for d in deps:
                children[d].append(name)
        builder: Any = GraphBuilder(
            name="agents", state_type=_PydanticGraphState, output_type=dict[str, Any]
        )
        steps = {name: builder.step(self._step(name), node_id=name) for name in dag}
        roots = [steps[name] for name, deps in dag.items() if not deps]
        edges = [builder.edge_from(builder.start_node).to(*roots)]  # a broadcast if > 1
        edges += [
            builder.edge_from(steps[name]).to(*(steps[c] for c in kids))
            for name, kids in children.items()
            if kids
        ]
        sinks = [steps[name] for name, kids in children.items() if not kids]
        if len(roots) > 1 or any(len(kids) > 1 for kids in children.values()):
            collect = builder.join(reduce_dict_update, initial_factory=dict, node_id="collect")
            edges.append(builder.edge_from(*sinks).to(collect))
            edges.append(builder.edge_from(collect).to(builder.end_node))
        else:  # a chain: no fork, nothing to join
            edges.append(builder.edge_from(*sinks).to(builder.end_node))
        builder.add(*edges)
        return builder.build()

    def _step(self, name: str) -> Callable[..., Awaitable[Any]]:
        call = self.call

        # no annotations: GraphBuilder.add reads a step's return hint for BaseNode edges
        async def step(ctx):  # type: ignore[no-untyped-def]
            inputs = ctx.inputs or {}  # the parent's outputs (and its ancestors')
            return {**inputs, name: await call(ctx.state.key, name, 1)}

        return step

    async def run(self, action: Action) -> None:
        graph = self.graph(action.action_type)
        outputs = await graph.run(state=_PydanticGraphState(action.key))
        expected = self.config.agents_for(action.action_type)
        if len(outputs) != len(expected):
            raise RuntimeError(f"pydantic-graph: {sorted(outputs)} for {expected}")


# ------------------------------------------------------------------------ the runs


def make_runtimes(
    config: Config, calls: Mapping[str, AgentCall], engine_loop: str = "trio"
) -> dict[str, Runtime]:
    """The four runtimes, each calling its own ``calls[name]``."""
    return {
        "dm-engine": EngineRuntime(config, calls["dm-engine"], loop=engine_loop),
        "dm-engine-hedged": EngineRuntime(
            config, calls["dm-engine-hedged"], hedged=True, loop=engine_loop
        ),
        "langgraph": LangGraphRuntime(config, calls["langgraph"]),
        "pydantic-graph": PydanticGraphRuntime(config, calls["pydantic-graph"]),
    }


async def run_batch(runtime: Runtime, actions: Sequence[Action]) -> list[float]:
    """Run ``actions`` one at a time on the running loop; each one's real seconds."""
    clock = time.perf_counter
    samples: list[float] = []
    serving = getattr(runtime, "serving", None)  # dm-engine: as open_engine runs it
    async with serving() if serving is not None else contextlib.nullcontext():
        for action in actions:
            t0 = clock()
            await runtime.run(action)
            samples.append(clock() - t0)
    return samples


def on_loop(runtime: Runtime, actions: Sequence[Action]) -> list[float]:
    """``run_batch`` on a fresh event loop of the runtime's library."""
    result: list[float] = anyio.run(run_batch, runtime, actions, backend=runtime.loop)
    return result


def _chunks(n: int, rounds: int) -> list[range]:
    rounds = max(1, min(rounds, n))
    cuts = [n * r // rounds for r in range(rounds + 1)]
    return [range(cuts[r], cuts[r + 1]) for r in range(rounds)]


def _interleaved(
    runtimes: Mapping[str, Runtime],
    actions: Sequence[Action],
    rounds: int,
    progress: Callable[[str], None],
) -> dict[str, list[float]]:
    """Every runtime's per-action seconds, runtimes taking turns chunk by chunk in a
    rotating order; a full collection before each chunk, so that no runtime collects
    another's garbage."""
    samples: dict[str, list[float]] = {name: [0.0] * len(actions) for name in runtimes}
    names = list(runtimes)
    for r, chunk in enumerate(_chunks(len(actions), rounds)):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            gc.collect()
            batch = on_loop(runtimes[name], [actions[i] for i in chunk])
            for i, seconds in zip(chunk, batch, strict=True):
                samples[name][i] = seconds
        progress(f"round {r + 1}: actions {chunk.start}..{chunk.stop - 1}")
    return samples


def _summary(seconds: Sequence[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "p50_s": percentile(ordered, 50),
        "p95_s": percentile(ordered, 95),
        "p99_s": percentile(ordered, 99),
        "mean_s": sum(ordered) / len(ordered) if ordered else 0.0,
    }


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def compare(
    config: Config,
    *,
    actions: int = 300,
    time_scale: float = 0.02,
    action_types: Sequence[str] = ("combat",),
    warmup: int = 20,
    overhead_actions: int = 2000,
    rounds: int = 5,
    engine_loop: str = "trio",
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Run the comparison; the ``peers.json`` document (see the module docstring)."""
    started = time.perf_counter()
    load_before = os.getloadavg()
    measured = [Action(str(i), action_types[i % len(action_types)]) for i in range(actions)]
    warm = [Action(f"warmup-{i}", action_types[i % len(action_types)]) for i in range(warmup)]
    draws = Draws(config, time_scale)
    draws.prepare([*measured, *warm])

    # the same draws for every runtime, each with its own call counter
    works = {name: Work(draws) for name in RUNTIMES}
    runtimes = make_runtimes(config, works, engine_loop)
    for name, runtime in runtimes.items():
        if warm:
            on_loop(runtime, warm)
        works[name].calls = 0
    hedged = runtimes["dm-engine-hedged"]
    assert isinstance(hedged, EngineRuntime)
    before = hedged.executor.statistics()
    progress(f"latency: {actions} actions per runtime, time scale {time_scale:g}")
    latencies = _interleaved(runtimes, measured, rounds, progress)
    after = hedged.executor.statistics()

    # each runtime's own cost: agents that take no time
    zero = {name: Work() for name in RUNTIMES}
    bare = make_runtimes(config, zero, engine_loop)
    overhead_runs = [
        Action(f"overhead-{i}", action_types[i % len(action_types)])
        for i in range(overhead_actions)
    ]
    for runtime in bare.values():
        on_loop(runtime, overhead_runs[:200])  # warm-up
    progress(f"overhead: {overhead_actions} zero-latency actions per runtime")
    overhead = _interleaved(bare, overhead_runs, rounds, progress)

    bounds = [draws.bounds(a) for a in measured]
    document: dict[str, Any] = {"runtimes": {}}
    for name, runtime in runtimes.items():
        us = sorted(s * 1e6 for s in overhead[name])
        entry: dict[str, Any] = {
            "loop": runtime.loop,
            **_summary(latencies[name]),
            "actions": actions,
            "agent_calls": works[name].calls,
            "overhead_us_mean": sum(us) / len(us) if us else 0.0,
            "overhead_us_p95": percentile(us, 95),
        }
        if name == "dm-engine-hedged":
            entry["hedges_sent"] = after.hedges_sent - before.hedges_sent
            entry["hedges_won"] = after.hedges_won - before.hedges_won
        document["runtimes"][name] = entry
    base = document["runtimes"]["dm-engine"]
    document["ratios_vs_dm_engine"] = {
        name: {
            key: (entry[key] / base[key] if base[key] else None)
            for key in ("p50_s", "p95_s", "p99_s", "overhead_us_mean", "overhead_us_p95")
        }
        for name, entry in document["runtimes"].items()
    }
    peers = [n for n in RUNTIMES if not n.startswith("dm-engine")]
    document["at_or_below_every_peer"] = {
        name: all(
            document["runtimes"][name][p] <= document["runtimes"][peer][p]
            for peer in peers
            for p in ("p50_s", "p95_s", "p99_s")
        )
        for name in ("dm-engine", "dm-engine-hedged")
    }
    document["bounds"] = {
        "critical_path": _summary([b[0] for b in bounds]),
        "level_barrier": _summary([b[1] for b in bounds]),
    }
    document["settings"] = {
        "actions": actions,
        "action_types": list(action_types),
        "time_scale": time_scale,
        "warmup": warmup,
        "overhead_actions": overhead_actions,
        "rounds": rounds,
        "scenario": config.simulation.scenario,
        "seed": config.simulation.seed,
        "max_concurrent_agents": config.performance.parallelization.max_concurrent_agents,
        "hedging": {
            "enabled": config.performance.hedging.enabled,
            "budget_fraction": config.performance.hedging.budget_fraction,
            "min_samples": config.performance.hedging.min_samples,
            "hedge_after": {n: a.hedge_after for n, a in config.agents.items()},
        },
    }
    document["environment"] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "wall_seconds": time.perf_counter() - started,
        "versions": {
            p: _version(p)
            for p in (
                "dm-engine",
                "langgraph",
                "langchain-core",
                "pydantic-graph",
                "trio",
                "anyio",
            )
        },
    }
    return document


def _table(document: dict[str, Any]) -> Table:
    settings = document["settings"]
    table = Table(
        title=(
            f"{settings['actions']} actions ({', '.join(settings['action_types'])}), "
            f"{settings['scenario']} draws x {settings['time_scale']:g}, real time; "
            f"overhead: {settings['overhead_actions']} zero-latency actions"
        )
    )
    table.add_column("runtime")
    table.add_column("loop")
    for column in ("p50", "p95", "p99", "x dm-engine p50/p95/p99", "overhead mean / p95"):
        table.add_column(column, justify="right")
    table.add_column("x dm-engine", justify="right")
    table.add_column("calls", justify="right")
    ratios = document["ratios_vs_dm_engine"]
    for name, e in document["runtimes"].items():
        r = ratios[name]
        table.add_row(
            f"[bold]{name}[/bold]" if name.startswith("dm-engine") else name,
            e["loop"],
            *(f"{e[p] * 1e3:.1f} ms" for p in ("p50_s", "p95_s", "p99_s")),
            " / ".join(f"{r[p]:.2f}" for p in ("p50_s", "p95_s", "p99_s")),
            f"{e['overhead_us_mean']:.0f} / {e['overhead_us_p95']:.0f} µs",
            f"{r['overhead_us_mean']:.2f}",
            str(e["agent_calls"]),
        )
    for name, b in document["bounds"].items():
        table.add_row(
            f"[dim]{name.replace('_', ' ')} bound[/dim]",
            "",
            *(f"[dim]{b[p] * 1e3:.1f} ms[/dim]" for p in ("p50_s", "p95_s", "p99_s")),
            *([""] * 4),
        )
    return table


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out", help="where peers.json goes (default: out)")
    parser.add_argument("--actions", type=int, default=300, help="measured actions (300)")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.02,
        help="multiplies every drawn latency (0.02: a run takes about a minute)",
    )
    parser.add_argument(
        "--action-types",
        default="combat",
        help="comma-separated action types, cycled over the actions (combat)",
    )
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured actions first (20)")
    parser.add_argument(
        "--overhead-actions", type=int, default=2000, help="zero-latency actions (2000)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="turns the runtimes take (5)")
    parser.add_argument("--engine-loop", choices=("trio", "asyncio"), default="trio")
    parser.add_argument("--scenario", default=None, help="latency scenario (config's: targets)")
    parser.add_argument("--seed", type=int, default=None, help="seed (config's)")
    args = parser.parse_args(argv)
    config = with_overrides(Config(), args.scenario, args.seed)
    types = tuple(t.strip() for t in args.action_types.split(",") if t.strip())
    unknown = [t for t in types if t not in config.actions]
    if not types or unknown:
        parser.error(f"--action-types: unknown {unknown}; known: {sorted(config.actions)}")
    if args.actions < 1 or args.overhead_actions < 1 or args.time_scale < 0:
        parser.error("--actions and --overhead-actions must be >= 1, --time-scale >= 0")
    console = Console(width=max(Console().width, 132))  # the table, unwrapped in a log
    document = compare(
        config,
        actions=args.actions,
        time_scale=args.time_scale,
        action_types=types,
        warmup=max(0, args.warmup),
        overhead_actions=args.overhead_actions,
        rounds=args.rounds,
        engine_loop=args.engine_loop,
        progress=lambda line: console.print(f"  {line}"),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "peers.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    console.print(_table(document))
    env = document["environment"]
    console.print(
        "versions: "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + f"; load average before/after {env['load_average_before'][0]:.2f} / "
        f"{env['load_average_after'][0]:.2f}; {env['wall_seconds']:.0f} s"
    )
    console.print(
        f"at or below every peer at every percentile: {document['at_or_below_every_peer']}"
    )
    console.print(f"wrote {path}")
    return document


if __name__ == "__main__":
    main()
