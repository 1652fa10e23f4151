"""Service connection profiles and the one rule that picks the service (and API key) a command talks to.

Profiles live in ``KNEO_SERV_PROFILES_PATH`` (default ``~/.kneo_serv/profiles.json``), written atomically with
owner-only permissions (0600, in a 0700 folder)::

    {"version": 1, "active": "local",
     "profiles": {"local": {"service_url": "http://127.0.0.1:8000", "api_key_env": "LOCAL_KEY"},
                  "staging": {"service_url": "https://staging.example.com", "api_key": "<stored on request>"}}}

A profile names its key either by environment variable (``api_key_env``, nothing secret on disk) or stores it
(``api_key``, only when the user passes ``--api-key``). Nothing here ever returns a key in a printable view: see
:meth:`Profile.public` and :meth:`Connection.public`.

Which service (seeds/004 "Profiles", with ``KNEO_SERV_URL`` kept from before profiles existed):

1. ``--service-url`` (plus the API key of ``--profile``, when given);
2. an explicit ``--profile``;
3. ``KNEO_SERV_URL`` (or ``KNEO_SERVICE_URL``);
4. ``service.default_url`` of the project config (``.kneo/config.yaml``);
5. the active profile;
6. the caller's default: ``http://127.0.0.1:8000``, or ``None`` for ``kneo run`` (run in-process).

Which key: an explicitly named profile's own key wins (the flag is the most specific thing the user said); otherwise
``KNEO_API_KEY`` then ``KNEO_SERV_API_KEY``; otherwise the key of the profile the URL came from. A profile's key is
only ever sent to that profile's URL or to ``--service-url`` given together with ``--profile``.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

PROFILES_PATH_ENV = "KNEO_SERV_PROFILES_PATH"
DEFAULT_PROFILES_PATH = "~/.kneo_serv/profiles.json"
KEY_ENV_VARS = ("KNEO_API_KEY", "KNEO_SERV_API_KEY")
URL_ENV_VARS = ("KNEO_SERV_URL", "KNEO_SERVICE_URL")
DEFAULT_SERVICE_URL = "http://127.0.0.1:8000"
REDACTED = "***REDACTED***"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class ProfileError(ValueError):
    """A profile that does not exist, a bad name or URL, or an unreadable profiles file."""


@dataclass(frozen=True)
class Profile:
    """One named service connection."""

    name: str
    service_url: str
    api_key: str | None = None
    api_key_env: str | None = None
    updated_at: str | None = None

    def key(self, environ: Mapping[str, str]) -> tuple[str | None, str | None]:
        """``(key, where it came from)``: the variable named by ``api_key_env`` if set, else the stored key."""
        if self.api_key_env and environ.get(self.api_key_env):
            return environ[self.api_key_env], self.api_key_env
        if self.api_key:
            return self.api_key, f"the api_key stored in profile {self.name!r}"
        return None, None

    def public(self, environ: Mapping[str, str], active: str | None) -> dict[str, Any]:
        """The profile as the CLI shows it: the key redacted, with whether one is configured and available."""
        key, source = self.key(environ)
        return {
            "name": self.name,
            "service_url": self.service_url,
            "active": self.name == active,
            "authenticated": key is not None,
            "api_key": REDACTED if key else None,
            "api_key_stored": self.api_key is not None,
            "api_key_env": self.api_key_env,
            "api_key_source": source,
            "updated_at": self.updated_at,
        }

    def to_json(self) -> dict[str, Any]:
        stored: dict[str, Any] = {"service_url": self.service_url}
        if self.api_key:
            stored["api_key"] = self.api_key
        if self.api_key_env:
            stored["api_key_env"] = self.api_key_env
        if self.updated_at:
            stored["updated_at"] = self.updated_at
        return stored


@dataclass
class Profiles:
    """The content of the profiles file."""

    active: str | None = None
    profiles: dict[str, Profile] = field(default_factory=dict)


def validate_url(url: str) -> str:
    """An ``http(s)://`` URL without a trailing slash, or :class:`ProfileError`."""
    url = url.strip()
    if not re.match(r"^https?://[^\s/]+", url):
        raise ProfileError(f"service URL must start with http:// or https://, got {url!r}")
    return url.rstrip("/")


class ProfileStore:
    """Reads and writes the profiles file (atomic replace, mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ProfileStore:
        """The store at ``KNEO_SERV_PROFILES_PATH`` (default ``~/.kneo_serv/profiles.json``)."""
        return cls(Path(environ.get(PROFILES_PATH_ENV) or DEFAULT_PROFILES_PATH).expanduser())

    def load(self) -> Profiles:
        """The stored profiles (none when the file does not exist)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return Profiles()
        except OSError as exc:
            raise ProfileError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            data = orjson.loads(raw)
            profiles = {
                name: Profile(
                    name=name,
                    service_url=str(p["service_url"]),
                    api_key=p.get("api_key") or None,
                    api_key_env=p.get("api_key_env") or None,
                    updated_at=p.get("updated_at"),
                )
                for name, p in (data.get("profiles") or {}).items()
            }
            active = data.get("active")
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            raise ProfileError(f"{self.path} is not a valid profiles file; fix or delete it") from None
        return Profiles(active if active in profiles else None, profiles)

    def save(self, state: Profiles) -> None:
        """Write the file atomically: a 0600 temporary file in the same folder, fsynced, then renamed over it."""
        body = {
            "version": 1,
            "active": state.active,
            "profiles": {name: p.to_json() for name, p in sorted(state.profiles.items())},
        }
        data = orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n"
        folder = self.path.parent
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=folder)  # mode 0600
        except OSError as exc:
            raise ProfileError(f"cannot write {self.path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def get(self, name: str) -> Profile:
        """The named profile, or :class:`ProfileError` listing the known ones."""
        state = self.load()
        if name not in state.profiles:
            known = ", ".join(sorted(state.profiles)) or "none; create one with `kneo config profile set`"
            raise ProfileError(f"no service profile named {name!r} in {self.path} (profiles: {known})")
        return state.profiles[name]

    def active(self) -> Profile | None:
        """The active profile, if any."""
        state = self.load()
        return state.profiles.get(state.active) if state.active else None

    def set(
        self,
        name: str,
        service_url: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = None,
        activate: bool = True,
        now: datetime | None = None,
    ) -> Profile:
        """Create or update a profile. A key not given keeps the one stored before (a new URL included)."""
        if not _NAME.match(name):
            raise ProfileError(f"invalid profile name {name!r}: 1-64 characters of letters, digits, '.', '_' and '-'")
        if api_key_env is not None and not _ENV_NAME.match(api_key_env):
            raise ProfileError(f"invalid environment variable name {api_key_env!r}")
        if api_key is not None and not api_key.strip():
            raise ProfileError("--api-key is empty")
        state = self.load()
        before = state.profiles.get(name)
        profile = Profile(
            name=name,
            service_url=validate_url(service_url),
            api_key=api_key if api_key is not None else (before.api_key if before else None),
            api_key_env=api_key_env if api_key_env is not None else (before.api_key_env if before else None),
            updated_at=(now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        state.profiles[name] = profile
        if activate or state.active is None:
            state.active = name
        self.save(state)
        return profile

    def use(self, name: str) -> Profile:
        """Make ``name`` the active profile."""
        profile = self.get(name)
        state = self.load()
        state.active = name
        self.save(state)
        return profile

    def delete(self, name: str) -> bool:
        """Delete ``name``; returns whether it was the active one (then no profile is active)."""
        self.get(name)
        state = self.load()
        del state.profiles[name]
        was_active = state.active == name
        if was_active:
            state.active = None
        self.save(state)
        return was_active


@dataclass(frozen=True)
class Connection:
    """Where a command sends its requests and with which key (``url`` None: run in-process)."""

    url: str | None
    url_source: str
    api_key: str | None = None
    key_source: str | None = None
    profile: str | None = None

    def public(self) -> dict[str, Any]:
        """Printable: the key redacted."""
        return {
            "service_url": self.url,
            "source": self.url_source,
            "profile": self.profile,
            "authenticated": self.api_key is not None,
            "api_key": REDACTED if self.api_key else None,
            "api_key_source": self.key_source,
        }

    def auth_hint(self, status: int) -> str:
        """One sentence for a 401/403 saying which key was sent and where it came from."""
        if self.api_key is None:
            where = f" with profile {self.profile!r}" if self.profile else ""
            return (
                f"no API key was sent{where}: set KNEO_API_KEY or KNEO_SERV_API_KEY, or store one with "
                "`kneo config profile set NAME --service-url URL --api-key KEY`"
            )
        if status == 403:
            return f"the API key from {self.key_source} lacks the scope this call needs"
        return f"the API key from {self.key_source} was not accepted"


def env_key(environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``KNEO_API_KEY`` or ``KNEO_SERV_API_KEY`` (first set wins), with its name."""
    for var in KEY_ENV_VARS:
        if environ.get(var):
            return environ[var], var
    return None, None


def resolve_connection(
    service_url: str | None,
    profile: str | None,
    *,
    environ: Mapping[str, str],
    store: ProfileStore,
    project_url: str | None = None,
    default: str | None = DEFAULT_SERVICE_URL,
) -> Connection:
    """Apply the precedence in the module docstring. Raises :class:`ProfileError` for an unknown ``profile``."""
    named = store.get(profile) if profile else None
    env_url = next((environ[v] for v in URL_ENV_VARS if environ.get(v)), None)
    source_profile: Profile | None = None
    url: str | None
    if service_url:
        url, source = validate_url(service_url), "--service-url"
        source_profile = named
    elif named is not None:
        url, source, source_profile = named.service_url, f"--profile {named.name}", named
    elif env_url:
        url = validate_url(env_url)
        source = next(v for v in URL_ENV_VARS if environ.get(v))
    elif project_url:
        url, source = validate_url(project_url), "service.default_url of the project config"
    elif (active := store.active()) is not None:
        url, source, source_profile = active.service_url, f"active profile {active.name}", active
    else:
        url, source = default, "default" if default else "in-process"
    key, key_source = None, None
    if named is not None:
        key, key_source = named.key(environ)
    if key is None:
        key, key_source = env_key(environ)
    if key is None and source_profile is not None:
        key, key_source = source_profile.key(environ)
    return Connection(url, source, key, key_source, source_profile.name if source_profile else None)
