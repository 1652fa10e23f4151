"""Spec operations: examples, compile, migrate, overlays + project config + policy, reports, explain, bundles, schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from kneo_compiler.bundles import sign_bundle, verify_bundle
from kneo_compiler.project import discover_project, find_project_config, parse_project_config, select_environment
from kneo_compiler.spec import (
    check,
    compile_spec,
    dump_yaml,
    explain_spec,
    lint,
    migrate,
    parse_yaml,
    policy_report_for,
    render_spec,
    runnable_diagnostics,
    spec_json_schema,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROJECT = parse_project_config((EXAMPLES / "project_config.yaml").read_text())
SPECS = sorted(p.name for p in EXAMPLES.glob("*.yaml") if p.name != "project_config.yaml")
# what lint shows for each example in dev (pinned: a change here is a change users see)
EXPECTED_LINT = {
    "concurrent_review_workflow.yaml": [],
    "graph_review_workflow.yaml": [],
    "group_chat_workflow.yaml": [],
    "human_approval_workflow.yaml": [],
    "legacy_agent.yaml": ["W_SPEC_MIGRATION_NEEDED"],
    "mcp_tools_workflow.yaml": [],
    "research_agent.yaml": [],
    "smoke_human_workflow.yaml": [],
}


def read(name: str) -> str:
    return (EXAMPLES / name).read_text()


@pytest.mark.parametrize("name", SPECS)
def test_every_example_validates_in_dev_and_lints_as_pinned(name: str) -> None:
    result = check(read(name), "dev", project=PROJECT)
    assert result.valid, result.diagnostics
    assert [d["code"] for d in lint(read(name), "dev", project=PROJECT)["diagnostics"]] == EXPECTED_LINT[name]
    compile_spec(read(name), "dev", project=PROJECT, runnable=False)


def test_research_agent_validates_and_runs_in_prod_under_the_example_prod_policy() -> None:
    assert PROJECT.policy_for("prod") is not None and PROJECT.policy_for("prod").require_guardrails  # type: ignore[union-attr]
    result = check(read("research_agent.yaml"), "prod", project=PROJECT)
    assert result.valid and not [d for d in result.diagnostics if d.severity != "info"], result.diagnostics
    plan = compile_spec(parse_yaml(read("research_agent.yaml")), "prod", project=PROJECT)
    assert [s["id"] for s in plan["steps"]] == ["retrieve", "analyze", "summarize"]
    assert plan["agent"]["guardrails"]["output"][0]["id"] == "cite_sources"
    assert runnable_diagnostics(plan) == []


def test_the_runner_contract_of_a_sequential_plan() -> None:
    plan = compile_spec(parse_yaml(read("research_agent.yaml")), "prod")
    assert {"steps", "agent", "workflow", "spec_name", "hash"} <= set(plan)
    assert set(plan["agent"]) >= {"name", "instructions", "model"}
    assert set(plan["agent"]["model"]) == {"provider", "name", "params"}
    assert plan["workflow"] == {"name": "research-pipeline", "kind": "sequential"}
    for step in plan["steps"]:
        assert {"id", "kind", "prompt", "on_error", "max_retries", "timeout_seconds"} <= set(step)
    assert plan["steps"][1]["prompt"] == "Analyze these findings: {steps.retrieve}"


def test_compile_is_deterministic_and_content_hashed() -> None:
    a = compile_spec(read("research_agent.yaml"), "prod")
    b = compile_spec(parse_yaml(read("research_agent.yaml")), "prod")
    assert a == b
    assert compile_spec(read("research_agent.yaml"), "dev")["hash"] != a["hash"]


def test_every_workflow_kind_is_runnable() -> None:
    for name in ("graph_review_workflow.yaml", "concurrent_review_workflow.yaml", "group_chat_workflow.yaml"):
        assert runnable_diagnostics(compile_spec(read(name), runnable=False)) == []


def test_human_step_plan_carries_its_timeout_and_escalation() -> None:
    plan = compile_spec(read("human_approval_workflow.yaml"), runnable=False)
    approval = plan["steps"][1]
    assert (approval["kind"], approval["timeout_seconds"], approval["on_timeout"]) == ("human", 86400, "escalate")
    assert plan["steps"][0]["function"] == "examples.human_functions:draft_report"
    assert runnable_diagnostics(plan) == []


def test_migrate_round_trips_the_legacy_spec() -> None:
    first = migrate(parse_yaml(read("legacy_agent.yaml")))
    assert first.changed and first.from_version == "unversioned"
    text = dump_yaml(first.spec)
    again = migrate(parse_yaml(text))
    assert not again.changed and again.spec == first.spec
    assert check(text).valid and [d.code for d in check(text).diagnostics] == []
    step = first.spec["workflow"]["steps"][0]
    assert step == {
        "id": "retrieve",
        "prompt": "Find sources about: {input}",
        "max_retries": 2,
        "on_error": "retry",
        "timeout_seconds": 30,
    }


def test_migrate_refuses_a_future_version() -> None:
    result = migrate({"version": "v2", "agent": {"name": "a"}})
    assert [d.code for d in result.diagnostics] == ["E_SPEC_VERSION_UNSUPPORTED"]


def test_project_config_discovery_and_environment_selection(tmp_path: Path) -> None:
    (tmp_path / ".kneo").mkdir()
    (tmp_path / ".kneo" / "config.yaml").write_text(read("project_config.yaml"))
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert find_project_config(deep, {}) == (tmp_path / ".kneo" / "config.yaml").resolve()
    assert find_project_config(deep, {"KNEO_PROJECT_CONFIG": "/x/y.yaml"}) == Path("/x/y.yaml")
    project = discover_project(deep, {})
    assert project is not None and project.name == "research-agent-demo"
    assert select_environment(None, {}, project) == "dev"
    assert select_environment(None, {"KNEO_ENV": "staging"}, project) == "staging"
    assert select_environment("prod", {"KNEO_ENV": "staging"}, project) == "prod"
    assert discover_project(Path("/"), {}) is None or True  # no config above / in a clean machine


def test_policy_enforcement_runs_after_project_overlays_and_defaults() -> None:
    project = parse_project_config(
        """
defaults:
  model: {provider: dummy, name: from-defaults}
  runtime: {timeout_seconds: 9}
environments:
  prod:
    overlay:
      agent:
        tools: [{id: sh, function: pkg.tools:run, permissions: {shell: true}}]
    policy_enforcement: {deny_unrestricted_tools: true, require_human_review: true}
  dev:
    policy_enforcement: {enabled: false}
"""
    )
    spec = "version: v1\nagent: {name: a}\nworkflow: {name: w, steps: [{id: one}]}\n"
    prod = check(spec, "prod", project=project)
    assert {"E_POLICY_UNRESTRICTED_TOOL", "E_POLICY_HUMAN_REVIEW"} <= {d.code for d in prod.diagnostics}
    dev = check(spec, "dev", project=project)
    assert dev.valid
    plan = compile_spec(spec, "dev", project=project)
    assert plan["agent"]["model"]["name"] == "from-defaults" and plan["steps"][0]["timeout_seconds"] == 9


def test_policy_report_covers_the_governance_surfaces() -> None:
    body = policy_report_for(read("research_agent.yaml"), "prod", project=PROJECT)
    report = body["report"]
    assert body["valid"] is True
    assert report["agent_name"] == "research-copilot" and report["workflow_name"] == "research-pipeline"
    assert report["memory"]["agent"]["compress_history"] == "examples.app_functions:compress_history"
    assert [t["network"] for t in report["tools"]] == ["restricted", "restricted"]
    assert report["guardrails"]["agent"] == {"input": ["topic_allowed"], "output": ["cite_sources"]}
    assert report["policy"]["require_guardrails"] is True
    human = policy_report_for(read("human_approval_workflow.yaml"))["report"]["human_review"]
    assert human["reviewers"] == ["release-manager"] and human["steps"][0]["on_timeout"] == "escalate"


def test_policy_report_of_an_invalid_spec_still_has_diagnostics() -> None:
    body = policy_report_for("a: [1")
    assert body["valid"] is False and body["report"]["diagnostics"][0]["code"] == "E_YAML_PARSE"


def test_explain_and_render() -> None:
    text = explain_spec(read("group_chat_workflow.yaml"))
    assert "2 round(s)" in text and "proponent" in text
    rendered = parse_yaml(render_spec(read("research_agent.yaml"), "prod"))
    assert "environments" not in rendered and rendered["agent"]["model"]["params"]["latency_ms"] == 0


def test_bundles_fail_on_any_edit_or_another_key() -> None:
    raw = parse_yaml(read("research_agent.yaml"))
    bundle = sign_bundle(
        raw, key="k1", approved_by="release-manager", environment="prod", approved_at="t", plan_hash="h"
    )
    assert verify_bundle(bundle, "k1") == []
    assert [d.code for d in verify_bundle(bundle, "k2")] == ["E_BUNDLE_SIGNATURE_INVALID"]
    for field, value in (("approved_by", "mallory"), ("environment", "dev"), ("plan_hash", "x")):
        assert [d.code for d in verify_bundle({**bundle, field: value}, "k1")] == ["E_BUNDLE_SIGNATURE_INVALID"]
    tampered = {**bundle, "spec": {**raw, "name": "other"}}
    assert "E_BUNDLE_DIGEST_MISMATCH" in [d.code for d in verify_bundle(tampered, "k1")]


def test_json_schema_export_names_the_fields() -> None:
    schema = spec_json_schema()
    assert schema["title"] == "Kneo spec v1" and "workflow" in schema["properties"]
    assert "from" in schema["$defs"]["Edge"]["properties"]
