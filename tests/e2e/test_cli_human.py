"""`kneo human …` and `kneo audit list` against `kneo service serve`, as the seed's quickstart runs them."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.e2e.test_cli import cli_env, kneo, served  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def test_pause_list_get_resume_then_audit(served: tuple[str, subprocess.Popen[str], dict[str, str]]) -> None:  # noqa: F811
    url, _, env = served
    started = kneo(
        env, "run", "--input", "hello", "--target", "workflow", "--json", "--service-url", url,
        "examples/human_approval_workflow.yaml",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    run = json.loads(started.stdout)
    assert run["status"] == "paused" and run["human_intervention_required"] is True
    cid = run["continuation_id"]
    rid = run["metadata"]["pending_human_request"]["request_id"]

    listed = kneo(env, "human", "list", "--json", "--service-url", url)
    assert listed.returncode == 0, listed.stderr
    assert [t["continuation_id"] for t in json.loads(listed.stdout)["tasks"]] == [cid]
    table = kneo(env, "human", "list", "--service-url", url)
    assert cid in table.stdout and "pending" in table.stdout

    got = kneo(env, "human", "get", cid, "--json", "--service-url", url)
    task = json.loads(got.stdout)
    assert task["request"]["request_id"] == rid and task["request"]["options"] == ["approve", "reject"]
    text = kneo(env, "human", "get", cid, "--service-url", url)
    assert f"request_id: {rid}" in text.stdout

    none = kneo(env, "human", "resume", cid, "--request-id", rid, "--service-url", url)
    assert none.returncode == 2 and "exactly one of" in none.stderr
    two = kneo(env, "human", "resume", cid, "--request-id", rid, "--approve", "--reject", "--service-url", url)
    assert two.returncode == 2
    bad = kneo(env, "human", "resume", cid, "--request-id", rid, "--select", "maybe", "--service-url", url)
    assert bad.returncode == 1 and "must be one of" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = kneo(env, "human", "get", "cont_nope", "--service-url", url)
    assert missing.returncode == 4

    resumed = kneo(env, "human", "resume", cid, "--request-id", rid, "--approve", "--json", "--service-url", url)
    assert resumed.returncode == 0, resumed.stderr
    final = None
    for _ in range(200):
        final = json.loads(kneo(env, "runs", "get", run["run_id"], "--json", "--service-url", url).stdout)
        if final["status"] != "paused" and final["status"] != "running":
            break
    assert final is not None and final["status"] == "succeeded", final
    assert final["visited_steps"] == ["draft", "approval", "publish"]
    again = kneo(env, "human", "resume", cid, "--request-id", rid, "--approve", "--service-url", url)
    assert again.returncode == 1 and "invalid_state" in again.stderr

    sweep = kneo(env, "human", "sweep", "--json", "--service-url", url)
    assert sweep.returncode == 0 and json.loads(sweep.stdout)["count"] == 0

    audit = None
    for _ in range(100):
        audit = json.loads(kneo(env, "audit", "list", "--run-id", run["run_id"], "--json", "--service-url", url).stdout)
        if {e["event_type"] for e in audit["events"]} >= {"run.created", "human.decision"}:
            break
    assert audit is not None and {e["event_type"] for e in audit["events"]} >= {"run.created", "human.decision"}
    decision = next(e for e in audit["events"] if e["event_type"] == "human.decision")
    assert decision["continuation_id"] == cid and decision["payload"]["decision"] == "approved"
