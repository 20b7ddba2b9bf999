"""The dependency graph of one execution: validation and topological levels."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import attrs

from ..agents.base import AgentRequest
from ..errors import DependencyError

__all__ = ["RequestGraph", "analyze_dependencies", "find_cycle"]


@attrs.frozen
class RequestGraph:
    """A validated request DAG, indexed by position in the caller's list.

    ``parents[i]`` are the positions ``i`` depends on, in ascending order (so an
    agent's ``inputs`` come in the order of the requests); ``children[i]`` the positions
    that depend on ``i``; ``levels`` are Kahn's topological levels (a request's level
    is one more than its deepest dependency's).
    """

    requests: tuple[AgentRequest, ...]
    parents: tuple[tuple[int, ...], ...]
    children: tuple[tuple[int, ...], ...]
    levels: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, requests: Sequence[AgentRequest]) -> RequestGraph:
        """Validate ``requests`` in O(nodes + edges).

        The structure depends only on the ids and dependencies, so it is memoized
        by them: an engine runs the same few DAG shapes over and over.

        Raises:
            DependencyError: a duplicate id, a dependency on an unknown id, or a
                cycle; the message names the offending ids.
        """
        shape = _shape(tuple((r.id, r.depends_on) for r in requests))
        return cls(tuple(requests), *shape)


_Shape = tuple[
    tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]
]


@functools.lru_cache(maxsize=256)
def _shape(nodes: tuple[tuple[str, tuple[str, ...]], ...]) -> _Shape:
    """(parents, children, levels) of the graph of (id, depends_on) pairs."""
    index: dict[str, int] = {}
    duplicates: list[str] = []
    for i, (rid, _) in enumerate(nodes):
        if rid in index:
            duplicates.append(rid)
        index[rid] = i
    if duplicates:
        raise DependencyError(f"duplicate request ids: {sorted(set(duplicates))}", duplicates)

    parents: list[tuple[int, ...]] = []
    children: list[list[int]] = [[] for _ in nodes]
    unknown: list[str] = []
    for i, (rid, depends_on) in enumerate(nodes):
        deps: list[int] = []
        for dep in dict.fromkeys(depends_on):  # ignore repeated names
            j = index.get(dep)
            if j is None:
                unknown.append(f"{rid} -> {dep}")
                continue
            deps.append(j)
            children[j].append(i)
        parents.append(tuple(sorted(deps)))  # in request order, whatever depends_on says
    if unknown:
        raise DependencyError(f"unknown dependencies: {', '.join(unknown)}", unknown)

    # Kahn's algorithm, one level at a time.
    remaining = [len(p) for p in parents]
    level = [i for i, n in enumerate(remaining) if n == 0]
    levels: list[tuple[int, ...]] = []
    seen = 0
    while level:
        levels.append(tuple(level))
        seen += len(level)
        nxt: list[int] = []
        for i in level:
            for child in children[i]:
                remaining[child] -= 1
                if remaining[child] == 0:
                    nxt.append(child)
        level = sorted(nxt)
    if seen != len(nodes):
        cycle = find_cycle({nodes[i][0]: nodes[i][1] for i, n in enumerate(remaining) if n})
        raise DependencyError(f"dependency cycle: {' -> '.join(cycle)}", cycle[:-1])
    return tuple(parents), tuple(tuple(c) for c in children), tuple(levels)


def analyze_dependencies(requests: Sequence[AgentRequest]) -> list[list[AgentRequest]]:
    """Topological levels of ``requests``: each request is one level below its deepest dependency.

    Raises:
        DependencyError: see :meth:`RequestGraph.build`.
    """
    graph = RequestGraph.build(requests)
    return [[graph.requests[i] for i in level] for level in graph.levels]


def find_cycle(graph: Mapping[str, tuple[str, ...]]) -> list[str]:
    """A dependency cycle as a path (first == last), or [] when the graph is acyclic."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in graph:
        if node not in state and (found := visit(node)):
            return found
    return []
