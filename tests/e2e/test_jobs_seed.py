"""Every curl of the Jobs-face seeds (000 "Advanced Usage", 001 "Working with Jobs", 002 "API Reference"), run with
the real ``curl`` binary against ``kneo service serve``; and a webhook receiver that is down for a while still gets
every event afterwards, signed as the seed's ``verify_signature`` checks.

The commands are in ``seed_jobs_curls.txt``, verbatim, with the seed file and lines they come from. Each runs in
``bash`` (``set -e -o pipefail``; the ``JOB_ID=$(curl … | jq …)`` lines need a shell) in one working directory, with
``curl`` a shell function that adds ``-sS -w '%{stderr}%{http_code}\\n'`` to the command's own arguments: no progress
meter, and the status code on stderr, so stdout is exactly the answer. Only these substitutions are made:

* the base URL ``https://api.knify.io`` → the served URL. The seed's shorthand ``.../jobs`` (000 "Performance
  Optimization") elides the base URL *and* the headers of its full examples; it becomes the served URL plus the
  ``Authorization`` header (every request needs it: 002 "Authentication"), nothing else — so these still send their
  body without ``Content-Type``, as ``curl -d`` does (``application/x-www-form-urlencoded``), which the Jobs routes
  read as JSON.
* ``$KNIFY_API_KEY`` and ``$JOB_ID`` are not substituted: they are shell variables, set in the environment
  (``KNIFY_API_KEY`` is an operator key configured with ``KNEO_SERV_API_KEYS``; auth is on, as the seed requires).
* ``{job_id}`` (001) and ``job_abc123`` (002) → the id of a job the earlier commands created.
* the elided specs of the shorthand examples, ``{...}`` and ``, ...}``, → a concrete ``cursor_task`` spec (they are
  not JSON as written).
* the webhook URL ``https://your-domain.com/webhooks/knify`` → a local receiver on 127.0.0.1 (this machine has no
  public domain); it checks every delivery with the seed's ``verify_signature``, copied below exactly.
* the workspaces the seeds use but never upload (``/workspaces/my-project``, ``e2e-tests``, ``batch-processor``) are
  uploaded first (a job naming a missing workspace is 400), and ``my-workspace.tar.gz`` (000 "Pre-warm Workspaces")
  is made locally; the seed's own ``mkdir``/``cat``/``tar`` lines (marked ``setup``) run as written.
* the seed's ``sleep 60`` ("Wait for completion...") is not run: the test polls the job instead.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, free_port, wait_ready

pytestmark = pytest.mark.slow
KNEO = shutil.which("kneo", path=str(Path(sys.executable).parent)) or "kneo"
CURLS = Path(__file__).with_name("seed_jobs_curls.txt")
# the product documents: beside the repository (../shared/seeds), or where KNEO_SEEDS_DIR says
SEEDS = Path(
    os.environ.get("KNEO_SEEDS_DIR")
    or next(
        (p for p in (ROOT.parent / "shared" / "seeds", Path("/work/shared/seeds")) if p.is_dir()),
        ROOT.parent / "shared" / "seeds",
    )
)
API_KEY = "knify-seed-key-0123456789"
WEBHOOK_SECRET = "your_webhook_secret"
TERMINAL = ("completed", "failed", "cancelled", "cleaned")


# --- the seed's receiver code (seeds/000 "Webhooks for Async Updates"), exactly as it is written there
# fmt: off
def verify_signature(payload, signature):  # type: ignore[no-untyped-def]
    computed = hmac.new(
        WEBHOOK_SECRET.encode(),
        payload,
        hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(f"sha256={computed}", signature)
# fmt: on
# ---


@dataclass
class Block:
    seed: str
    first: int
    last: int
    setup: bool
    text: str

    @property
    def where(self) -> str:
        return f"{self.seed}:{self.first}"


def load_blocks() -> list[Block]:
    blocks: list[Block] = []
    head: list[str] | None = None
    lines: list[str] = []

    def flush() -> None:
        if head is not None:
            while lines and not lines[-1].strip():
                lines.pop()
            first, _, last = head[1].partition("-")
            blocks.append(Block(head[0], int(first), int(last or first), "setup" in head[2:], "\n".join(lines)))

    for line in CURLS.read_text().splitlines():
        if line.startswith("@@ "):
            flush()
            head, lines = line[3:].split(), []
        elif head is not None:
            lines.append(line)
    flush()
    return blocks


# ----------------------------------------------------------------------------- the receiver


@dataclass
class Receiver:
    """A plain HTTP server in a thread that records every POST; ``start`` on a port chosen in advance."""

    port: int
    seen: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            assert self.thread is not None
            self.thread.join(timeout=10)
            self.server = None

    def events(self, path: str = "/webhooks/knify") -> list[tuple[dict[str, Any], dict[str, str], bytes]]:
        return [(json.loads(body), headers, body) for p, headers, body in list(self.seen) if p == path]


# ----------------------------------------------------------------------------- the platform


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``kneo service serve`` on fresh embedded servers, auth on, webhooks retried quickly (for the outage test)."""
    tmp = tmp_path_factory.mktemp("jobs-seed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNEO_")}
    env.update(
        KNEO_DATA_DIR=str(tmp / "data"),
        KNEO_EMBEDDED_NATS_PORT=str(free_port()),
        KNEO_EMBEDDED_PG_PORT=str(free_port()),
        KNEO_SERV_REQUEST_LOGS="false",
        KNEO_SERV_API_KEYS=f"knify:{API_KEY}:operator",
        KNEO_WEBHOOKS_BACKOFF_BASE_SECONDS="0.3",
        KNEO_WEBHOOKS_BACKOFF_MAX_SECONDS="1",
        KNEO_WEBHOOKS_MAX_ATTEMPTS="40",
        KNEO_WEBHOOKS_POLL_INTERVAL_SECONDS="0.2",
        KNEO_WEBHOOKS_TIMEOUT_SECONDS="3",
        KNEO_HUMAN_TIMER_INTERVAL_SECONDS="0.2",
        # no Anthropic key on a test machine: the seed's "sonnet-4.5" jobs run on the offline dummy provider
        KNEO_JOBS_MODEL_MAP=json.dumps({"sonnet-4.5": "dummy:dummy"}),
    )
    port = free_port()
    log_path = tmp / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [KNEO, "service", "serve", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log_path)
        yield url, tmp
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _http(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {API_KEY}"})


def until(check: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def wait_jobs(http: httpx.Client, ids: list[str], statuses: tuple[str, ...] = ("completed",)) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        jobs = [http.get(f"/jobs/{i}").json() for i in ids]
        for job in jobs:
            assert job["status"] in (*statuses, "queued", "running"), job
        return jobs if all(j["status"] in statuses for j in jobs) else None

    result: list[dict[str, Any]] = until(check, what=f"jobs {ids} {statuses}")
    return result


def upload(http: httpx.Client, name: str, files: dict[str, str], where: Path) -> None:
    archive = where / f"{name}.tar.gz"
    src = where / f"src-{name}"
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=".")
    with archive.open("rb") as fh:
        resp = http.post("/workspaces", files={"workspace": (archive.name, fh)}, data={"name": name})
    assert resp.status_code == 201, resp.text


# ----------------------------------------------------------------------------- running the commands


@dataclass
class Ran:
    status: list[int]
    stdout: str
    env: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.stdout)


WRAPPER = "curl() { command curl -sS -w '%{stderr}%{http_code}\\n' \"$@\"; }\nset -e -o pipefail\n"
ELIDED_SPEC = '{"job_type": "cursor_task", "prompt": "Reuse the sandbox"}'


def substitute(text: str, url: str, job_id: str | None, receiver: str) -> str:
    text = text.replace("https://api.knify.io", url)
    text = text.replace("https://your-domain.com/webhooks/knify", f"{receiver}/webhooks/knify")
    text = text.replace("curl -X POST .../", f'curl -H "Authorization: Bearer $KNIFY_API_KEY" -X POST {url}/')
    text = text.replace('{"spec": {...}}', '{"spec": ' + ELIDED_SPEC + "}")
    text = text.replace(", ...}}", ', "job_type": "cursor_task", "prompt": "Use the pre-warmed workspace"}}')
    if job_id is not None:
        text = text.replace("{job_id}", job_id).replace("job_abc123", job_id)
    assert not any(x in text for x in (".../", "{...}", ", ...}", "api.knify.io")), text
    return text


def run(block: Block, cwd: Path, env: dict[str, str], url: str, job_id: str | None, receiver: str) -> Ran:
    script = WRAPPER + substitute(block.text, url, job_id, receiver) + '\necho "__JOB_ID=${JOB_ID:-}" >&2\n'
    proc = subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, (block.where, proc.stdout, proc.stderr)
    status = [int(line) for line in proc.stderr.splitlines() if re.fullmatch(r"\d{3}", line)]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("curl:")]
    assert not errors, (block.where, errors)
    new_env = dict(env)
    for line in proc.stderr.splitlines():
        if line.startswith("__JOB_ID=") and line != "__JOB_ID=":
            new_env["JOB_ID"] = line.removeprefix("__JOB_ID=")
    return Ran(status, proc.stdout, new_env)


def _created(ran: Ran, where: str) -> dict[str, Any]:
    assert ran.status == [200], (where, ran.status, ran.stdout)
    body: dict[str, Any] = ran.json()
    assert body["job_id"].startswith("job_") and body["status"] in ("queued", "running"), (where, body)
    assert body["sandbox_id"].startswith("sandbox_") and body["cursor_session_id"], (where, body)
    return body


def _concatenated(text: str) -> list[dict[str, Any]]:
    decoder, out, pos = json.JSONDecoder(), [], 0
    while pos < len(text.rstrip()):
        obj, pos = decoder.raw_decode(text, pos)
        out.append(obj)
    return out


def _sse(text: str) -> list[dict[str, Any]]:
    items = []
    for line in text.splitlines():
        if line.startswith("data:"):
            items.append(json.loads(line.removeprefix("data:").strip()))
        else:
            assert line == "" or line.startswith(("id:", ":")), line  # what EventSource.onmessage gets
    return items


def _no_overlap(jobs: list[dict[str, Any]]) -> None:
    """Jobs sharing one sandbox ran one after the other (started after the previous one ended)."""
    ordered = sorted(jobs, key=lambda j: j["started_at"])
    for before, after in itertools.pairwise(ordered):
        assert after["started_at"] >= before["completed_at"], (before, after)


def test_the_seed_data_file_holds_every_curl_of_the_seeds_verbatim() -> None:
    blocks = load_blocks()
    assert len(blocks) == 26
    if not SEEDS.is_dir():
        pytest.skip(f"the seeds are not checked out beside the repository ({SEEDS})")
    covered: set[tuple[str, int]] = set()
    for block in blocks:
        lines = (SEEDS / block.seed).read_text().splitlines()[block.first - 1 : block.last]
        assert block.text == "\n".join(lines).rstrip("\n"), block.where
        covered |= {(block.seed, n) for n in range(block.first, block.last + 1)}
    for name in ("000_a1584448465880bb.txt", "001_28df48bb0e2ed07e.txt", "002_7d8a93ec6846f858.txt"):
        for n, line in enumerate((SEEDS / name).read_text().splitlines(), 1):
            if re.search(r"(^|\$\(|\s)curl\s", line):
                assert (name, n) in covered, f"{name}:{n} is a curl the data file misses: {line}"


def test_every_seed_curl_works_against_kneo_service_serve(served: tuple[str, Path]) -> None:
    url, tmp = served
    cwd = tmp / "curls"
    cwd.mkdir()
    blocks = {b.where: b for b in load_blocks()}
    receiver = Receiver(free_port())
    receiver.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNEO_")}
    env["KNIFY_API_KEY"] = API_KEY
    try:
        with _http(url) as http:
            # the workspaces the seeds name without uploading them (a missing one is a 400 by design)
            upload(http, "my-project", {"README.md": "# my project\n", "src/app.py": "print('hi')\n"}, tmp)
            upload(http, "e2e-tests", {"create-user.md": "# Create a test user\n1. Open the admin page\n"}, tmp)
            upload(http, "batch-processor", {"batch_items.json": '[{"id": "item_1", "data": "..."}]\n'}, tmp)
            with tarfile.open(cwd / "my-workspace.tar.gz", "w:gz") as tar:  # for 000 "Pre-warm Workspaces"
                (cwd / "mw").mkdir()
                (cwd / "mw" / "notes.md").write_text("pre-warmed\n")
                tar.add(cwd / "mw", arcname="my-workspace")
            r = lambda where, job_id=None: run(blocks[where], cwd, env, url, job_id, receiver.url)  # noqa: E731

            # ---- seeds/000 "Multi-Turn Workflows": one job continued three times
            ran = r("000_a1584448465880bb.txt:10")
            assert ran.status == [200] and ran.env["JOB_ID"].startswith("job_"), ran
            env = ran.env
            first = env["JOB_ID"]
            turns = []
            for where in ("000_a1584448465880bb.txt:24", "000_a1584448465880bb.txt:35", "000_a1584448465880bb.txt:46"):
                body = _created(r(where), where)
                assert body["parent_job_id"] == first and body["job_id"] != first
                turns.append(body["job_id"])
            jobs = wait_jobs(http, [first, *turns])
            assert len({j["sandbox_id"] for j in jobs}) == 1  # one sandbox, one job at a time in it
            _no_overlap(jobs)
            prompts = [j["spec"]["prompt"] for j in jobs[1:]]
            assert prompts[0] == "Based on your analysis, implement optimizations"
            report = http.get(f"/jobs/{turns[-1]}/artifacts").json()
            assert "Create a markdown report summarizing all changes" in report["result.json"]["prompt"]

            # ---- "Workspace Templating": the seed's own shell lines build the archive, then the upload
            assert run(blocks["000_a1584448465880bb.txt:153"], cwd, env, url, None, receiver.url).status == []
            ran = r("000_a1584448465880bb.txt:183")
            assert ran.status == [201], ran
            manifest = ran.json()
            assert manifest["name"] == "testing-template-v1" and manifest["path"] == "/workspaces/testing-template-v1"
            assert manifest["files"] >= 3  # runbooks/setup.md, config/test-config.json, .env.example

            # ---- "Batch Processing"
            assert run(blocks["000_a1584448465880bb.txt:329"], cwd, env, url, None, receiver.url).status == []
            batch = _created(r("000_a1584448465880bb.txt:339"), "batch")
            (done,) = wait_jobs(http, [batch["job_id"]])
            assert done["spec"]["workspace_path"] == "/workspaces/batch-processor"
            assert "batch_items.json" in done["artifacts"]["files"]  # the workspace was mounted in the sandbox

            # ---- "Webhooks for Async Updates": register, then every later job's ending arrives signed
            ran = r("000_a1584448465880bb.txt:477")
            assert ran.status == [201], ran
            hook = ran.json()
            assert set(hook) == {"id", "url", "events", "created_at"} and WEBHOOK_SECRET not in ran.stdout
            assert hook["events"] == ["job.completed", "job.failed"]

            # ---- "Reuse Sandboxes" (the shorthand: no Content-Type, so curl sends form-urlencoded)
            ran = r("000_a1584448465880bb.txt:493")
            assert ran.status == [200] and ran.env["JOB_ID"].startswith("job_"), ran
            env = ran.env
            reuse = [env["JOB_ID"]]
            for where in ("000_a1584448465880bb.txt:496", "000_a1584448465880bb.txt:499"):
                body = _created(r(where), where)
                assert body["parent_job_id"] == env["JOB_ID"]
                reuse.append(body["job_id"])
            jobs = wait_jobs(http, reuse)
            assert len({j["sandbox_id"] for j in jobs}) == 1
            _no_overlap(jobs)
            ran = r("000_a1584448465880bb.txt:502")
            assert ran.status == [200] and ran.json()["success"] is True, ran
            assert set(ran.json()["cleaned_jobs"]) == set(reuse)

            # ---- "Pre-warm Workspaces": upload once (named after the file), use in ten jobs
            ran = r("000_a1584448465880bb.txt:509")
            assert ran.status == [201] and ran.json()["name"] == "my-workspace", ran
            ran = r("000_a1584448465880bb.txt:512")
            assert ran.status == [200] * 10, ran
            warm = [body["job_id"] for body in _concatenated(ran.stdout)]  # ten answers, back to back
            assert len(set(warm)) == 10
            for job in wait_jobs(http, warm):
                assert "notes.md" in job["artifacts"]["files"]
                assert job["spec"]["workspace_path"] == "/workspaces/my-workspace"

            # ---- seeds/001 "Working with Jobs"
            cursor = _created(r("001_28df48bb0e2ed07e.txt:7"), "001:7")
            e2e = _created(r("001_28df48bb0e2ed07e.txt:22"), "001:22")
            exam = _created(r("001_28df48bb0e2ed07e.txt:38"), "001:38")
            job_id = cursor["job_id"]
            ran = r("001_28df48bb0e2ed07e.txt:58")
            assert ran.status == [200]
            listed = ran.json()
            assert set(listed) == {"data", "pagination"} and listed["pagination"]["total"] >= 20
            assert listed["data"][0]["id"] == exam["job_id"]  # newest first
            assert {"id", "spec", "status", "created_at", "started_at", "completed_at", "sandbox_id"} <= set(
                listed["data"][0]
            )
            assert "cursor_session_id" in listed["data"][0]
            # the stream follows the job live and ends with `completed` (curl -N returns when the server closes)
            ran = r("001_28df48bb0e2ed07e.txt:78", job_id)
            assert ran.status == [200]
            items = _sse(ran.stdout)
            assert items[-1]["type"] == "completed" and items[-1]["status"] == "completed", items
            assert {"agent_message", "tool_use", "file_created"} <= {i["type"] for i in items}
            ran = r("001_28df48bb0e2ed07e.txt:61", job_id)
            assert ran.status == [200]
            detail = ran.json()
            assert detail["id"] == job_id and detail["status"] == "completed" and detail["error"] is None
            assert detail["spec"]["model"] == "sonnet-4.5"  # as submitted (the model map decides what runs it)
            for key in ("spec", "created_at", "started_at", "completed_at", "sandbox_id", "cursor_session_id"):
                assert detail[key], key
            assert [e["stage"] for e in detail["events"]][-1] == "completed"
            assert "result.json" in detail["artifacts"]["files"] and "README.md" in detail["artifacts"]["files"]
            ran = r("001_28df48bb0e2ed07e.txt:72", job_id)
            assert ran.status == [200] and ran.json() == {"events": detail["events"]}
            stages = {e["stage"] for e in detail["events"]}
            assert {"sandbox_created", "workspace_mounted", "agent_started", "artifact_generated"} <= stages
            assert "sandbox_paused" in stages
            ran = r("001_28df48bb0e2ed07e.txt:83", job_id)
            child = _created(ran, "001:83")
            assert child["parent_job_id"] == job_id and child["sandbox_id"] == cursor["sandbox_id"]
            assert child["cursor_session_id"] == cursor["cursor_session_id"]
            ran = r("001_28df48bb0e2ed07e.txt:100", job_id)
            assert ran.status == [200]
            artifacts = ran.json()
            assert artifacts["result.json"]["status"] == "success" and artifacts["README.md"] == "# my project\n"
            wait_jobs(http, [child["job_id"], e2e["job_id"], exam["job_id"]])
            ran = r("001_28df48bb0e2ed07e.txt:108", job_id)
            assert ran.status == [200] and ran.json()["success"] is True, ran
            assert ran.json()["message"] == "Sandbox cleaned up successfully"
            assert http.get(f"/jobs/{job_id}").json()["status"] == "cleaned"
            again = http.post(f"/jobs/{job_id}/continue", json={"spec": {"prompt": "more"}})
            assert again.status_code == 409 and again.json()["code"] == "CONFLICT"  # "You cannot continue…"
            e2e_job = http.get(f"/jobs/{e2e['job_id']}").json()
            assert "create-user.md" in e2e_job["artifacts"]["files"]
            exam_result = http.get(f"/jobs/{exam['job_id']}/artifacts").json()["result.json"]
            assert exam_result["user_id"] == "user_12345"

            # ---- seeds/002 "Stream Cursor Output" on a finished job: the whole transcript, then the end
            ran = r("002_7d8a93ec6846f858.txt:236", e2e["job_id"])
            assert ran.status == [200]
            assert _sse(ran.stdout) == http.get(f"/jobs/{e2e['job_id']}/cursor").json()["events"]

            # every job that ended after the webhook was registered was delivered, and verifies
            after = {*reuse, *warm, cursor["job_id"], e2e["job_id"], exam["job_id"], child["job_id"]}

            def delivered() -> set[str] | None:
                got = {e["job_id"] for e, _, _ in receiver.events() if e["type"] == "job.completed"}
                return got if after <= got else None

            until(delivered, what="job.completed deliveries")
            for event, headers, body in receiver.events():
                assert verify_signature(body, headers["x-knify-signature"]), event
                assert event["status"] == "completed" and headers["x-knify-delivery"] == event["delivery_id"]
            assert not {e["job_id"] for e, _, _ in receiver.events()} & {first, *turns, batch["job_id"]}
    finally:
        receiver.stop()


def test_a_receiver_down_for_a_while_gets_every_event_afterwards(served: tuple[str, Path]) -> None:
    """The receiver refuses connections while jobs finish; once it is up, every ``job.completed`` arrives, signed.

    The platform retries with a 0.3 s base and a 1 s cap here, so a few seconds stand in for the minute of the issue;
    docs/webhooks.md says how long an outage the defaults ride out.
    """
    url, _ = served
    receiver = Receiver(free_port())  # nothing listens there yet: connections are refused
    with _http(url) as http:
        hook = http.post(
            "/webhooks",
            json={"url": f"{receiver.url}/webhooks/knify", "events": ["job.completed"], "secret": WEBHOOK_SECRET},
        )
        assert hook.status_code == 201, hook.text
        hook_id = hook.json()["id"]
        ids = [
            http.post("/jobs", json={"spec": {"job_type": "cursor_task", "prompt": f"outage job {i}"}}).json()["job_id"]
            for i in range(5)
        ]
        wait_jobs(http, ids)

        def failing() -> list[dict[str, Any]] | None:
            ds = http.get(f"/webhooks/{hook_id}/deliveries").json()["data"]
            ok = len(ds) == len(ids) and all(d["status"] == "pending" and d["failures"] >= 3 for d in ds)
            return ds if ok else None

        down = until(failing, what="every delivery failed three times")
        for d in down:
            assert all(a["status_code"] is None and a["error"] for a in d["attempts"] if a["finished_at"]), d
        assert receiver.seen == []
        receiver.start()
        try:

            def arrived() -> list[dict[str, Any]] | None:
                ds = http.get(f"/webhooks/{hook_id}/deliveries").json()["data"]
                return ds if len(ds) == len(ids) and all(d["status"] == "succeeded" for d in ds) else None

            done = until(arrived, what="every delivery succeeded")
        finally:
            receiver.stop()
    events = receiver.events()
    assert {e["job_id"] for e, _, _ in events} == set(ids)
    for event, headers, body in events:
        assert verify_signature(body, headers["x-knify-signature"])
        assert event["type"] == "job.completed" and event["job"]["status"] == "completed"
    assert all(d["failures"] >= 3 and d["attempts"][-1]["status_code"] == 200 for d in done)
