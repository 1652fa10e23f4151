"""The ``sandbox`` connector: a job's isolated working folder (the Jobs face, docs/jobs.md).

Agent tools (``write_file``, ``read_file``, ``list_files``) take the sandbox as a bound ``params`` entry and do all
their I/O through ``ToolContext``, so the tool entry's ``permissions: {filesystem: {read: [<sandbox>], write:
[<sandbox>]}}`` confines them: a path that leaves the sandbox (``..``, an absolute path, a symlink out) is refused.

Function steps of the job templates (``prepare``, ``session_context``, ``write_result``) create the sandbox (mounting
the job's workspace into it the first time), give a continuation the session's earlier turns, and write
``result.json``. They are trusted code: they only touch folders named ``sandbox_<hex>`` (and read the workspace).
The runner's own files live under ``<sandbox>/.kneo/`` and are not artifacts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from kneo_runner.tools import ToolContext

INTERNAL_DIR = ".kneo"  # the session log; never listed as an artifact
SESSION_LOG = "session.jsonl"
RESULT_FILE = "result.json"
MAX_LISTED_FILES = 500
MAX_READ_CHARS = 200_000
SESSION_TURNS = 10
SESSION_CHARS = 4000
_SANDBOX_NAME = re.compile(r"^sandbox_[0-9a-f]{8,64}$")


def _sandbox(path: str) -> Path:
    p = Path(path)
    if not p.is_absolute() or not _SANDBOX_NAME.match(p.name):
        raise ValueError(f"{path!r} is not a job sandbox (an absolute path to a sandbox_<hex> folder)")
    return p


def _files(root: Path) -> list[str]:
    """Files under ``root`` (relative, POSIX, sorted), without the runner's own folder; bounded."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not (rel_dir == Path(".") and d == INTERNAL_DIR))
        for name in sorted(filenames):
            out.append((rel_dir / name).as_posix())
            if len(out) >= MAX_LISTED_FILES:
                return out
    return out


# --------------------------------------------------------------------------------------------------- agent tools


def write_file(
    ctx: ToolContext,
    sandbox: str,
    path: Annotated[str, Field(description="File path relative to the sandbox, e.g. src/main.py")],
    content: Annotated[str, Field(description="The whole new content of the file")],
) -> dict[str, Any]:
    """Create or overwrite a file in the job's sandbox (parent folders are created)."""
    target = ctx.resolve(Path(sandbox) / path, write=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    written = ctx.write_text(target, content)
    return {"path": target.relative_to(Path(os.path.realpath(sandbox))).as_posix(), "chars": written}


def read_file(
    ctx: ToolContext,
    sandbox: str,
    path: Annotated[str, Field(description="File path relative to the sandbox")],
) -> str:
    """Read a text file from the job's sandbox (long files are cut at 200,000 characters)."""
    text = ctx.read_text(Path(sandbox) / path)
    return text if len(text) <= MAX_READ_CHARS else text[:MAX_READ_CHARS] + "\n[… cut]"


def list_files(ctx: ToolContext, sandbox: str) -> list[str]:
    """List every file in the job's sandbox (relative paths, at most 500)."""
    root = ctx.resolve(sandbox)
    return _files(root) if root.is_dir() else []


# --------------------------------------------------------------------------------------------------- template steps


def prepare(
    sandbox: str, workspace: str | None = None, job_id: str | None = None, parent_job_id: str | None = None
) -> dict[str, Any]:
    """Create the sandbox (or reuse it: a continuation) and, when it is new, copy the workspace into it."""
    root = _sandbox(sandbox)
    created = not root.exists()
    (root / INTERNAL_DIR).mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "sandbox_id": root.name,
        "created": created,
        "job_id": job_id or None,
        "parent_job_id": parent_job_id or None,
        "workspace": workspace or None,
        "workspace_mounted": False,
        "workspace_files": 0,
    }
    if workspace:
        source = Path(workspace)
        if not created:
            out["workspace_note"] = "the sandbox already holds the job's files; the workspace was mounted before"
        elif source.is_dir():
            # symlinks stay links: a link out of the sandbox is refused by the tools' permission check anyway
            shutil.copytree(source, root, symlinks=True, dirs_exist_ok=True)
            out["workspace_mounted"] = True
            out["workspace_files"] = len(_files(root))
        else:
            out["workspace_note"] = f"workspace {workspace} not found; the sandbox starts empty"
    out["files"] = len(_files(root))
    return out


def session_context(sandbox: str) -> str:
    """The earlier turns of this sandbox's session, as text appended to the prompt ("" for a new sandbox)."""
    log = _sandbox(sandbox) / INTERNAL_DIR / SESSION_LOG
    if not log.is_file():
        return ""
    turns = []
    for line in log.read_text(encoding="utf-8").splitlines()[-SESSION_TURNS:]:
        try:
            turns.append(json.loads(line))
        except ValueError:
            continue
    if not turns:
        return ""
    lines = [f"- job {t.get('job_id')}: asked {t.get('prompt')!r}; answered {t.get('answer')!r}" for t in turns]
    text = "\n".join(lines)[-SESSION_CHARS:]
    return f"\n\nEarlier in this session (the files those jobs wrote are in the sandbox):\n{text}"


def write_result(
    sandbox: str,
    job_id: str,
    job_type: str,
    prompt: str = "",
    answer: str = "",
    session_id: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``result.json`` (the job's structured output) and record the turn in the session log."""
    root = _sandbox(sandbox)
    root.mkdir(parents=True, exist_ok=True)
    files = [f for f in _files(root) if f != RESULT_FILE]
    result = {
        "status": "success",
        "job_id": job_id,
        "job_type": job_type,
        "prompt": prompt,
        "summary": answer,
        "files": files,
        **(extra or {}),
    }
    (root / RESULT_FILE).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (root / INTERNAL_DIR).mkdir(exist_ok=True)
    turn = {"job_id": job_id, "session_id": session_id, "prompt": prompt[:1000], "answer": answer[:1000]}
    with (root / INTERNAL_DIR / SESSION_LOG).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(turn, ensure_ascii=False) + "\n")
    return {"result": RESULT_FILE, "files": [*files, RESULT_FILE]}
