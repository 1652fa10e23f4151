"""Approved spec bundles: the spec, a canonical digest, who approved it for which environment, and an HMAC-SHA256.

The signature covers every field but itself (canonical JSON: sorted keys, no whitespace), so editing any of them —
the spec, ``approved_by``, ``environment`` — or using another key fails verification.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import orjson

from kneo_compiler.diagnostics import Diagnostic, diag

JSON = dict[str, Any]
BUNDLE_KIND = "kneo.spec.bundle"
BUNDLE_VERSION = 1
SIGNING_KEY_ENV = "KNEO_SERV_SPEC_SIGNING_KEY"


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, compact, UTF-8."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def spec_digest(spec: JSON) -> str:
    """``sha256:<hex>`` of the canonical JSON of a parsed spec."""
    return "sha256:" + hashlib.sha256(canonical_json(spec)).hexdigest()


def _signature(body: JSON, key: str) -> str:
    return hmac.new(key.encode(), canonical_json(body), hashlib.sha256).hexdigest()


def sign_bundle(
    spec: JSON, *, key: str, approved_by: str, environment: str | None, approved_at: str, plan_hash: str | None
) -> JSON:
    """A signed bundle of ``spec`` (pass the time in: this module reads no clock)."""
    body: JSON = {
        "kind": BUNDLE_KIND,
        "bundle_version": BUNDLE_VERSION,
        "spec_name": spec.get("name"),
        "environment": environment,
        "approved_by": approved_by,
        "approved_at": approved_at,
        "plan_hash": plan_hash,
        "digest": spec_digest(spec),
        "spec": spec,
    }
    return {**body, "signature": {"algorithm": "HMAC-SHA256", "value": _signature(body, key)}}


def verify_bundle(bundle: Any, key: str | None) -> list[Diagnostic]:
    """Diagnostics of a bundle: empty when its digest and signature hold for ``key``."""
    if not isinstance(bundle, dict) or bundle.get("kind") != BUNDLE_KIND or not isinstance(bundle.get("spec"), dict):
        hint = "sign one with `kneo spec bundle sign`"
        return [diag("E_BUNDLE_MALFORMED", "", "this is not a Kneo spec bundle", hint)]
    signature = bundle.get("signature")
    value = signature.get("value") if isinstance(signature, dict) else None
    if not isinstance(value, str) or (signature or {}).get("algorithm") != "HMAC-SHA256":
        return [diag("E_BUNDLE_MALFORMED", "signature", "the bundle has no HMAC-SHA256 signature")]
    out: list[Diagnostic] = []
    if spec_digest(bundle["spec"]) != bundle.get("digest"):
        out.append(diag("E_BUNDLE_DIGEST_MISMATCH", "digest", "the spec was changed after signing"))
    if not key:
        out.append(diag("E_BUNDLE_KEY_MISSING", "", "no signing key", f"set {SIGNING_KEY_ENV} or pass --key-env"))
        return out
    body = {k: v for k, v in bundle.items() if k != "signature"}
    if not hmac.compare_digest(_signature(body, key), value):
        out.append(
            diag(
                "E_BUNDLE_SIGNATURE_INVALID",
                "signature",
                "the signature does not match: the bundle was edited or signed with another key",
                "re-sign the approved spec",
            )
        )
    return out
