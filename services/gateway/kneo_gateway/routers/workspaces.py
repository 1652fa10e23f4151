"""Workspaces (Jobs face, seeds/000): ``POST /workspaces`` uploads a .tar.gz, ``GET /workspaces`` lists them.

The archive is unpacked safely (kneo_gateway.workspaces) into a staging directory, moved into place with one rename,
and recorded as ``workspace.uploaded`` on stream ``workspace-<name>`` for the audit trail. If the event cannot be
recorded the workspace is taken out again: an upload either happened (files and event) or did not.
"""

from __future__ import annotations

import asyncio
import math
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from starlette.datastructures import UploadFile

from kneo_events.errors import InvalidRequest
from kneo_events.schemas import WorkspaceUploaded, new_event
from kneo_gateway import workspaces as ws
from kneo_gateway.auth import Principal, require
from kneo_gateway.responses import JSONBody
from kneo_gateway.state import Gateway


class WorkspaceError(BaseModel):
    """The Jobs face's error envelope, as the workspace routes answer it."""

    error: str
    detail: Any = None
    code: str


WORKSPACE_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": WorkspaceError, "description": text}
    for code, text in (
        (400, "Invalid archive, name or form (BAD_REQUEST); detail names the member or field"),
        (401, "Missing or invalid API key (UNAUTHORIZED)"),
        (403, "The key lacks the route's scope (FORBIDDEN)"),
        (404, "No such workspace (NOT_FOUND)"),
        (409, "The name exists and replace was not asked for (CONFLICT)"),
        (413, "Over the upload, unpacked-size, ratio or member-count cap (PAYLOAD_TOO_LARGE)"),
        (429, "Rate limited (RATE_LIMITED)"),
    )
}
router = APIRouter(tags=["workspaces"], responses=WORKSPACE_ERRORS)

_ARCHIVE_FIELDS = ("workspace", "file")  # the seed's curl sends -F "workspace=@x.tar.gz"; "file" is accepted too
_SUFFIXES = (".tar.gz", ".tgz")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
MAX_PAGE = 100

_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["workspace"],
                    "properties": {
                        "workspace": {
                            "type": "string",
                            "format": "binary",
                            "description": "The .tar.gz archive (the field may also be called `file`).",
                        },
                        "name": {
                            "type": "string",
                            "pattern": ws.NAME_PATTERN.pattern,
                            "description": "The workspace name; default: the archive's file name without .tar.gz.",
                        },
                        "replace": {
                            "type": "boolean",
                            "default": False,
                            "description": "Replace a workspace of the same name (otherwise 409).",
                        },
                    },
                }
            }
        },
    }
}


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def _default_name(filename: str | None) -> str | None:
    if not filename:
        return None
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return None


def _flag(raw: str, field: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidRequest(f"{field} must be true or false", detail={"field": field})


@router.post("/workspaces", status_code=201, openapi_extra=_UPLOAD_BODY)
async def upload_workspace(
    request: Request, principal: Annotated[Principal, Depends(require("workspaces:write"))]
) -> JSONBody:
    """Upload a workspace: a .tar.gz whose files jobs can mount with ``workspace_path: /workspaces/<name>``.

    201 with the manifest. 400 for an unsafe or malformed archive or name, 409 when the name exists (unless
    ``replace=true``), 413 past the size, ratio or file-count caps. Nothing is left on disk by a refused upload.
    """
    gw = _gw(request)
    s = gw.settings
    # Auth ran first (a dependency): the body is read only for a caller allowed to upload.
    async with request.form(max_files=1, max_fields=8) as form:
        uploads = [(f, form[f]) for f in _ARCHIVE_FIELDS if f in form]
        if len(uploads) != 1 or not isinstance(uploads[0][1], UploadFile):
            raise InvalidRequest(
                "send exactly one .tar.gz as the multipart file field `workspace`",
                detail={"field": "workspace"},
            )
        upload = uploads[0][1]
        assert isinstance(upload, UploadFile)
        raw_name = form.get("name")
        if raw_name is not None and not isinstance(raw_name, str):
            raise InvalidRequest("name must be a text field", detail={"field": "name"})
        raw_replace = form.get("replace", "")
        if not isinstance(raw_replace, str):
            raise InvalidRequest("replace must be a text field", detail={"field": "replace"})
        replace = _flag(raw_replace, "replace")
        name = raw_name.strip() if raw_name and raw_name.strip() else _default_name(upload.filename)
        if name is None:
            raise InvalidRequest(
                "name the workspace: send a `name` field (or upload a file called <name>.tar.gz)",
                detail={"field": "name"},
            )
        ws.validate_name(name)
        root = ws.workspace_root(s)
        limits = ws.Limits.from_settings(s)
        size = _size(upload)
        staged = await anyio.to_thread.run_sync(ws.unpack, upload.file, size, root, name, limits, principal.name)
    installed = await anyio.to_thread.run_sync(ws.install, root, name, staged, replace)
    manifest = dict(staged.manifest)
    event = WorkspaceUploaded(
        name=name,
        files=int(manifest["files"]),
        bytes=int(manifest["bytes"]),
        sha256=str(manifest["sha256"]),
        archive_bytes=int(manifest["archive_bytes"]),
        replaced=installed.replaced,
    )
    meta = {"request_id": request.state.request_id, "actor": principal.name}
    try:
        await gw.kernel.commit(f"workspace-{name}", [new_event(event, meta)], None)
    except BaseException:
        # No audit record, no workspace: put back what was there.
        await asyncio.shield(anyio.to_thread.run_sync(installed.rollback))
        raise
    await anyio.to_thread.run_sync(installed.finish)
    manifest["replaced"] = installed.replaced
    return JSONBody(manifest, status_code=201)


def _size(upload: UploadFile) -> int:
    """The spooled upload's size (it is in memory or a local temporary file: no I/O worth a thread)."""
    upload.file.seek(0, 2)
    size = int(upload.file.tell())
    upload.file.seek(0)
    return size


@router.get("/workspaces", dependencies=[Depends(require("workspaces:read"))])
async def list_workspaces(
    request: Request,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    limit: Annotated[int, Query(ge=1, le=1_000_000)] = 20,
) -> JSONBody:
    """Uploaded workspaces by name, read from the workspace root: ``{"data": [...], "pagination": {...}}``."""
    limit = min(limit, MAX_PAGE)
    items = await anyio.to_thread.run_sync(ws.list_workspaces, _gw(request).settings)
    total = len(items)
    start = (page - 1) * limit
    return JSONBody(
        {
            "data": items[start : start + limit],
            "pagination": {"page": page, "limit": limit, "total": total, "pages": math.ceil(total / limit)},
        }
    )


@router.get("/workspaces/{name}", dependencies=[Depends(require("workspaces:read"))])
async def get_workspace(name: str, request: Request) -> JSONBody:
    """One workspace's manifest (404 when there is none)."""
    return JSONBody(await anyio.to_thread.run_sync(ws.get_workspace, _gw(request).settings, name))
