"""The CLI's one-line errors say what went wrong with the key — or that the key was fine."""

from __future__ import annotations

from kneo_client.errors import error_for
from kneo_client.profiles import Connection
from kneo_client.remote import describe

CONN = Connection("http://h", "--service-url", "secret-token", "KNEO_API_KEY")


def test_a_missing_scope_names_the_key_variable() -> None:
    exc = error_for(403, {"error": "forbidden", "message": "the API key 'v' lacks the scope human:write"})
    assert describe(exc, CONN).endswith("(the API key from KNEO_API_KEY lacks the scope this call needs)")


def test_a_reviewer_list_refusal_names_the_reviewers() -> None:
    body = {"error": "forbidden", "message": "only the step's reviewers may decide", "required_reviewer": ["rm"]}
    line = describe(error_for(403, body), CONN)
    assert line.endswith("(this task accepts decisions only from: rm)") and "lacks the scope" not in line


def test_every_face_envelope_reads_as_one_line() -> None:
    assert str(error_for(404, {"detail": "chat x not found"})) == "404: chat x not found"
    jobs = error_for(400, {"error": "Invalid job spec", "detail": "prompt is required", "code": "BAD_REQUEST"})
    assert jobs.code == "BAD_REQUEST" and str(jobs) == "400 BAD_REQUEST: Invalid job spec (prompt is required)"
