"""Stub tools and helpers referenced by research_agent.yaml and the workflow examples.

Ship-quality replacements would call real services; these return formatted strings so the agent loop has something
to do, offline and deterministically.
"""

from __future__ import annotations

from typing import Any


def web_search(query: str, limit: int = 3) -> list[dict[str, str]]:
    """Pretend to search the web: ``limit`` results about ``query``."""
    return [
        {"title": f"{query} — source {i + 1}", "url": f"https://en.wikipedia.org/wiki/Result_{i + 1}"}
        for i in range(limit)
    ]


def webpage_reader(url: str) -> str:
    """Pretend to fetch a page and return its text."""
    return f"Contents of {url}: a short, well-sourced article."


def summarize(text: str, max_words: int = 60) -> str:
    """Keep the first ``max_words`` words."""
    return " ".join(text.split()[:max_words])


def compress_history(messages: list[dict[str, Any]], keep: int = 6) -> list[dict[str, Any]]:
    """Fold everything but the last ``keep`` messages into one summary message."""
    if len(messages) <= keep:
        return messages
    older = " ".join(str(m.get("content", "")) for m in messages[:-keep])
    return [{"role": "system", "content": "Earlier: " + summarize(older)}, *messages[-keep:]]


def reject_empty_input(text: str) -> bool:
    """Input guardrail: refuse an empty request."""
    return bool(text.strip())


def require_citation(text: str) -> bool:
    """Output guardrail: the answer mentions a source."""
    return "http" in text or "source" in text.lower()


def merge_reviews(outputs: dict[str, str]) -> str:
    """Aggregation for concurrent reviews: one section per reviewer."""
    return "\n\n".join(f"## {name}\n{text}" for name, text in outputs.items())


def needs_revision(text: str) -> bool:
    """Graph condition helper: whether a review asks for changes."""
    return "REVISE" in text
