"""`kneo jobs …`, `kneo webhooks …` and `kneo workspaces …` against `kneo service serve`, their --json parsed; and the
SDK's Jobs calls underneath (the cursor stream resumed with Last-Event-ID)."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from kneo_client import ServiceClient
from tests.e2e.test_cli import cli_env, kneo, served  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow
Served = tuple[str, subprocess.Popen[str], dict[str, str]]


def _json(env: dict[str, str], *args: str, code: int = 0) -> Any:
    res = kneo(env, *args, "--json")
    assert res.returncode == code, f"{args}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return json.loads(res.stdout)


def _lines(env: dict[str, str], *args: str, code: int = 0) -> list[dict[str, Any]]:
    res = kneo(env, *args, "--json")
    assert res.returncode == code, f"{args}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def test_jobs_from_the_command_line(served: Served, tmp_path: Path) -> None:  # noqa: F811
    url, _, env = served
    at = ("--service-url", url)

    # a workspace from a folder (packed by the CLI), then a job that mounts it, followed to its end
    folder = tmp_path / "starter"
    (folder / "src").mkdir(parents=True)
    (folder / "README.md").write_text("# starter\n")
    (folder / "src" / "app.py").write_text("print('hi')\n")
    ws = _json(env, "workspaces", "upload", str(folder), "--name", "starter", *at)
    assert ws["name"] == "starter" and ws["path"] == "/workspaces/starter" and ws["files"] == 2
    names = [w["name"] for w in _json(env, "workspaces", "list", *at)["data"]]
    assert names == ["starter"]
    taken = kneo(env, "workspaces", "upload", str(folder), "--name", "starter", *at)
    assert taken.returncode == 1 and len(taken.stderr.strip().splitlines()) == 1 and "409" in taken.stderr

    followed = _lines(
        env, "jobs", "create", "--type", "cursor_task", "--prompt", "Write a fibonacci script",
        "--workspace", "starter", "--follow", *at,
    )  # fmt: skip
    items, last = followed[:-1], followed[-1]
    assert items[-1]["type"] == "completed" and items[-1]["status"] == "completed"
    assert {"tool_use", "file_created", "agent_message"} <= {i["type"] for i in items}
    job = last["job"]
    assert job["status"] == "completed" and job["job_type"] == "cursor_task"
    job_id = job["job_id"]
    stages = [e["stage"] for e in job["events"]]
    assert "workspace_mounted" in stages and stages[-1] == "completed"

    # the reading commands
    assert _json(env, "jobs", "get", job_id, *at)["job_id"] == job_id
    events = _json(env, "jobs", "events", job_id, *at)["events"]
    assert [e["stage"] for e in events] == stages
    text = kneo(env, "jobs", "events", job_id, *at)
    assert text.returncode == 0 and "sandbox_created" in text.stdout and "\x1b[" not in text.stdout
    artifacts = _json(env, "jobs", "artifacts", job_id, *at)
    assert "result.json" in artifacts and artifacts["README.md"] == "# starter\n"
    out = tmp_path / "out"
    wrote = _json(env, "jobs", "artifacts", job_id, "--out", str(out), *at)
    assert "result.json" in wrote["written"] and (out / "src" / "app.py").read_text() == "print('hi')\n"
    assert json.loads((out / "result.json").read_text()) == artifacts["result.json"]
    cursor = _json(env, "jobs", "cursor", job_id, *at)["events"]
    assert [c["type"] for c in cursor] == [i["type"] for i in items]
    assert _lines(env, "jobs", "cursor", job_id, "--follow", *at) == items  # a finished job: the history, then end

    listed = _json(env, "jobs", "list", "--status", "completed", "--type", "cursor_task", "--limit", "5", *at)
    assert [j["job_id"] for j in listed["data"]] == [job_id] and listed["pagination"]["total"] == 1
    table = kneo(env, "jobs", "list", *at)
    assert job_id in table.stdout and "completed" in table.stdout
    bad = kneo(env, "jobs", "list", "--status", "nope", *at)
    assert bad.returncode == 1 and "unknown status" in bad.stderr

    # continue (a new job in the same sandbox), then clean up both
    cont = _json(env, "jobs", "continue", job_id, "--prompt", "Now add tests", *at)
    assert cont["parent_job_id"] == job_id and cont["sandbox_id"] == job["sandbox_id"]
    ended = _lines(env, "jobs", "cursor", cont["job_id"], "--follow", *at)
    assert ended[-1]["type"] == "completed" and ended[-1]["status"] == "completed"
    cleaned = _json(env, "jobs", "cleanup", job_id, *at)
    assert cleaned["success"] is True and set(cleaned["cleaned_jobs"]) == {job_id, cont["job_id"]}
    assert _json(env, "jobs", "get", cont["job_id"], *at)["status"] == "cleaned"
    refused = kneo(env, "jobs", "continue", job_id, "--prompt", "more", *at)
    assert refused.returncode == 1 and "start a new job instead" in refused.stderr
    missing = kneo(env, "jobs", "get", "job_0000000000000000", *at)
    assert missing.returncode == 4 and len(missing.stderr.strip().splitlines()) == 1

    # a job that is not followed: its id at once, and the way to follow it
    quick = kneo(env, "jobs", "create", "--type", "gemini_task", "--prompt", "Summarize", *at)
    assert quick.returncode == 0 and "kneo jobs cursor job_" in quick.stdout


def test_webhooks_from_the_command_line(served: Served) -> None:  # noqa: F811
    url, _, env = served
    at = ("--service-url", url)
    secret = "a-webhook-secret-of-32-characters"
    made = _json(
        env, "webhooks", "add", "https://hooks.example.com/kneo", "--event", "job.completed", "--event",
        "job.failed", "--secret", secret, *at,
    )  # fmt: skip
    assert made["id"].startswith("wh_") and made["events"] == ["job.completed", "job.failed"]
    assert secret not in json.dumps(made)
    listed = _json(env, "webhooks", "list", *at)
    assert [w["id"] for w in listed["data"]] == [made["id"]] and secret not in json.dumps(listed)
    assert _json(env, "webhooks", "deliveries", made["id"], *at)["data"] == []
    no_secret = kneo(env, "webhooks", "add", "https://hooks.example.com/x", *at)
    assert no_secret.returncode == 2 and "KNEO_WEBHOOK_SECRET" in no_secret.stderr
    short = kneo(env, "webhooks", "add", "https://hooks.example.com/x", "--secret", "short", *at)
    assert short.returncode == 1 and len(short.stderr.strip().splitlines()) == 1
    gone = _json(env, "webhooks", "delete", made["id"], *at)
    assert gone["deleted"] is True
    assert _json(env, "webhooks", "list", *at)["data"] == []
    again = kneo(env, "webhooks", "delete", made["id"], *at)
    assert again.returncode == 4


def test_the_sdk_jobs_calls_and_the_resumed_cursor_stream(served: Served, tmp_path: Path) -> None:  # noqa: F811
    url, _, _ = served
    archive = tmp_path / "tiny.tar.gz"
    (tmp_path / "notes.txt").write_text("notes\n")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "notes.txt", arcname="notes.txt")
    with ServiceClient(url) as client:
        ws = client.upload_workspace(archive)
        assert ws["name"] == "tiny" and ws["files"] == 1
        assert [w["name"] for w in client.list_workspaces()["data"]] == ["tiny"]
        made = client.create_job("claude_task", "Review the code", workspace_path=ws["path"])
        items = list(client.stream_job_cursor(made["job_id"]))
        assert items[-1]["type"] == "completed" and items[-1]["status"] == "completed"
        assert client.get_job(made["job_id"])["status"] == "completed"
        assert client.job_cursor(made["job_id"])["events"] == items
        assert [e["stage"] for e in client.job_events(made["job_id"])["events"]][-1] == "completed"
        assert client.job_artifacts(made["job_id"])["notes.txt"] == "notes\n"
        assert client.list_jobs(job_type="claude_task")["pagination"]["total"] == 1

        # the ids the stream sends; resuming after the second item sends exactly the rest
        with httpx.stream("GET", f"{url}/jobs/{made['job_id']}/cursor/stream", timeout=30) as resp:
            ids = [line.removeprefix("id:").strip() for line in resp.iter_lines() if line.startswith("id:")]
        assert len(ids) == len(items) and all(ids)
        assert list(client.stream_job_cursor(made["job_id"], last_event_id=ids[1])) == items[2:]

        cont = client.continue_job(made["job_id"], "And the docs")
        assert cont["parent_job_id"] == made["job_id"]
        assert list(client.stream_job_cursor(cont["job_id"]))[-1]["type"] == "completed"
        assert client.cleanup_job(made["job_id"])["success"] is True

        hook = client.create_webhook("https://hooks.example.com/sdk", ["run.succeeded"], "s" * 20)
        assert client.list_webhooks()["data"][0]["id"] == hook["id"]
        assert client.webhook_deliveries(hook["id"])["data"] == []
        assert client.delete_webhook(hook["id"])["deleted"] is True
