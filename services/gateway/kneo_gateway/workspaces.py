"""Workspaces: uploaded ``.tar.gz`` trees that jobs mount (seeds/000 "Workspace Templating", docs/workspaces.md).

Layout under the workspace root (``KNEO_WORKSPACE_ROOT``, default ``<KNEO_DATA_DIR>/workspaces``)::

    <root>/<name>/files/           the tree a job's ``workspace_path: /workspaces/<name>`` copies into its sandbox
    <root>/<name>/workspace.json   the manifest (files, bytes, sha256, uploaded_at, uploaded_by)
    <root>/.staging/<id>/          an upload being unpacked (same filesystem, so moving it into place is one rename)
    <root>/.trash/<id>/            a replaced workspace on its way out

An archive is unpacked by :func:`unpack` into a staging directory, member by member, refusing anything unsafe: absolute
paths, ``..``, links of any kind, devices, FIFOs and sparse files, duplicate paths, and archives whose decompressed
stream outgrows the caps (total bytes, ratio to the compressed size, member count) — counted while decompressing, so
no header can lie its way past them. :func:`install` then renames the staging directory into place (atomic: two
uploads of one name cannot both win) and :meth:`Installed.rollback` undoes that if the audit event cannot be recorded.
The disk is the truth of which workspaces exist; ``GET /workspaces`` lists the manifests found there.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import re
import shutil
import tarfile
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from kneo_events.errors import InvalidRequest, InvalidState, NotFound, PayloadTooLarge, ResourceLocked
from kneo_events.settings import Settings

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MOUNT_PREFIX = "/workspaces/"
FILES = "files"
MANIFEST = "workspace.json"
STAGING = ".staging"
TRASH = ".trash"
# Below this many decompressed bytes the ratio cap does not apply: a tar's headers and padding alone compress
# ~70:1, so a small, honest archive would otherwise trip it.
RATIO_FLOOR_BYTES = 1_048_576
MAX_MEMBER_PATH_CHARS = 1024
_CHUNK = 65_536
_STALE_SECONDS = 3600.0


class WorkspaceExists(InvalidState):
    """A workspace of that name exists and the upload did not ask to replace it."""

    code = "workspace_exists"


@dataclass(frozen=True)
class Limits:
    """The caps an upload must stay under (all settings, docs/workspaces.md)."""

    max_upload_bytes: int
    max_bytes: int
    max_files: int
    max_ratio: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The caps configured by ``KNEO_WORKSPACE_MAX_*``."""
        return cls(
            settings.workspace_max_upload_bytes,
            settings.workspace_max_bytes,
            settings.workspace_max_files,
            settings.workspace_max_ratio,
        )


# ---------------------------------------------------------------- names and paths (what the jobs routes call)


def workspace_root(settings: Settings) -> Path:
    """Where workspaces live: ``KNEO_WORKSPACE_ROOT``, or ``<KNEO_DATA_DIR>/workspaces``."""
    root = settings.workspace_root if settings.workspace_root is not None else settings.data_dir / "workspaces"
    return root.absolute()


def validate_name(name: str) -> str:
    """``name`` if it is a valid workspace name (1-64 of ``A-Z a-z 0-9 _ -``, starting with a letter or digit)."""
    if not NAME_PATTERN.match(name):
        raise InvalidRequest(
            "a workspace name is 1-64 characters of A-Z, a-z, 0-9, '-' and '_', starting with a letter or digit",
            detail={"field": "name", "value": name[:100]},
        )
    return name


def name_of(workspace_path: str) -> str:
    """The workspace name in a job's ``workspace_path`` (``/workspaces/my-project`` or just ``my-project``)."""
    raw = workspace_path.strip()
    if raw.startswith(MOUNT_PREFIX):
        raw = raw[len(MOUNT_PREFIX) :]
    return validate_name(raw.rstrip("/"))


def workspace_dir(settings: Settings, name: str) -> Path:
    """The directory holding workspace ``name``'s files, for a job to copy into its sandbox.

    ``name`` may also be a job's ``workspace_path`` (``/workspaces/<name>``). Raises ``InvalidRequest`` (400) for
    an invalid name and ``NotFound`` (404) when no such workspace was uploaded. The tree holds only regular files
    and directories (uploads refuse links and special files), so copying it can never reach outside it.
    """
    ws = name_of(name)
    files = workspace_root(settings) / ws / FILES
    if not files.is_dir():
        raise NotFound(f"workspace {ws} not found", detail={"name": ws})
    return files


def list_workspaces(settings: Settings) -> list[dict[str, Any]]:
    """Every workspace's manifest, sorted by name (read from disk: the disk is the truth)."""
    root = workspace_root(settings)
    out: list[dict[str, Any]] = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return out
    for entry in entries:
        if not NAME_PATTERN.match(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        manifest = _read_manifest(Path(entry.path))
        if manifest is not None:
            out.append(manifest)
    return out


def get_workspace(settings: Settings, name: str) -> dict[str, Any]:
    """One workspace's manifest, or ``NotFound``."""
    ws = validate_name(name)
    manifest = _read_manifest(workspace_root(settings) / ws)
    if manifest is None:
        raise NotFound(f"workspace {ws} not found", detail={"name": ws})
    return manifest


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        data = orjson.loads((directory / MANIFEST).read_bytes())
    except (FileNotFoundError, NotADirectoryError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and (directory / FILES).is_dir() else None


# ---------------------------------------------------------------- unpacking


@dataclass
class Unpacked:
    """A staged upload: its directory (``files/`` + ``workspace.json``) and what the manifest says."""

    staging: Path
    manifest: dict[str, Any]


class _Compressed(io.RawIOBase):
    """The upload as read: counted and hashed as gzip pulls it (the sha256 is of the bytes received)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.size = 0
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        self.size += len(data)
        self.sha.update(data)
        buffer[: len(data)] = data
        return len(data)


class _Decompressed:
    """The decompressed tar stream with a running count: past ``limit`` bytes it raises, whatever headers say."""

    def __init__(self, source: IO[bytes], limit: int, reason: str) -> None:
        self.source = source
        self.limit = limit
        self.reason = reason
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""
        want = _CHUNK if size is None or size < 0 else min(size, self.limit - self.count + 1)
        data = self.source.read(max(want, 1))
        self.count += len(data)
        if self.count > self.limit:
            raise PayloadTooLarge(self.reason, detail={"limit": self.limit})
        return data


def unpack(archive: IO[bytes], archive_size: int, root: Path, name: str, limits: Limits, actor: str) -> Unpacked:
    """Unpack a ``.tar.gz`` into a new staging directory under ``root``; on any refusal nothing is left behind.

    Blocking (file I/O and decompression): call it from a worker thread.
    """
    validate_name(name)
    if archive_size > limits.max_upload_bytes:
        raise PayloadTooLarge(
            f"the archive is {archive_size} bytes; the limit is {limits.max_upload_bytes}",
            detail={"limit": limits.max_upload_bytes, "field": "workspace"},
        )
    if archive_size == 0:
        raise InvalidRequest("the archive is empty", detail={"field": "workspace"})
    staging_root = root / STAGING
    staging_root.mkdir(parents=True, exist_ok=True)
    _sweep(staging_root)
    _sweep(root / TRASH)
    staging = staging_root / uuid.uuid4().hex
    files_dir = staging / FILES
    files_dir.mkdir(parents=True)
    try:
        compressed = _Compressed(archive)
        stats = _extract(compressed, archive_size, files_dir, limits)
        _hoist_single_directory(staging)
        manifest = {
            "name": name,
            "path": MOUNT_PREFIX + name,
            "files": stats.files,
            "bytes": stats.bytes,
            "sha256": compressed.sha.hexdigest(),
            "archive_bytes": compressed.size,
            "uploaded_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "uploaded_by": actor,
        }
        (staging / MANIFEST).write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        return Unpacked(staging, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@dataclass
class _Stats:
    files: int = 0
    dirs: int = 0
    members: int = 0
    bytes: int = 0


def _extract(compressed: _Compressed, archive_size: int, dest: Path, limits: Limits) -> _Stats:
    ratio_cap = max(RATIO_FLOOR_BYTES, int(archive_size * limits.max_ratio))
    if ratio_cap < limits.max_bytes:
        limit = ratio_cap
        reason = (
            f"the archive expands more than {limits.max_ratio:g} times its size (a decompression bomb?); "
            f"refused after {limit} bytes"
        )
    else:
        limit = limits.max_bytes
        reason = f"the unpacked archive exceeds {limits.max_bytes} bytes"
    stats = _Stats()
    seen: set[tuple[str, ...]] = set()
    try:
        with gzip.GzipFile(fileobj=io.BufferedReader(compressed, _CHUNK), mode="rb") as gz:
            stream = _Decompressed(gz, limit, reason)
            # "r|": a forward-only stream, so every byte passes the running count; nothing seeks past it.
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[arg-type]
                for member in tar:
                    stats.members += 1
                    if stats.members > limits.max_files:
                        raise PayloadTooLarge(
                            f"the archive has more than {limits.max_files} members",
                            detail={"limit": limits.max_files},
                        )
                    _extract_member(tar, member, dest, seen, stats)
    except (gzip.BadGzipFile, zlib.error, EOFError, tarfile.TarError) as exc:
        raise InvalidRequest(
            "the upload is not a valid .tar.gz archive", detail={"field": "workspace", "reason": str(exc)[:200]}
        ) from None
    if stats.files == 0:
        raise InvalidRequest("the archive contains no files", detail={"field": "workspace"})
    return stats


def _refuse(member: tarfile.TarInfo, why: str) -> InvalidRequest:
    return InvalidRequest(f"unsafe archive member {member.name[:200]!r}: {why}", detail={"member": member.name[:200]})


def _member_parts(member: tarfile.TarInfo) -> tuple[str, ...]:
    name = member.name
    if "\x00" in name:
        raise _refuse(member, "the name contains a NUL character")
    if len(name) > MAX_MEMBER_PATH_CHARS:
        raise _refuse(member, f"the path is longer than {MAX_MEMBER_PATH_CHARS} characters")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise _refuse(member, "absolute paths are not allowed")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _refuse(member, "'..' in a path is not allowed")
    if any(len(p.encode()) > 255 for p in parts):
        raise _refuse(member, "a path component is longer than 255 bytes")
    return parts


def _extract_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, seen: set[tuple[str, ...]], stats: _Stats
) -> None:
    parts = _member_parts(member)
    if member.issym() or member.islnk():
        raise _refuse(member, "links are not allowed in a workspace (archive with `tar --dereference`)")
    if member.issparse():
        raise _refuse(member, "sparse files are not allowed")
    if not (member.isdir() or member.isreg()):
        raise _refuse(member, "only regular files and directories are allowed (no devices, FIFOs or other types)")
    if not parts:
        if member.isdir():
            return  # "./": the archive's root
        raise _refuse(member, "a file needs a name")
    # Second line of defence: Python's own "data" filter must agree the member is harmless.
    try:
        tarfile.data_filter(member, str(dest))
    except tarfile.FilterError as exc:
        raise _refuse(member, str(exc)) from None
    target = dest.joinpath(*parts)
    if not target.absolute().is_relative_to(dest.absolute()):
        raise _refuse(member, "the path leaves the workspace")
    if member.isdir():
        try:
            target.mkdir(mode=0o755, parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise _refuse(member, "the path is already a file in the archive") from None
        seen.add(parts)
        stats.dirs += 1
        return
    if parts in seen:
        raise _refuse(member, "the path appears twice in the archive")
    seen.add(parts)
    try:
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise _refuse(member, "a parent of the path is a file in the archive") from None
    mode = 0o755 if member.mode & 0o111 else 0o644  # keep "executable", drop setuid/setgid/sticky and ownership
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags, mode)
    except (FileExistsError, IsADirectoryError):
        raise _refuse(member, "the path appears twice in the archive") from None
    source = tar.extractfile(member)
    assert source is not None  # a regular file always has a data stream
    written = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(_CHUNK):
            out.write(chunk)
            written += len(chunk)
    if written != member.size:
        raise _refuse(member, "the archive is truncated")
    os.chmod(target, mode)  # the umask may have narrowed it
    stats.files += 1
    stats.bytes += written


def _hoist_single_directory(staging: Path) -> None:
    """``tar -czf x.tar.gz dir/`` holds one top directory: the workspace is its contents (docs/workspaces.md)."""
    files = staging / FILES
    entries = list(files.iterdir())
    if len(entries) != 1 or not entries[0].is_dir() or entries[0].is_symlink():
        return
    hoisted = staging / "hoisted"
    os.rename(entries[0], hoisted)
    os.rmdir(files)
    os.rename(hoisted, files)


def _sweep(directory: Path) -> None:
    """Remove what a crashed upload left in ``.staging`` / ``.trash`` (older than an hour)."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    cutoff = time.time() - _STALE_SECONDS
    for entry in entries:
        try:
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                shutil.rmtree(entry.path, ignore_errors=True)
        except FileNotFoundError:
            continue


# ---------------------------------------------------------------- installing


@dataclass
class Installed:
    """A workspace moved into place; :meth:`rollback` restores what was there before, :meth:`finish` cleans up."""

    target: Path
    previous: Path | None  # the replaced workspace, parked in .trash until finish()

    @property
    def replaced(self) -> bool:
        """Whether an existing workspace was replaced."""
        return self.previous is not None

    def finish(self) -> None:
        """Delete the replaced workspace (if any)."""
        if self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)

    def rollback(self) -> None:
        """Take the new workspace out again and put the replaced one (if any) back."""
        doomed = _trash_slot(self.target.parent)
        os.rename(self.target, doomed)
        if self.previous is not None:
            os.rename(self.previous, self.target)
        shutil.rmtree(doomed, ignore_errors=True)


def _trash_slot(root: Path) -> Path:
    trash = root / TRASH
    trash.mkdir(parents=True, exist_ok=True)
    return trash / uuid.uuid4().hex


def install(root: Path, name: str, staged: Unpacked, replace: bool) -> Installed:
    """Move a staged upload into place as workspace ``name`` (one rename: readers see the old tree or the new one).

    An existing workspace is a :class:`WorkspaceExists` (409) unless ``replace``; then it is moved aside first.
    On any failure the staging directory is removed.
    """
    target = root / validate_name(name)
    try:
        try:
            os.rename(staged.staging, target)  # refuses a non-empty target: of two concurrent uploads one wins
            return Installed(target, None)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if not replace:
            raise WorkspaceExists(
                f"workspace {name} exists; upload with replace=true to replace it", detail={"name": name}
            )
        previous = _trash_slot(root)
        try:
            os.rename(target, previous)
        except FileNotFoundError:
            previous = None  # removed meanwhile: nothing to replace
        try:
            os.rename(staged.staging, target)
        except OSError as exc:
            if previous is not None:
                os.rename(previous, target)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise ResourceLocked(
                    f"workspace {name} is being uploaded by another request; retry", detail={"name": name}
                ) from None
            raise
        return Installed(target, previous)
    except BaseException:
        shutil.rmtree(staged.staging, ignore_errors=True)
        raise
