from __future__ import annotations

import pytest

import engine
from engine.agents.base import AgentRequest
from engine.scheduling.dag import analyze_dependencies


def req(rid: str, *deps: str) -> AgentRequest:
    return AgentRequest(id=rid, agent="a", depends_on=deps)


def ids(levels: list[list[AgentRequest]]) -> list[list[str]]:
    return [sorted(r.id for r in level) for level in levels]


def test_levels_follow_graph_depth_not_list_order() -> None:
    # the previous design used list indices: narrator (listed first) ran first
    requests = [
        req("narrator", "arbiter"),
        req("arbiter", "archivist", "keeper"),
        req("archivist"),
        req("keeper"),
    ]
    assert ids(analyze_dependencies(requests)) == [
        ["archivist", "keeper"],
        ["arbiter"],
        ["narrator"],
    ]


def test_level_is_one_below_deepest_dependency() -> None:
    requests = [req("a"), req("b", "a"), req("c", "b"), req("d", "a", "c")]
    assert ids(analyze_dependencies(requests)) == [["a"], ["b"], ["c"], ["d"]]


def test_equal_requests_with_different_ids_are_independent() -> None:
    twins = [AgentRequest(id=f"r{i}", agent="a", context={"x": 1}) for i in range(3)]
    assert ids(analyze_dependencies(twins)) == [["r0", "r1", "r2"]]


def test_empty_graph() -> None:
    assert analyze_dependencies([]) == []


def test_cycle_is_named() -> None:
    with pytest.raises(engine.DependencyError) as info:
        analyze_dependencies([req("a", "c"), req("b", "a"), req("c", "b"), req("d", "a")])
    assert set(info.value.ids) == {"a", "b", "c"}
    assert "->" in str(info.value)


def test_self_dependency_is_a_cycle() -> None:
    with pytest.raises(engine.DependencyError, match="cycle"):
        analyze_dependencies([req("a", "a")])


def test_unknown_dependency_is_named() -> None:
    with pytest.raises(engine.DependencyError, match="b -> ghost"):
        analyze_dependencies([req("a"), req("b", "ghost")])


def test_duplicate_id_is_named() -> None:
    with pytest.raises(engine.DependencyError, match="'a'"):
        analyze_dependencies([req("a"), req("a")])


def test_long_chain_is_levelled() -> None:
    # the previous design located requests with list.index (quadratic on long chains)
    chain = [req("n0")] + [req(f"n{i}", f"n{i - 1}") for i in range(1, 20_000)]
    assert len(analyze_dependencies(chain)) == 20_000


def test_parents_are_in_request_order_whatever_depends_on_says() -> None:
    # an agent's inputs follow the request list, so prompts built from them line up
    # with the previous agent's prompt in a server's prefix cache
    from engine.scheduling.dag import RequestGraph

    requests = [req("opening"), req("arbiter", "opening"), req("keeper", "arbiter", "opening")]
    graph = RequestGraph.build(requests)
    assert graph.parents == ((), (0,), (0, 1))
