"""Every diagnostic code of the spec language has a case here that triggers it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from kneo_compiler.bundles import sign_bundle, verify_bundle
from kneo_compiler.compile import runnable_diagnostics
from kneo_compiler.diagnostics import CODES
from kneo_compiler.policy import EnvironmentPolicyEnforcement
from kneo_compiler.project import parse_project_config
from kneo_compiler.spec import SpecProblem, check, compile_spec

BASE: dict[str, Any] = {
    "version": "v1",
    "name": "t",
    "agent": {"name": "a", "model": {"provider": "dummy"}},
    "workflow": {"name": "w", "kind": "sequential", "steps": [{"id": "one"}, {"id": "two"}]},
}


def spec(mutate: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    s = copy.deepcopy(BASE)
    mutate(s)
    return s


def graph(nodes: list[str], edges: list[dict[str, Any]], start: str | None = "n1", **extra: Any) -> dict[str, Any]:
    wf: dict[str, Any] = {"name": "g", "kind": "graph", "nodes": [{"id": n} for n in nodes], "edges": edges, **extra}
    if start:
        wf["start"] = start
    return {**copy.deepcopy(BASE), "workflow": wf}


def tool(**perms: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(s: dict[str, Any]) -> None:
        s["agent"]["tools"] = [{"id": "t", "function": "pkg.mod:fn", "permissions": perms}]

    return mutate


ALL = EnvironmentPolicyEnforcement(
    require_tool_permissions=True, deny_unrestricted_tools=True, require_human_review=True, require_guardrails=True
)
# code → (spec as text or mapping, environment, policy)
CASES: dict[str, tuple[Any, str | None, EnvironmentPolicyEnforcement | None]] = {
    "E_SPEC_ENCODING": (b"version: v1\n\xff\xfe", None, None),
    "E_SPEC_BINARY": ("version: v1\nname: \x00\x01", None, None),
    "E_SPEC_TOO_LARGE": ("name: " + "x" * 300_000, None, None),
    "E_SPEC_TOO_DEEP": ("a: " + "[" * 200 + "]" * 200, None, None),
    "E_YAML_PARSE": ("version: v1\nagent: {name: [\n", None, None),
    "E_YAML_DUPLICATE_KEY": ("version: v1\nname: a\nname: b\nagent: {name: a}\n", None, None),
    "E_SPEC_SHAPE": ("- just\n- a list\n", None, None),
    "E_SPEC_VERSION_UNSUPPORTED": (spec(lambda s: s.update(version="v9")), None, None),
    "W_SPEC_MIGRATION_NEEDED": (spec(lambda s: s.pop("version")), None, None),
    "W_DEPRECATED_FIELD": (spec(lambda s: s["agent"].update(system_prompt="hi")), None, None),
    "E_SCHEMA": (spec(lambda s: s["workflow"]["steps"][0].update(max_retries="many")), None, None),
    "E_UNKNOWN_FIELD": (spec(lambda s: s["workflow"]["steps"][0].update(on_eror="retry")), None, None),
    "E_INLINE_SECRET": (spec(lambda s: s["agent"]["model"].update(params={"api_key": "sk-123"})), None, None),
    "E_PROVIDER_UNAVAILABLE": (spec(lambda s: s["agent"]["model"].update(provider="nope")), None, None),
    "I_DEFAULT_WORKFLOW": (spec(lambda s: s.pop("workflow")), None, None),
    "I_ENVIRONMENT_NO_OVERLAY": (BASE, "qa", None),
    "E_DUPLICATE_ID": (spec(lambda s: s["workflow"]["steps"].append({"id": "one"})), None, None),
    "E_NO_STEPS": (spec(lambda s: s["workflow"].update(steps=[])), None, None),
    "E_UNKNOWN_TOOL": (spec(lambda s: s["agent"].update(tools=["web_search"])), None, None),
    "E_UNKNOWN_COMPONENT": (spec(lambda s: s["workflow"]["steps"][0].update(ref="ghost")), None, None),
    "E_STEP_FIELD_MISSING": (spec(lambda s: s["workflow"]["steps"][0].update(kind="function")), None, None),
    "E_INVALID_IMPORT_PATH": (
        spec(lambda s: s["workflow"]["steps"][0].update(kind="function", function="not a path")),
        None,
        None,
    ),
    "W_PROMPT_UNKNOWN_REF": (spec(lambda s: s["workflow"]["steps"][0].update(prompt="{steps.two}")), None, None),
    "E_SELECTOR_UNKNOWN_PARTICIPANT": (
        spec(
            lambda s: s.update(
                workflow={
                    "name": "h",
                    "type": "handoff",
                    "participants": [{"id": "x"}, {"id": "y"}],
                    "selector": {"type": "sequence", "sequence": ["x", "z"]},
                }
            )
        ),
        None,
        None,
    ),
    "E_GROUP_CHAT_ROUNDS": (
        spec(
            lambda s: s.update(workflow={"name": "g", "kind": "group_chat", "rounds": 0, "participants": [{"id": "x"}]})
        ),
        None,
        None,
    ),
    "E_GRAPH_START_MISSING": (graph(["n1"], [], start=None), None, None),
    "E_GRAPH_START_UNKNOWN": (graph(["n1"], [], start="nx"), None, None),
    "E_GRAPH_EDGE_UNKNOWN_NODE": (graph(["n1"], [{"from": "n1", "to": "n9"}]), None, None),
    "E_GRAPH_UNREACHABLE_NODE": (graph(["n1", "n2"], []), None, None),
    "E_GRAPH_LOOP_NO_EXIT": (
        graph(["n1", "n2"], [{"from": "n1", "to": "n2"}, {"from": "n2", "to": "n1"}], max_iterations=5),
        None,
        None,
    ),
    "E_GRAPH_LOOP_UNBOUNDED": (
        graph(
            ["n1", "n2", "n3"],
            [
                {"from": "n1", "to": "n2"},
                {"from": "n2", "to": "n1", "when": {"contains": "again"}},
                {"from": "n2", "to": "n3"},
            ],
        ),
        None,
        None,
    ),
    "E_UNSAFE_TOOL_IMPORT": (
        spec(lambda s: s["agent"].update(tools=[{"id": "sh", "function": "subprocess:run"}])),
        None,
        None,
    ),
    "E_UNSAFE_FUNCTION_IMPORT": (
        spec(lambda s: s["workflow"]["steps"][0].update(kind="function", function="os:system")),
        None,
        None,
    ),
    "W_TOOL_POLICY_UNRESTRICTED": (
        spec(lambda s: s["agent"].update(tools=[{"id": "t", "function": "pkg.mod:fn"}])),
        None,
        None,
    ),
    "W_NETWORK_UNRESTRICTED": (spec(tool(network=True)), None, None),
    "W_SHELL_TOOL": (spec(tool(shell=True)), None, None),
    "W_FILESYSTEM_WRITE": (spec(tool(filesystem={"write": ["/tmp/out"]})), None, None),
    "W_HUMAN_APPROVAL_MISSING": (spec(tool(shell=True)), None, None),
    "E_POLICY_BLOCKED_CODE": (
        spec(tool(shell=True)),
        "prod",
        EnvironmentPolicyEnforcement(blocked_diagnostic_codes=["W_SHELL_TOOL"]),
    ),
    "E_POLICY_WARNINGS": (spec(tool(shell=True)), "prod", EnvironmentPolicyEnforcement(fail_on_warnings=True)),
    "E_POLICY_TOOL_PERMISSIONS": (
        spec(lambda s: s["agent"].update(tools=[{"id": "t", "function": "p.m:f"}])),
        "prod",
        ALL,
    ),
    "E_POLICY_UNRESTRICTED_TOOL": (spec(tool(network={})), "prod", ALL),
    "E_POLICY_HUMAN_REVIEW": (spec(tool(filesystem={"write": ["/x"]})), "prod", ALL),
    "E_POLICY_GUARDRAILS": (BASE, "prod", ALL),
}


@pytest.mark.parametrize("code", sorted(CASES))
def test_code_is_triggered(code: str) -> None:
    raw, env, policy = CASES[code]
    result = check(raw, env, policy=policy)
    found = [d for d in result.diagnostics if d.code == code]
    assert found, [d.code for d in result.diagnostics]
    assert found[0].severity == CODES[code][0]
    assert found[0].message


def test_runnable_codes() -> None:
    # every step kind of the language runs; a plan from elsewhere (a bundle, a newer compiler) may carry others
    assert runnable_diagnostics(compile_spec(spec(lambda s: None), runnable=False)) == []
    foreign = {"workflow": {"kind": "sequential"}, "steps": [{"index": 0, "id": "x", "kind": "robot"}]}
    found = runnable_diagnostics(foreign)
    assert [d.code for d in found] == ["E_STEP_KIND_UNSUPPORTED"]
    assert "runner does not execute" in found[0].message


def test_project_config_code() -> None:
    with pytest.raises(SpecProblem) as exc:
        parse_project_config("environments: {prod: {policy_enforcement: {enabled: maybe}}}")
    assert exc.value.diagnostics[0].code == "E_PROJECT_CONFIG"


def test_bundle_codes() -> None:
    signed = sign_bundle(
        BASE, key="k", approved_by="me", environment="prod", approved_at="2026-01-01T00:00:00Z", plan_hash=None
    )
    assert verify_bundle(signed, "k") == []
    assert [d.code for d in verify_bundle({"x": 1}, "k")] == ["E_BUNDLE_MALFORMED"]
    assert [d.code for d in verify_bundle(signed, None)] == ["E_BUNDLE_KEY_MISSING"]
    edited = {**signed, "spec": {**signed["spec"], "name": "evil"}}
    assert [d.code for d in verify_bundle(edited, "k")] == ["E_BUNDLE_DIGEST_MISMATCH", "E_BUNDLE_SIGNATURE_INVALID"]


def test_every_code_has_a_case() -> None:
    covered = set(CASES) | {
        "E_STEP_KIND_UNSUPPORTED",
        "E_PROJECT_CONFIG",
        "E_BUNDLE_MALFORMED",
        "E_BUNDLE_KEY_MISSING",
        "E_BUNDLE_DIGEST_MISMATCH",
        "E_BUNDLE_SIGNATURE_INVALID",
    }
    assert set(CODES) == covered


def test_diagnostics_carry_yaml_line_and_column() -> None:
    text = "version: v1\nagent:\n  name: a\n  tools:\n    - web_search\n"
    (d,) = [d for d in check(text).diagnostics if d.code == "E_UNKNOWN_TOOL"]
    assert (d.path, d.line, d.column) == ("agent.tools[0]", 5, 7)
    assert d.message == "Tool 'web_search' is not registered."


def test_unknown_field_suggests_the_right_name() -> None:
    (d,) = check(spec(lambda s: s["workflow"]["steps"][0].update(on_eror="retry"))).diagnostics
    assert d.path == "workflow.steps[0].on_eror" and "on_error" in (d.suggestion or "")


def test_alias_bombs_are_refused_quickly() -> None:
    bomb = "a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\n"
    assert [d.code for d in check(bomb).diagnostics] == ["E_YAML_PARSE"]


def test_env_var_secret_references_are_fine() -> None:
    raw = spec(lambda s: s["agent"]["model"].update(params={"api_key": "${env:OPENAI_API_KEY}", "max_tokens": 5}))
    assert check(raw).valid
