"""seeds/004's CLI, as a user would type it.

(a) every command path of the seed's generated CLI reference exists in our typer app with every option the seed lists
    (tests/e2e/seed_cli_commands.txt, extracted once from the seed; ours may have more);
(b) every ``kneo …`` line the seed shows runs as written — only placeholders (<run_id>, <continuation_id>,
    <request_id>, <api-key>, <prompt>) and the example URLs (-> the served URL) substituted — against
    ``kneo service serve`` with auth on, and answers what the seed says; no command ever prints the API key;
(c) ``kneo run examples/human_approval_workflow.yaml --input hello --follow`` pauses and says how to resume, and
    ``kneo human resume … --approve`` finishes the run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from tests.conftest import ROOT, free_port, wait_ready
from tests.e2e.test_cli import KNEO

SEED_TREE = Path(__file__).with_name("seed_cli_commands.txt")
ADMIN_KEY = "seed-admin-key-7f3a9c1e5b"
SIGNING_KEY = "seed-signing-key-0123456789abcdef"

# Every `kneo …` line of seeds/004 (line numbers in the seed; continuation lines joined), as written.
SEED_LINES: dict[str, tuple[int, ...]] = {
    "kneo config init --name research-agent-demo": (21, 1559),
    "kneo config show": (22, 1560),
    "kneo config secrets --json": (775,),
    "kneo spec validate examples/research_agent.yaml": (23, 1484),
    "kneo spec lint examples/research_agent.yaml": (24, 108),
    "kneo spec lint examples/research_agent.yaml --json": (112,),
    "kneo spec compile examples/research_agent.yaml": (25, 1485),
    "kneo spec migrate legacy_agent.yaml --output migrated_agent.yaml": (26, 98),
    "kneo spec migrate migrated_agent.yaml --check --json": (99,),
    "kneo spec policy-report examples/research_agent.yaml --json": (27, 131),
    "kneo spec validate examples/research_agent.yaml --env prod": (28, 1490),
    "kneo spec bundle sign examples/research_agent.yaml --output bundles/research_agent.json "
    "--approved-by release-manager --env prod": (29,),
    "kneo spec bundle verify bundles/research_agent.json": (32,),
    "kneo spec bundle sign examples/research_agent.yaml --output bundles/research_agent.prod.json "
    "--approved-by release-manager --env prod": (144, 1491),
    "kneo spec bundle verify bundles/research_agent.prod.json": (148,),
    "kneo spec compile examples/graph_review_workflow.yaml": (1498,),
    "kneo spec compile examples/concurrent_review_workflow.yaml": (1504,),
    "kneo spec compile examples/group_chat_workflow.yaml": (1512,),
    "kneo spec validate my_agent.yaml --env prod": (1580,),
    "kneo spec compile my_agent.yaml": (1583,),
    'kneo run examples/research_agent.yaml --service-url http://127.0.0.1:8000 --input "hello"': (48,),
    "kneo config profile set local --service-url http://127.0.0.1:8000 --api-key <api-key>": (56,),
    "kneo config profile set staging --service-url https://staging.example.com --api-key <api-key> --no-activate": (
        58,
    ),
    "kneo config profile list": (60,),
    "kneo config profile use staging": (61,),
    'kneo run examples/research_agent.yaml --input "Analyze Nvidia AI business"': (33,),
    'kneo run --input "Analyze Nvidia AI business" --target workflow examples/research_agent.yaml': (1486,),
    'kneo run --input "Review the auth middleware refactor" --target workflow '
    "examples/concurrent_review_workflow.yaml": (1505,),
    'kneo run --input "Should we adopt gRPC for service-to-service calls?" --target workflow '
    "examples/group_chat_workflow.yaml": (1513,),
    'kneo run --input "<prompt>" --target workflow my_agent.yaml': (1586,),
    "kneo runs get <run_id>": (34,),
    "kneo runs trace <run_id>": (36,),
    "kneo runs checkpoints <run_id>": (37,),
    "kneo runs replay <run_id>": (38,),
    "kneo runs checkpoint-diff <run_id> --from-sequence 1 --to-sequence 3": (39,),
    'kneo run --input "hello" --target workflow --json examples/human_approval_workflow.yaml': (1520,),
    "kneo human get <continuation_id>": (40,),
    "kneo human list --profile staging": (66,),
    "kneo human resume <continuation_id> --request-id <request_id> --approve": (41, 1522),
    "kneo runs cancel <run_id>": (35,),
    "kneo spec validate examples/research_agent.yaml --profile staging": (63,),
    'kneo run examples/research_agent.yaml --profile staging --input "hello"': (64,),
    "kneo runs get <run_id> --profile staging": (65,),
    "kneo spec policy-report examples/research_agent.yaml --profile staging --json": (132,),
}


# ----------------------------------------------------------------------------- (a) the command tree


def _our_tree() -> dict[str, set[str]]:
    from kneo_client.cli import app

    tree: dict[str, set[str]] = {}

    def walk(cmd: Any, path: str) -> None:
        opts = tree.setdefault(path, set())
        for param in cmd.params:
            if param.param_type_name == "option":
                opts.update(param.opts, param.secondary_opts)
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "kneo")
    return tree


def _seed_tree() -> dict[str, set[str]]:
    tree: dict[str, set[str]] = {}
    for line in SEED_TREE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        words = line.split()
        cut = next((i for i, w in enumerate(words) if w.startswith("-")), len(words))
        tree.setdefault(" ".join(words[:cut]), set()).update(words[cut:])
    return tree


def test_the_seed_command_tree_exists_with_its_options() -> None:
    ours, seed = _our_tree(), _seed_tree()
    assert len(seed) > 50 and "kneo runs checkpoint-diff" in seed and "kneo jobs create" in seed
    missing = sorted(path for path in seed if path not in ours)
    assert not missing, f"commands missing: {missing}"
    lacking = {path: sorted(opts - ours[path]) for path, opts in seed.items() if opts - ours[path]}
    assert not lacking, f"options missing: {lacking}"


def test_every_leaf_command_takes_json_except_the_long_running_ones() -> None:
    ours = _our_tree()
    servers = {"kneo service serve", "kneo service run", "kneo demo", "kneo spec schema", "kneo spec resolve"}
    groups = {p for p in ours if any(q.startswith(p + " ") for q in ours)}
    without = sorted(p for p, opts in ours.items() if p not in groups | servers and "--json" not in opts)
    assert not without, f"no --json: {without}"


def test_shell_completion_is_enabled() -> None:
    # `--show-completion` detects the shell from the process tree (under `make` that is sh, which typer does not
    # support); typer's switch for tests turns detection off so the shell can be named
    res = subprocess.run(
        [KNEO, "--show-completion", "bash"],
        env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr
    assert "_kneo_completion" in res.stdout and "complete" in res.stdout
    # and the completion itself answers: the subcommands of `kneo jobs`
    env = {**os.environ, "_KNEO_COMPLETE": "complete_bash", "COMP_WORDS": "kneo jobs c", "COMP_CWORD": "2"}
    done = subprocess.run([KNEO], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert {"create", "cursor", "continue", "cleanup"} <= set(done.stdout.split()), done.stdout + done.stderr


# ----------------------------------------------------------------------------- (b) and (c): the lines, run


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str], Path]]:
    """`kneo service serve` with auth on (seeds/004 "Authentication"), and a fresh project folder to type in."""
    tmp = tmp_path_factory.mktemp("seed-cli")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNEO_")}
    env.update(
        KNEO_DATA_DIR=str(tmp / "data"),
        KNEO_EMBEDDED_NATS_PORT=str(free_port()),
        KNEO_EMBEDDED_PG_PORT=str(free_port()),
        KNEO_SERV_REQUEST_LOGS="false",
        NO_COLOR="1",
        COLUMNS="200",
    )
    served_env = {
        **env,
        "KNEO_SERV_AUTH_ENABLED": "true",
        # the approval step's reviewer (examples/human_approval_workflow.yaml) holds the key the user types
        "KNEO_SERV_API_KEYS": f"operator:operator-token-0042:operator;release-manager:{ADMIN_KEY}:admin",
        "KNEO_SERV_ADMIN_API_KEY": "seed-other-admin-key-5d2b",
    }
    port = free_port()
    log_path = tmp / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [KNEO, "service", "serve", "--port", str(port)],
            env=served_env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log_path)
        project = tmp / "project"
        project.mkdir()
        (project / "examples").symlink_to(ROOT / "examples")
        shutil.copy(ROOT / "examples" / "legacy_agent.yaml", project / "legacy_agent.yaml")
        shutil.copy(ROOT / "examples" / "research_agent.yaml", project / "my_agent.yaml")  # seed: "cp … my_agent.yaml"
        user_env = {
            **env,
            "KNEO_SERV_PROFILES_PATH": str(tmp / "home" / "profiles.json"),
            "KNEO_SERV_SPEC_SIGNING_KEY": SIGNING_KEY,
        }
        yield url, user_env, project
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


class Session:
    """Runs seed lines in the project folder and remembers everything they printed."""

    def __init__(self, url: str, env: dict[str, str], cwd: Path) -> None:
        self.url, self.env, self.cwd = url, env, cwd
        self.target: tuple[str, ...] = ("--service-url", url)  # how the test's own helper commands reach it
        self.ran: set[str] = set()
        self.printed: list[str] = []

    def kneo(self, line: str, *, expect: int = 0, **values: str) -> subprocess.CompletedProcess[str]:
        """Run seed ``line`` with its placeholders filled in; check the exit code."""
        assert line in SEED_LINES, f"not a seed line: {line}"
        self.ran.add(line)
        text = line.replace("http://127.0.0.1:8000", self.url).replace("https://staging.example.com", self.url)
        for name, value in values.items():
            text = text.replace(f"<{ {'api_key': 'api-key'}.get(name, name) }>", value)
        assert "<" not in text, f"unfilled placeholder in {text}"
        argv = shlex.split(text)
        assert argv[0] == "kneo"
        res = subprocess.run(
            [KNEO, *argv[1:]],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
        )
        self.printed += [res.stdout, res.stderr]
        assert res.returncode == expect, f"{text}\nexit {res.returncode}\n{res.stdout}\n{res.stderr}"
        return res

    def raw(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A helper command of the test itself (not a seed line)."""
        res = subprocess.run(
            [KNEO, *args], env=self.env, cwd=self.cwd, capture_output=True, text=True, timeout=120,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.printed += [res.stdout, res.stderr]
        return res

    def wait_status(self, run_id: str, done: Callable[[str], bool], deadline_s: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + deadline_s
        while True:
            res = self.raw("runs", "get", run_id, "--json", *self.target)
            assert res.returncode == 0, res.stderr
            state: dict[str, Any] = json.loads(res.stdout)
            if done(state["status"]) or time.monotonic() > deadline:
                return state


def _run_id(stdout: str) -> str:
    found = re.search(r"run_id (run_\S+)", stdout)
    assert found, stdout
    return found.group(1)


def test_every_seed_line_runs_as_written(platform: tuple[str, dict[str, str], Path]) -> None:
    url, env, project = platform
    s = Session(url, env, project)

    # --- a new project, its specs, locally ("Common commands", "Spec migration", "Spec linting", "Spec bundles")
    init = s.kneo("kneo config init --name research-agent-demo")
    assert (project / ".kneo" / "config.yaml").is_file() and "config.yaml" in init.stdout
    assert "name: research-agent-demo" in s.kneo("kneo config show").stdout
    secrets = json.loads(s.kneo("kneo config secrets --json").stdout)
    assert "OPENAI_API_KEY" in json.dumps(secrets)
    assert "valid" in s.kneo("kneo spec validate examples/research_agent.yaml").stdout
    lint = json.loads(s.kneo("kneo spec lint examples/research_agent.yaml --json").stdout)
    assert set(lint) >= {"clean", "warning_count", "error_count", "diagnostics"} and lint["clean"] is True
    assert "0 error(s), 0 warning(s)" in s.kneo("kneo spec lint examples/research_agent.yaml").stdout
    for spec in ("research_agent", "graph_review_workflow", "concurrent_review_workflow", "group_chat_workflow"):
        res = s.kneo(f"kneo spec compile examples/{spec}.yaml")
        assert res.stdout.strip(), spec
    migrated = s.kneo("kneo spec migrate legacy_agent.yaml --output migrated_agent.yaml")
    assert "deprecated" in migrated.stdout + migrated.stderr
    assert "version: v1" in (project / "migrated_agent.yaml").read_text()
    check = json.loads(s.kneo("kneo spec migrate migrated_agent.yaml --check --json").stdout)
    assert check["changed"] is False
    report = json.loads(s.kneo("kneo spec policy-report examples/research_agent.yaml --json").stdout)
    assert report["valid"] is True and "report" in report
    assert "valid" in s.kneo("kneo spec validate examples/research_agent.yaml --env prod").stdout
    for name in ("research_agent", "research_agent.prod"):
        signed = s.kneo(
            f"kneo spec bundle sign examples/research_agent.yaml --output bundles/{name}.json "
            "--approved-by release-manager --env prod"
        )
        assert "sha256:" in signed.stdout and (project / "bundles" / f"{name}.json").is_file()
        verified = s.kneo(f"kneo spec bundle verify bundles/{name}.json")
        assert "approved by release-manager for prod" in verified.stdout
    assert "valid" in s.kneo("kneo spec validate my_agent.yaml --env prod").stdout
    s.kneo("kneo spec compile my_agent.yaml")

    # --- talking to a service: `export KNEO_SERV_API_KEY=<api-key>` then --service-url
    no_key = s.raw("runs", "list", "--service-url", url)
    assert no_key.returncode == 3 and "401" in no_key.stderr  # auth is on: without the key, exit 3
    s.env = {**env, "KNEO_SERV_API_KEY": ADMIN_KEY}
    first = s.kneo('kneo run examples/research_agent.yaml --service-url http://127.0.0.1:8000 --input "hello"')
    assert "succeeded" in first.stdout
    s.env = env  # from here on the key comes from the profiles

    # --- profiles
    s.kneo("kneo config profile set local --service-url http://127.0.0.1:8000 --api-key <api-key>", api_key=ADMIN_KEY)
    s.kneo(
        "kneo config profile set staging --service-url https://staging.example.com --api-key <api-key> --no-activate",
        api_key=ADMIN_KEY,
    )
    listed = s.kneo("kneo config profile list").stdout
    assert "local" in listed and "staging" in listed and "authenticated" in listed
    s.kneo("kneo config profile use staging")
    s.target = ("--profile", "staging")
    assert oct(Path(env["KNEO_SERV_PROFILES_PATH"]).stat().st_mode & 0o777) == "0o600"

    # --- runs (the active profile points at the service)
    run_id = _run_id(s.kneo('kneo run examples/research_agent.yaml --input "Analyze Nvidia AI business"').stdout)
    for line in (
        'kneo run --input "Analyze Nvidia AI business" --target workflow examples/research_agent.yaml',
        'kneo run --input "Review the auth middleware refactor" --target workflow '
        "examples/concurrent_review_workflow.yaml",
        'kneo run --input "Should we adopt gRPC for service-to-service calls?" --target workflow '
        "examples/group_chat_workflow.yaml",
    ):
        assert "succeeded" in s.kneo(line).stdout
    assert "succeeded" in s.kneo('kneo run --input "<prompt>" --target workflow my_agent.yaml', prompt="hi").stdout

    got = s.kneo("kneo runs get <run_id>", run_id=run_id).stdout
    assert "succeeded" in got and run_id in got and "retrieve" in got
    trace = s.kneo("kneo runs trace <run_id>", run_id=run_id).stdout
    assert "run.created" in trace and "run.succeeded" in trace
    checkpoints = s.kneo("kneo runs checkpoints <run_id>", run_id=run_id).stdout
    assert all(step in checkpoints for step in ("retrieve", "analyze", "summarize"))
    replay = s.kneo("kneo runs replay <run_id>", run_id=run_id).stdout
    assert "step.completed" in replay or "summarize" in replay
    diff = s.kneo("kneo runs checkpoint-diff <run_id> --from-sequence 1 --to-sequence 3", run_id=run_id).stdout
    assert re.search(r"^[+~] ", diff, re.M), diff

    # --- human in the loop (examples walkthrough): --json output includes a continuation_id
    paused = json.loads(
        s.kneo('kneo run --input "hello" --target workflow --json examples/human_approval_workflow.yaml').stdout
    )
    assert paused["status"] == "paused" and paused["continuation_id"]
    cid, rid = paused["continuation_id"], paused["metadata"]["pending_human_request"]["request_id"]
    task = s.kneo("kneo human get <continuation_id>", continuation_id=cid).stdout
    assert cid in task and f"request_id: {rid}" in task and "pending" in task
    assert cid in s.kneo("kneo human list --profile staging").stdout
    s.kneo(
        "kneo human resume <continuation_id> --request-id <request_id> --approve", continuation_id=cid, request_id=rid
    )
    final = s.wait_status(paused["run_id"], lambda st: st not in ("paused", "running", "queued"))
    assert final["status"] == "succeeded" and final["visited_steps"] == ["draft", "approval", "publish"]

    # cancel: a run that can still be cancelled (another paused approval)
    other = s.raw("run", "examples/human_approval_workflow.yaml", "--input", "cancel me", "--json")
    assert other.returncode == 0, other.stderr
    other_id = json.loads(other.stdout)["run_id"]
    cancelled = s.kneo("kneo runs cancel <run_id>", run_id=other_id).stdout
    assert "cancelled" in cancelled
    again = s.kneo("kneo runs cancel <run_id>", run_id=other_id, expect=1)  # a finished run: one line, exit 1
    assert len(again.stderr.strip().splitlines()) == 1 and "invalid_state" in again.stderr

    # --- an explicit --profile
    assert "valid" in s.kneo("kneo spec validate examples/research_agent.yaml --profile staging").stdout
    assert "succeeded" in s.kneo('kneo run examples/research_agent.yaml --profile staging --input "hello"').stdout
    assert "succeeded" in s.kneo("kneo runs get <run_id> --profile staging", run_id=run_id).stdout
    remote_report = json.loads(
        s.kneo("kneo spec policy-report examples/research_agent.yaml --profile staging --json").stdout
    )
    assert remote_report["valid"] is True

    # every line ran; no line printed the key
    assert s.ran == set(SEED_LINES), sorted(set(SEED_LINES) - s.ran)
    assert not [p for p in s.printed if ADMIN_KEY in p]


def test_human_approval_follow_pauses_then_resume_finishes(platform: tuple[str, dict[str, str], Path]) -> None:
    url, env, project = platform
    env = {**env, "KNEO_SERV_API_KEY": ADMIN_KEY}
    s = Session(url, env, project)
    res = s.raw("run", "examples/human_approval_workflow.yaml", "--input", "hello", "--follow", "--service-url", url)
    assert res.returncode == 0, res.stderr
    assert "status  paused" in res.stdout
    cid = re.search(r"continuation_id\s+(\S+)", res.stdout)
    rid = re.search(r"request_id\s+(\S+)", res.stdout)
    assert cid and rid, res.stdout
    hint = f"kneo human resume {cid.group(1)} --request-id {rid.group(1)} --approve"
    assert hint in res.stdout
    run_id = _run_id(res.stdout)
    resumed = s.raw(*shlex.split(hint)[1:], "--service-url", url)
    assert resumed.returncode == 0, resumed.stderr
    final = s.wait_status(run_id, lambda st: st not in ("paused", "running", "queued"))
    assert final["status"] == "succeeded" and final["visited_steps"] == ["draft", "approval", "publish"]
    # piped output is plain: no ANSI escapes, no spinner frames
    assert "\x1b[" not in res.stdout + res.stderr + resumed.stdout + resumed.stderr


def _run_on_a_terminal(args: list[str], env: dict[str, str], deadline_s: float = 60) -> tuple[int, str]:
    """Run ``kneo`` with stdout and stderr on a pseudo-terminal; everything it wrote, decoded."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen([KNEO, *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    data = b""
    deadline = time.monotonic() + deadline_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                data += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(timeout=30), data.decode(errors="replace")


def test_a_spinner_on_a_terminal_only_and_the_error_after_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNEO_") and k != "NO_COLOR"}
    env.update(TERM="xterm", KNEO_SERV_CLIENT_RETRIES="3", KNEO_SERV_PROFILES_PATH=str(tmp_path / "p.json"))
    dead = f"http://127.0.0.1:{free_port()}"
    args = ["run", "examples/research_agent.yaml", "--input", "x", "--service-url", dead]
    code, shown = _run_on_a_terminal(args, env)
    assert code == 5
    assert "⠋" in shown and "running research_agent.yaml" in shown  # the rich status spinner
    # the one-line error comes after the spinner was cleared, not glued to one of its frames
    last = shown.rsplit("\x1b[2K", 1)[-1]
    assert last.strip() == f"kneo: no service answers at {dead}; start one with `kneo service serve`"
    code, shown = _run_on_a_terminal([*args, "--json"], env)
    assert code == 5 and "⠋" not in shown and "\x1b[" not in shown
