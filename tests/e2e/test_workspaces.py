"""Workspaces (Jobs face): POST /workspaces unpacks a .tar.gz safely, GET /workspaces lists what is on disk.

Every refusal answers in the Jobs envelope ``{"error", "detail", "code"}`` and leaves nothing behind: no workspace
directory, no staging or trash leftovers, no event.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import random
import stat
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from kneo_gateway import workspaces as ws

KEYS = "op:op-token:operator;view:view-token:viewer;svc:svc-token:service;rev:rev-token:reviewer"
OP = {"Authorization": "Bearer op-token"}
# Small caps so each one can be reached quickly (the defaults are documented in docs/workspaces.md).
CAPS: dict[str, Any] = {
    "workspace_max_upload_bytes": 256 * 1024,
    "workspace_max_bytes": 2 * 1024 * 1024,
    "workspace_max_files": 40,
    "workspace_max_ratio": 200.0,
}


def _tgz(members: list[tarfile.TarInfo | tuple[str, bytes]], compress: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if compress else "w") as tar:
        for m in members:
            if isinstance(m, tuple):
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(m[1]))
            else:
                tar.addfile(m)
    return buf.getvalue()


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


SEED_FILES = (
    ("runbooks/setup.md", b"# Test Setup Runbook\n\n1. Install dependencies\n", 0o644),
    ("config/test-config.json", b'{"timeout": 300, "retries": 3, "parallel": true}\n', 0o644),
    (".env.example", b"DATABASE_URL=postgresql://localhost/test_db\n", 0o644),
    ("scripts/run.sh", b"#!/bin/sh\necho ok\n", 0o4755),  # setuid must not survive
)


def _seed_workspace() -> bytes:
    """The seed's testing workspace, archived as its curl example does: ``tar -czf x.tar.gz dir/``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for d in ("knify-testing-workspace", *(f"knify-testing-workspace/{s}" for s in ("runbooks", "config"))):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data, mode in SEED_FILES:
            info = tarfile.TarInfo(f"knify-testing-workspace/{name}")
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def _upload(
    http: httpx.AsyncClient,
    archive: bytes,
    name: str | None = None,
    *,
    filename: str = "upload.tar.gz",
    field: str = "workspace",
    headers: dict[str, str] | None = None,
    **fields: str,
) -> httpx.Response:
    data = dict(fields)
    if name is not None:
        data["name"] = name
    return await http.post(
        "/workspaces",
        files={field: (filename, archive, "application/gzip")},
        data=data,
        headers=OP if headers is None else headers,
    )


def _leftovers(root: Path) -> list[str]:
    """Everything under the workspace root except empty .staging / .trash directories."""
    if not root.exists():
        return []
    out = []
    for entry in root.iterdir():
        if entry.name in (ws.STAGING, ws.TRASH) and entry.is_dir():
            out += [f"{entry.name}/{child.name}" for child in entry.iterdir()]
        else:
            out.append(entry.name)
    return sorted(out)


def _jobs_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error", "detail", "code"}, body
    assert body["code"] == code, body
    assert isinstance(body["error"], str) and body["error"], body
    return dict(body)


async def _platform(platform_factory: Any, tmp_path: Path, **overrides: Any) -> Any:
    return await platform_factory(api_keys=SecretStr(KEYS), workspace_root=tmp_path / "ws", **{**CAPS, **overrides})


async def test_upload_unpacks_the_seed_workspace_lists_it_and_records_the_event(
    platform_factory: Any, tmp_path: Path
) -> None:
    p = await _platform(platform_factory, tmp_path)
    root = tmp_path / "ws"
    archive = _seed_workspace()
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        resp = await _upload(http, archive, "testing-template-v1", filename="testing-workspace.tar.gz")
        assert resp.status_code == 201, resp.text
        body = resp.json()
        assert body["name"] == "testing-template-v1"
        assert body["path"] == "/workspaces/testing-template-v1"
        assert body["files"] == 4
        assert body["bytes"] == sum(len(data) for _, data, _ in SEED_FILES)
        assert body["sha256"] == hashlib.sha256(archive).hexdigest()
        assert body["archive_bytes"] == len(archive)
        assert body["uploaded_by"] == "op"
        assert body["replaced"] is False

        # On disk: the single top directory is hoisted, contents intact, setuid dropped, the exec bit kept.
        files = ws.workspace_dir(p.settings, "/workspaces/testing-template-v1")
        assert files == root / "testing-template-v1" / "files"
        assert (files / "runbooks" / "setup.md").read_bytes().startswith(b"# Test Setup Runbook")
        assert (files / "config" / "test-config.json").read_text().startswith('{"timeout": 300')
        assert (files / ".env.example").exists()
        run_sh = (files / "scripts" / "run.sh").stat().st_mode
        assert stat.S_IMODE(run_sh) == 0o755
        assert sorted(p_.name for p_ in (root / "testing-template-v1").iterdir()) == ["files", "workspace.json"]
        assert _leftovers(root) == ["testing-template-v1"]

        # The name defaults to the archive's file name; the field may be called "file".
        second = await _upload(http, _tgz([("notes.txt", b"hi")]), filename="my-workspace.tgz", field="file")
        assert second.status_code == 201, second.text
        assert second.json()["name"] == "my-workspace"
        assert (ws.workspace_dir(p.settings, "my-workspace") / "notes.txt").read_bytes() == b"hi"

        listed = await http.get("/workspaces", headers={"Authorization": "Bearer view-token"})
        assert listed.status_code == 200, listed.text
        page = listed.json()
        assert [w["name"] for w in page["data"]] == ["my-workspace", "testing-template-v1"]
        assert page["pagination"] == {"page": 1, "limit": 20, "total": 2, "pages": 1}
        assert page["data"][1]["sha256"] == body["sha256"]
        paged = (await http.get("/workspaces", params={"limit": 1, "page": 2}, headers=OP)).json()
        assert [w["name"] for w in paged["data"]] == ["testing-template-v1"]
        assert paged["pagination"]["pages"] == 2
        one = await http.get("/workspaces/my-workspace", headers=OP)
        assert one.status_code == 200 and one.json()["files"] == 1
        _jobs_error(await http.get("/workspaces/nope", headers=OP), 404, "NOT_FOUND")

    events = await p.kernel.store.read_stream("workspace-testing-template-v1")
    assert [e.type for e in events] == ["workspace.uploaded"]
    assert events[0].data == {
        "name": "testing-template-v1",
        "files": 4,
        "bytes": body["bytes"],
        "sha256": body["sha256"],
        "archive_bytes": len(archive),
        "replaced": False,
    }
    assert events[0].metadata["actor"] == "op"


async def test_an_existing_name_is_409_unless_replace_and_a_replace_swaps_the_tree(
    platform_factory: Any, tmp_path: Path
) -> None:
    p = await _platform(platform_factory, tmp_path)
    root = tmp_path / "ws"
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        first = await _upload(http, _tgz([("a.txt", b"one"), ("keep/b.txt", b"b")]), "proj")
        assert first.status_code == 201, first.text
        again = await _upload(http, _tgz([("a.txt", b"two")]), "proj")
        err = _jobs_error(again, 409, "CONFLICT")
        assert "replace" in err["error"]
        assert (root / "proj" / "files" / "a.txt").read_bytes() == b"one"
        _jobs_error(await _upload(http, _tgz([("a.txt", b"two")]), "proj", replace="maybe"), 400, "BAD_REQUEST")

        replaced = await _upload(http, _tgz([("a.txt", b"two")]), "proj", replace="true")
        assert replaced.status_code == 201, replaced.text
        assert replaced.json()["replaced"] is True
        files = ws.workspace_dir(p.settings, "proj")
        assert (files / "a.txt").read_bytes() == b"two"
        assert not (files / "keep").exists()  # replaced, not merged
        assert _leftovers(root) == ["proj"]
    events = await p.kernel.store.read_stream("workspace-proj")
    assert [e.data["replaced"] for e in events] == [False, True]


async def test_unsafe_or_oversized_archives_are_refused_and_leave_nothing(
    platform_factory: Any, tmp_path: Path
) -> None:
    p = await _platform(platform_factory, tmp_path)
    root = tmp_path / "ws"
    rng = random.Random(7)
    # ~3 MiB that compresses ~40:1 (under the ratio cap, over the 2 MiB total cap)
    moderately = b"".join(rng.randbytes(100) + bytes(3996) for _ in range(800))
    cases: list[tuple[str, bytes, int, str, str]] = [
        ("absolute path", _tgz([("/etc/evil", b"x")]), 400, "BAD_REQUEST", "absolute"),
        ("dot-dot", _tgz([("../escape.txt", b"x")]), 400, "BAD_REQUEST", ".."),
        ("nested dot-dot", _tgz([("a/../../escape.txt", b"x")]), 400, "BAD_REQUEST", ".."),
        ("symlink out", _tgz([_special("link", tarfile.SYMTYPE, "/etc/passwd")]), 400, "BAD_REQUEST", "link"),
        (
            "symlink inside",
            _tgz([("a.txt", b"x"), _special("b.txt", tarfile.SYMTYPE, "a.txt")]),
            400,
            "BAD_REQUEST",
            "link",
        ),
        ("hardlink out", _tgz([_special("h", tarfile.LNKTYPE, "../../etc/passwd")]), 400, "BAD_REQUEST", "link"),
        ("fifo", _tgz([("a.txt", b"x"), _special("pipe", tarfile.FIFOTYPE)]), 400, "BAD_REQUEST", "FIFO"),
        ("char device", _tgz([_special("null", tarfile.CHRTYPE)]), 400, "BAD_REQUEST", "devices"),
        ("block device", _tgz([_special("sda", tarfile.BLKTYPE)]), 400, "BAD_REQUEST", "devices"),
        ("duplicate path", _tgz([("a.txt", b"1"), ("a.txt", b"2")]), 400, "BAD_REQUEST", "twice"),
        ("file then dir", _tgz([("a", b"1"), ("a/b.txt", b"2")]), 400, "BAD_REQUEST", "file"),
        ("not gzip", b"just some text, not an archive", 400, "BAD_REQUEST", "not a valid"),
        ("plain tar", _tgz([("a.txt", b"x")], compress=False), 400, "BAD_REQUEST", "not a valid"),
        ("truncated", _tgz([("a.txt", rng.randbytes(20_000))])[:5000], 400, "BAD_REQUEST", "not a valid"),
        ("no files", _tgz([_special("empty-dir", tarfile.DIRTYPE)]), 400, "BAD_REQUEST", "no files"),
        ("empty upload", b"", 400, "BAD_REQUEST", "empty"),
        # caps: compressed upload, ratio (a bomb), total unpacked bytes, member count
        ("upload cap", _tgz([("r.bin", rng.randbytes(300 * 1024))]), 413, "PAYLOAD_TOO_LARGE", "limit is"),
        ("bomb", _tgz([("zeros.bin", bytes(8 * 1024 * 1024))]), 413, "PAYLOAD_TOO_LARGE", "200 times"),
        ("total cap", _tgz([("m.bin", moderately)]), 413, "PAYLOAD_TOO_LARGE", "exceeds 2097152"),
        ("member cap", _tgz([(f"f{i}.txt", b"x") for i in range(41)]), 413, "PAYLOAD_TOO_LARGE", "40 members"),
    ]
    async with httpx.AsyncClient(base_url=p.url, timeout=60) as http:
        for label, archive, status, code, says in cases:
            resp = await _upload(http, archive, "victim")
            body = _jobs_error(resp, status, code)
            assert says in body["error"], (label, body)
            assert _leftovers(root) == [], (label, _leftovers(root))
        # invalid names: refused before anything is read into the root
        for name in ("../x", "a b", ".hidden", "x" * 65, "a.b", "-lead", "é"):
            resp = await _upload(http, _tgz([("a.txt", b"x")]), name)
            body = _jobs_error(resp, 400, "BAD_REQUEST")
            assert body["detail"]["field"] == "name", (name, body)
        _jobs_error(await _upload(http, _tgz([("a.txt", b"x")]), filename="noext.bin"), 400, "BAD_REQUEST")
        wrong_field = await _upload(http, _tgz([("a.txt", b"x")]), "ok", field="archive")
        assert _jobs_error(wrong_field, 400, "BAD_REQUEST")["detail"] == {"field": "workspace"}
        # a body over the streamed cap is cut off by the middleware (no Content-Length to trust)

        async def chunks() -> Any:
            boundary = b"--b0undary\r\n"
            yield boundary + b'Content-Disposition: form-data; name="workspace"; filename="x.tar.gz"\r\n\r\n'
            for _ in range(17):  # 17 x 80 KiB = 1.33 MiB > 256 KiB + 1 MiB of slack
                yield rng.randbytes(80 * 1024)
            yield b"\r\n--b0undary--\r\n"

        resp = await http.post(
            "/workspaces",
            content=chunks(),
            headers={**OP, "Content-Type": "multipart/form-data; boundary=b0undary"},
        )
        assert _jobs_error(resp, 413, "PAYLOAD_TOO_LARGE")["detail"]["limit"] == 256 * 1024 + 1024 * 1024
        declared = await _upload(http, rng.randbytes(1_400_000), "victim")  # refused on its Content-Length
        assert _jobs_error(declared, 413, "PAYLOAD_TOO_LARGE")["detail"]["limit"] == 256 * 1024 + 1024 * 1024
    assert _leftovers(root) == []
    assert await p.kernel.store.stream_version("workspace-victim") == 0
    assert await p.kernel.store.stream_version("workspace-ok") == 0


async def test_a_failed_audit_event_takes_the_upload_back(
    platform_factory: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    p = await _platform(platform_factory, tmp_path)
    root = tmp_path / "ws"
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        assert (await _upload(http, _tgz([("a.txt", b"old")]), "proj")).status_code == 201

        async def broken_commit(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("the event store went away")

        monkeypatch.setattr(p.kernel, "commit", broken_commit)
        fresh = await _upload(http, _tgz([("a.txt", b"new")]), "fresh")
        assert fresh.status_code == 500, fresh.text
        replace = await _upload(http, _tgz([("a.txt", b"new")]), "proj", replace="true")
        assert replace.status_code == 500, replace.text
    assert _leftovers(root) == ["proj"]
    assert (root / "proj" / "files" / "a.txt").read_bytes() == b"old"


async def test_workspace_scopes(platform_factory: Any, tmp_path: Path) -> None:
    p = await _platform(platform_factory, tmp_path)
    archive = _tgz([("a.txt", b"x")])
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        _jobs_error(await _upload(http, archive, "w", headers={}), 401, "UNAUTHORIZED")
        _jobs_error(await _upload(http, archive, "w", headers={"Authorization": "Bearer nope"}), 401, "UNAUTHORIZED")
        _jobs_error(await http.get("/workspaces"), 401, "UNAUTHORIZED")
        viewer = {"Authorization": "Bearer view-token"}
        denied = _jobs_error(await _upload(http, archive, "w", headers=viewer), 403, "FORBIDDEN")
        assert "workspaces:write" in denied["error"]
        _jobs_error(await http.get("/workspaces", headers={"Authorization": "Bearer rev-token"}), 403, "FORBIDDEN")
        assert (await _upload(http, archive, "w", headers={"Authorization": "Bearer svc-token"})).status_code == 201
        assert (await http.get("/workspaces", headers=viewer)).status_code == 200
    assert [w["name"] for w in ws.list_workspaces(p.settings)] == ["w"]


async def test_the_audit_log_records_uploads(platform_factory: Any, tmp_path: Path) -> None:
    p = await _platform(platform_factory, tmp_path)
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        assert (await _upload(http, _tgz([("a.txt", b"x")]), "audited")).status_code == 201
        deadline = time.monotonic() + 20
        while True:
            body = (await http.get("/v1/audit-events", headers=OP)).json()
            found = [e for e in body["events"] if e["event_type"] == "workspace.uploaded"]
            if found or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    assert found, body
    assert found[0]["actor"] == "op"
    assert found[0]["payload"]["name"] == "audited"


def test_workspace_dir_refuses_bad_names_and_unknown_workspaces(tmp_path: Path) -> None:
    from kneo_events.errors import InvalidRequest, NotFound
    from kneo_events.settings import Settings

    settings = Settings(KNEO_WORKSPACE_ROOT=str(tmp_path))
    for bad in ("/workspaces/../etc", "../etc", "/etc/passwd", ""):
        try:
            ws.workspace_dir(settings, bad)
        except InvalidRequest:
            continue
        raise AssertionError(f"{bad!r} was accepted")
    try:
        ws.workspace_dir(settings, "/workspaces/missing")
    except NotFound:
        pass
    else:
        raise AssertionError("a missing workspace was found")
    assert ws.workspace_root(Settings(KNEO_DATA_DIR=str(tmp_path / "d"))) == (tmp_path / "d" / "workspaces")
    assert os.path.isabs(ws.workspace_root(Settings()))
