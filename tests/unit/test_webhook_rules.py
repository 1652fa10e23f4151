"""Webhook rules without servers: the SSRF address classifier, URL checks, signing, sealing, backoff, pinning."""

from __future__ import annotations

import hashlib
import hmac
import socket
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest

from kneo_events.sealing import Keyring, SealError, load_keyring, parse_keys
from kneo_events.settings import Settings
from kneo_events.webhooks import address_refusal, backoff_seconds, check_url, delivery_id, sign
from kneo_webhooks.delivery import Refused, resolve_target

PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
PRIVATE = [
    "127.0.0.1",  # loopback
    "127.255.255.254",
    "10.0.0.1",  # RFC 1918
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",  # link-local: cloud metadata
    "100.64.0.1",  # carrier-grade NAT (shared)
    "0.0.0.0",  # unspecified
    "224.0.0.1",  # multicast (is_global is True for it in Python 3.11: must still be refused)
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "192.0.2.1",  # documentation
    "198.18.0.1",  # benchmarking
    "::1",
    "::",
    "fe80::1",  # link-local
    "fe80::1%eth0",  # with a zone
    "fc00::1",  # unique local
    "fd12:3456::1",
    "ff02::1",  # multicast
    "fec0::1",  # site-local (deprecated)
    "::ffff:127.0.0.1",  # IPv4-mapped loopback
    "::ffff:10.1.2.3",
    "::ffff:169.254.169.254",
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "2001:db8::1",  # documentation
]


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_refusal(address) == ""


@pytest.mark.parametrize("address", PRIVATE)
def test_non_global_addresses_are_refused(address: str) -> None:
    reason = address_refusal(address)
    assert reason, address


def test_refusal_names_what_the_address_is() -> None:
    assert "loopback" in address_refusal("127.0.0.1")
    assert "link-local" in address_refusal("169.254.169.254")
    assert "embeds 127.0.0.1" in address_refusal("::ffff:127.0.0.1")
    assert "not an IP address" in address_refusal("localhost")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://example.com/hook", ""),
        ("http://example.com:8080/a?b=c", ""),
        ("ftp://example.com/", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("example.com/hook", "http:// or https://"),
        ("https:///nohost", "no host"),
        ("https://user:pw@example.com/", "credentials"),
        ("https://example.com/#frag", "fragment"),
        ("https://example.com:99999/", "malformed"),
        ("https://exa mple.com/", "whitespace"),
        ("https://example.com/" + "a" * 2100, "longer than"),
    ],
)
def test_url_check(url: str, problem: str) -> None:
    found = check_url(url)
    assert (problem in found and found) if problem else found == ""


def test_signature_is_what_the_seeds_verify_signature_expects() -> None:
    body, secret = b'{"type":"job.completed"}', "your_webhook_secret"
    computed = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert sign(body, secret) == f"sha256={computed}"
    assert sign(body, secret) != sign(body + b" ", secret)


def test_delivery_ids_are_stable_per_webhook_event_and_type() -> None:
    ev = uuid.uuid4()
    assert delivery_id("wh_1", ev, "job.failed") == delivery_id("wh_1", ev, "job.failed")
    assert delivery_id("wh_1", ev, "job.failed") != delivery_id("wh_2", ev, "job.failed")
    assert delivery_id("wh_1", ev, "job.failed") != delivery_id("wh_1", ev, "run.failed")
    assert delivery_id("wh_1", ev, "job.failed").startswith("whd_")


def test_backoff_grows_exponentially_up_to_the_cap_with_equal_jitter() -> None:
    assert [backoff_seconds(n, 1.0, 10.0, 1.0) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff_seconds(3, 1.0, 10.0, 0.5) == 2.0


def test_sealed_secrets_open_only_with_the_key_and_for_their_owner() -> None:
    a, b = Keyring([b"a" * 32]), Keyring([b"b" * 32])
    sealed = a.seal("your_webhook_secret", "wh_1")
    assert "your_webhook_secret" not in str(sealed)
    assert a.open(sealed, "wh_1") == "your_webhook_secret"
    with pytest.raises(SealError, match="does not have"):
        b.open(sealed, "wh_1")
    with pytest.raises(SealError, match="does not open"):
        a.open(sealed, "wh_2")  # the owner is the associated data
    with pytest.raises(SealError):
        a.open({**sealed, "ct": sealed["ct"][:-2] + ("A" if sealed["ct"][-2] != "A" else "B") + "A"}, "wh_1")
    rotated = Keyring([b"c" * 32, b"a" * 32])  # a new key first, the old one still opens
    assert rotated.open(sealed, "wh_1") == "your_webhook_secret"
    assert rotated.seal("x" * 16, "wh_1")["kid"] != sealed["kid"]


def test_keys_from_the_environment_and_the_key_file(tmp_path: Path) -> None:
    assert parse_keys("61" * 32) == [b"a" * 32]
    assert len(parse_keys("YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE=, " + "62" * 32)) == 2
    with pytest.raises(ValueError, match="32 bytes"):
        parse_keys("too-short")
    with pytest.raises(ValueError, match="32 bytes"):
        Settings(KNEO_WEBHOOKS_SECRET_KEY="not-a-key")
    first = load_keyring(None, tmp_path)
    key_file = tmp_path / "webhooks.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    again = load_keyring(None, tmp_path)  # generated once, then reused
    assert again.current == first.current
    assert again.open(first.seal("s" * 20, "wh_x"), "wh_x") == "s" * 20


def test_allow_private_follows_the_embedded_default_and_the_environment_wins() -> None:
    assert Settings().webhooks_allow_private is True  # no server URLs: the local embedded platform
    external = {"KNEO_NATS_URL": "nats://n:4222", "KNEO_DATABASE_URL": "postgresql://p/db"}
    assert Settings(**external).webhooks_allow_private is False
    assert Settings(**external, KNEO_WEBHOOKS_ALLOW_PRIVATE="true").webhooks_allow_private is True
    assert Settings(KNEO_WEBHOOKS_ALLOW_PRIVATE="false").webhooks_allow_private is False
    # filling in the embedded servers' URLs later (bootstrap.resolve_infra) keeps the decision
    resolved = Settings().model_copy(update={"nats_url": "nats://127.0.0.1:4250"})
    assert resolved.webhooks_allow_private is True


def _resolver(answers: dict[str, list[str]]) -> Any:
    async def getaddrinfo(host: str, port: int, *, type: int = 0) -> list[Any]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        fam = {True: socket.AF_INET6, False: socket.AF_INET}
        return [(fam[":" in a], type, 6, "", (a, port)) for a in answers[host]]

    return getaddrinfo


async def test_targets_are_checked_after_resolution_and_pinned_to_the_checked_address() -> None:
    dns = _resolver(
        {
            "hooks.example.com": ["93.184.216.34"],
            "v6.example.com": ["2606:4700:4700::1111"],
            "localhost": ["127.0.0.1", "::1"],
            "mixed.example.com": ["93.184.216.34", "10.0.0.7"],
            "meta.example.com": ["169.254.169.254"],
        }
    )
    t = await resolve_target("https://hooks.example.com:8443/in?x=1", False, dns)
    assert t.url == "https://93.184.216.34:8443/in?x=1"
    assert t.headers == {"Host": "hooks.example.com:8443"} and t.extensions == {"sni_hostname": "hooks.example.com"}
    t6 = await resolve_target("http://v6.example.com/in", False, dns)
    assert t6.url == "http://[2606:4700:4700::1111]/in" and t6.extensions == {}
    for url, needle in [
        ("http://localhost:9/x", "localhost resolves to 127.0.0.1: 127.0.0.1 is a loopback address"),
        ("http://mixed.example.com/x", "10.0.0.7"),
        ("http://meta.example.com/latest", "link-local"),
        ("http://127.0.0.1/x", "loopback"),
        ("http://[::ffff:7f00:1]/x", "embeds 127.0.0.1"),
    ]:
        with pytest.raises(Refused, match="KNEO_WEBHOOKS_ALLOW_PRIVATE") as info:
            await resolve_target(url, False, dns)
        assert needle in str(info.value), (url, str(info.value))
    with pytest.raises(ConnectionError, match="cannot resolve"):
        await resolve_target("http://nowhere.invalid/x", False, dns)
    allowed = await resolve_target("http://localhost:9/x", True, dns)
    assert allowed.url == "http://localhost:9/x" and allowed.headers == {}
