"""Stub helpers for human_approval_workflow.yaml: draft a report, publish it after approval."""

from __future__ import annotations


def draft_report(topic: str) -> str:
    """A draft for the reviewer to approve, edit or reject."""
    return f"Draft report on {topic}: three findings, two risks, one recommendation."


def publish_report(text: str) -> str:
    """Pretend to publish; return where it went."""
    return f"published ({len(text)} characters) to reports/latest.md"
