"""One exception hierarchy, three envelopes: the face is chosen by the request path."""

from __future__ import annotations

from kneo_gateway.errors import face_of, render


def test_faces_by_path() -> None:
    assert face_of("/api/knap-tools/run") == "knap"
    assert [face_of(p) for p in ("/jobs", "/jobs/j1/cursor/stream", "/webhooks/w1", "/workspaces", "/console")] == [
        "jobs"
    ] * 5
    assert [face_of(p) for p in ("/v1/runs", "/runs/x", "/jobsearch", "/", "/v1/jobs")] == ["kneo"] * 5


def test_envelopes() -> None:
    assert render("/v1/runs/x", 404, "not_found", "run x not found", {"run_id": "x"}) == {
        "error": "not_found",
        "message": "run x not found",
        "run_id": "x",
    }
    assert render("/jobs/x", 404, "not_found", "job x not found", {"job_id": "x"}) == {
        "error": "job x not found",
        "detail": {"job_id": "x"},
        "code": "NOT_FOUND",
    }
    assert render("/jobs", 500, "sandbox_error", "sandbox failed", {"detail": "disk full"}) == {
        "error": "sandbox failed",
        "detail": "disk full",
        "code": "SANDBOX_ERROR",
    }
    assert render("/api/knap-tools/run", 400, "invalid_request", "unknown tool_type 'x'") == {
        "detail": "unknown tool_type 'x'"
    }
    assert render("/api/knap-tools/run", 401, "unauthorized", "missing key") == {"detail": "Not authenticated"}
