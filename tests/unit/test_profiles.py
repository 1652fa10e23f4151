"""Service profiles: the file (0600, atomic), the precedence of service URL and key, redaction; the SDK's typed
errors, client settings and retry transport (against httpx's in-memory transport)."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest

from kneo_client import (
    AsyncServiceClient,
    AuthError,
    ConflictError,
    NotFoundError,
    RateLimitedError,
    ServiceClient,
    ServiceError,
    ServiceUnavailable,
    ValidationError,
)
from kneo_client.client import sync_method_names
from kneo_client.errors import error_for
from kneo_client.profiles import REDACTED, ProfileError, ProfileStore, resolve_connection
from kneo_client.transport import ClientSettings, RetryTransport

SECRET = "sk-very-secret-0123456789"


@pytest.fixture
def store(tmp_path: Path) -> ProfileStore:
    return ProfileStore(tmp_path / "home" / ".kneo_serv" / "profiles.json")


def test_file_is_owner_only_and_written_atomically(store: ProfileStore) -> None:
    store.set("local", "http://127.0.0.1:8000/", api_key=SECRET)
    store.set("staging", "https://staging.example.com", api_key_env="STAGING_KEY", activate=False)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert [p.name for p in store.path.parent.iterdir()] == ["profiles.json"]  # no temporary file left behind
    data = json.loads(store.path.read_text())
    assert data["active"] == "local"
    assert data["profiles"]["local"] == {
        "service_url": "http://127.0.0.1:8000",
        "api_key": SECRET,
        "updated_at": data["profiles"]["local"]["updated_at"],
    }
    assert "api_key" not in data["profiles"]["staging"] and data["profiles"]["staging"]["api_key_env"] == "STAGING_KEY"
    # a looser file (edited by hand) is written back owner-only
    store.path.chmod(0o644)
    store.use("staging")
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.load().active == "staging"


def test_default_path_and_env_override(tmp_path: Path) -> None:
    assert ProfileStore.from_env({}).path == Path("~/.kneo_serv/profiles.json").expanduser()
    assert ProfileStore.from_env({"KNEO_SERV_PROFILES_PATH": str(tmp_path / "p.json")}).path == tmp_path / "p.json"


def test_update_keeps_the_key_delete_clears_active(store: ProfileStore) -> None:
    store.set("a", "http://a.example", api_key=SECRET)
    store.set("a", "http://a2.example")
    assert store.get("a").api_key == SECRET and store.get("a").service_url == "http://a2.example"
    store.set("b", "http://b.example", activate=False)
    assert store.load().active == "a"
    assert store.delete("a") is True and store.load().active is None
    assert store.delete("b") is False
    with pytest.raises(ProfileError, match="no service profile named 'b'"):
        store.get("b")


@pytest.mark.parametrize(
    ("name", "url", "match"),
    [("bad name", "http://x", "invalid profile name"), ("ok", "ftp://x", "must start with http")],
)
def test_invalid_profiles_are_refused(store: ProfileStore, name: str, url: str, match: str) -> None:
    with pytest.raises(ProfileError, match=match):
        store.set(name, url)
    assert not store.path.exists()


def test_corrupt_file_is_a_clear_error(store: ProfileStore) -> None:
    store.path.parent.mkdir(parents=True)
    store.path.write_text("{not json")
    with pytest.raises(ProfileError, match="not a valid profiles file"):
        store.load()


def _resolve(store: ProfileStore, url: str | None = None, profile: str | None = None, **kw: Any) -> Any:
    environ = kw.pop("environ", {})
    return resolve_connection(url, profile, environ=environ, store=store, **kw)


def test_service_url_precedence(store: ProfileStore) -> None:
    # nothing configured: the caller's default (None = run in-process)
    assert _resolve(store).url == "http://127.0.0.1:8000"
    assert _resolve(store, default=None).url is None
    store.set("active", "http://active.example", api_key="active-key")
    store.set("named", "http://named.example", api_key=SECRET, activate=False)
    # 5. the active profile
    c = _resolve(store)
    assert (c.url, c.profile, c.api_key) == ("http://active.example", "active", "active-key")
    # 4. the project's service.default_url beats the active profile, and gets no profile key
    c = _resolve(store, project_url="http://project.example")
    assert (c.url, c.api_key) == ("http://project.example", None)
    # 3. KNEO_SERV_URL beats the project
    c = _resolve(store, project_url="http://project.example", environ={"KNEO_SERV_URL": "http://env.example"})
    assert (c.url, c.url_source) == ("http://env.example", "KNEO_SERV_URL")
    # 2. an explicit --profile beats all of those
    c = _resolve(store, profile="named", environ={"KNEO_SERV_URL": "http://env.example"})
    assert (c.url, c.api_key, c.profile) == ("http://named.example", SECRET, "named")
    # 1. --service-url wins; with --profile it carries that profile's key, alone it carries none of the profiles'
    c = _resolve(store, "http://flag.example/", "named")
    assert (c.url, c.api_key) == ("http://flag.example", SECRET)
    c = _resolve(store, "http://flag.example")
    assert (c.url, c.api_key) == ("http://flag.example", None)
    with pytest.raises(ProfileError, match="no service profile named 'nope'"):
        _resolve(store, profile="nope")


def test_key_precedence_and_env_var_named_by_a_profile(store: ProfileStore) -> None:
    store.set("env", "http://env.example", api_key_env="STAGING_KEY")
    c = _resolve(store, environ={"STAGING_KEY": SECRET})
    assert (c.api_key, c.key_source) == (SECRET, "STAGING_KEY")
    c = _resolve(store)  # the variable is not set: no key
    assert c.api_key is None and "STAGING_KEY" not in c.auth_hint(401) and "KNEO_API_KEY" in c.auth_hint(401)
    # KNEO_API_KEY / KNEO_SERV_API_KEY override the active profile's key (KNEO_API_KEY first) ...
    c = _resolve(store, environ={"STAGING_KEY": SECRET, "KNEO_SERV_API_KEY": "k2", "KNEO_API_KEY": "k1"})
    assert (c.api_key, c.key_source) == ("k1", "KNEO_API_KEY")
    c = _resolve(store, environ={"STAGING_KEY": SECRET, "KNEO_SERV_API_KEY": "k2"})
    assert (c.api_key, c.key_source) == ("k2", "KNEO_SERV_API_KEY")
    assert "KNEO_SERV_API_KEY" in c.auth_hint(401)
    # ... but a profile named with --profile sends its own key
    c = _resolve(store, profile="env", environ={"STAGING_KEY": SECRET, "KNEO_SERV_API_KEY": "k2"})
    assert (c.api_key, c.key_source) == (SECRET, "STAGING_KEY")
    # and falls back to the environment when it has none
    store.set("bare", "http://bare.example", activate=False)
    assert _resolve(store, profile="bare", environ={"KNEO_API_KEY": "k1"}).api_key == "k1"


def test_views_never_contain_a_key(store: ProfileStore) -> None:
    store.set("stored", "http://s.example", api_key=SECRET)
    store.set("env", "http://e.example", api_key_env="STAGING_KEY", activate=False)
    store.set("none", "http://n.example", activate=False)
    environ = {"STAGING_KEY": SECRET + "-env"}
    views = {name: p.public(environ, store.load().active) for name, p in store.load().profiles.items()}
    conn = _resolve(store, environ=environ).public()
    text = json.dumps([views, conn])
    assert SECRET not in text
    assert views["stored"]["api_key"] == REDACTED and views["stored"]["authenticated"] is True
    assert views["env"]["api_key"] == REDACTED and views["env"]["api_key_source"] == "STAGING_KEY"
    assert views["none"]["api_key"] is None and views["none"]["authenticated"] is False
    assert conn["api_key"] == REDACTED and conn["authenticated"] is True


# ----------------------------------------------------------------------------- SDK: errors, settings, retries


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, ValidationError),
        (401, AuthError),
        (403, AuthError),
        (404, NotFoundError),
        (409, ConflictError),
        (422, ValidationError),
        (429, RateLimitedError),
        (503, ServiceUnavailable),
        (418, ServiceError),
    ],
)
def test_typed_errors_carry_the_envelope(status: int, cls: type[ServiceError]) -> None:
    body = {"error": "some_code", "message": "what happened"}
    exc = error_for(status, body, {"Retry-After": "7"})
    assert type(exc) is cls and isinstance(exc, ServiceError)
    assert (exc.status, exc.code, exc.body) == (status, "some_code", body)
    assert "what happened" in str(exc)
    if cls is RateLimitedError:
        assert isinstance(exc, RateLimitedError) and exc.retry_after == 7.0


def test_client_settings_defaults_are_the_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TIMEOUT", "RETRIES", "RETRY_BACKOFF_SECONDS"):
        monkeypatch.delenv(f"KNEO_SERV_CLIENT_{var}", raising=False)
    monkeypatch.delenv("KNEO_SERV_IDEMPOTENCY_KEY", raising=False)
    s = ClientSettings()
    assert (s.timeout, s.retries, s.retry_backoff_seconds, s.idempotency_key) == (120.0, 2, 0.25, None)
    monkeypatch.setenv("KNEO_SERV_CLIENT_RETRIES", "5")
    monkeypatch.setenv("KNEO_SERV_IDEMPOTENCY_KEY", "stable")
    s = ClientSettings()
    assert (s.retries, s.idempotency_key) == (5, "stable")


def test_sync_client_mirrors_every_async_method() -> None:
    public = {
        n
        for n in dir(AsyncServiceClient)
        if not n.startswith("_") and asyncio.iscoroutinefunction(getattr(AsyncServiceClient, n)) and n != "aclose"
    }
    assert {"create_run", "get_run", "list_runs", "resume_human_task", "validate_spec"} <= public
    assert public <= set(sync_method_names()) | {"stream_run"}
    for name in [*public, "stream_run"]:
        assert callable(getattr(ServiceClient, name)), name
        assert getattr(ServiceClient, name).__doc__ == getattr(AsyncServiceClient, name).__doc__


class Script:
    """An in-memory server answering from a list of (status, headers) and recording what it saw."""

    def __init__(self, answers: list[int | Exception], retry_after: str | None = None) -> None:
        self.answers = answers
        self.retry_after = retry_after
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        answer = self.answers[min(len(self.seen), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        headers = {"Retry-After": self.retry_after} if self.retry_after and answer >= 400 else {}
        return httpx.Response(answer, json={"error": "e", "message": f"answer {answer}"}, headers=headers)


async def _send(script: Script, method: str, retries: int = 2, **headers: str) -> httpx.Response:
    settings = ClientSettings(retries=retries, retry_backoff_seconds=0)
    transport = RetryTransport(httpx.MockTransport(script), settings)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as http:
        return await http.request(method, "/v1/runs", headers=headers, json={} if method == "POST" else None)


async def test_get_is_retried_on_transient_answers_then_succeeds() -> None:
    script = Script([503, 502, 200])
    assert (await _send(script, "GET")).status_code == 200
    assert len(script.seen) == 3
    script = Script([503, 503, 503, 200])
    assert (await _send(script, "GET")).status_code == 503  # two retries, then the last answer is returned
    assert len(script.seen) == 3
    script = Script([httpx.ConnectError("refused"), 200])
    assert (await _send(script, "GET")).status_code == 200 and len(script.seen) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_definite_answers_are_not_retried(status: int) -> None:
    script = Script([status, 200])
    assert (await _send(script, "GET")).status_code == status and len(script.seen) == 1


async def test_every_post_carries_one_idempotency_key_across_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script([503, 200])
    assert (await _send(script, "POST")).status_code == 200
    keys = [r.headers.get("Idempotency-Key") for r in script.seen]
    assert len(keys) == 2 and keys[0] and keys[0] == keys[1]
    other = Script([200])
    await _send(other, "POST")
    assert other.seen[0].headers["Idempotency-Key"] != keys[0]  # a fresh key per call
    given = Script([200])
    await _send(given, "POST", **{"Idempotency-Key": "mine"})
    assert given.seen[0].headers["Idempotency-Key"] == "mine"
    monkeypatch.setenv("KNEO_SERV_IDEMPOTENCY_KEY", "stable")
    stable = Script([200])
    settings = ClientSettings(retries=0)
    async with httpx.AsyncClient(transport=RetryTransport(httpx.MockTransport(stable), settings)) as http:
        await http.post("http://svc/v1/runs", json={})
    assert stable.seen[0].headers["Idempotency-Key"] == "stable"


async def test_rate_limited_waits_for_retry_after_and_typed_error_when_spent() -> None:
    script = Script([429, 429, 429], retry_after="0")
    transport = httpx.MockTransport(script)
    async with AsyncServiceClient("http://svc", transport=transport, retries=1, retry_backoff_seconds=0) as client:
        with pytest.raises(RateLimitedError) as info:
            await client.get_run("run_x")
    assert len(script.seen) == 2 and info.value.retry_after == 0.0 and info.value.code == "e"


async def test_async_client_raises_typed_errors() -> None:
    script = Script([404])
    async with AsyncServiceClient("http://svc", transport=httpx.MockTransport(script), retries=0) as client:
        with pytest.raises(NotFoundError) as info:
            await client.get_run("run_nope")
    assert info.value.status == 404 and info.value.body == {"error": "e", "message": "answer 404"}
