"""Diagnostics: the stable codes of the spec language, the Diagnostic model, and the error that carries them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict

Severity = Literal["error", "warning", "info"]

# Every code the compiler can emit, with its severity and a one-line meaning (docs/spec_reference.md lists them).
CODES: dict[str, tuple[Severity, str]] = {
    # reading the text
    "E_SPEC_ENCODING": ("error", "the spec is not UTF-8 text"),
    "E_SPEC_BINARY": ("error", "the spec contains NUL or other binary control bytes"),
    "E_SPEC_TOO_LARGE": ("error", "the spec is larger than the inline spec limit"),
    "E_SPEC_TOO_DEEP": ("error", "the spec nests deeper than the nesting limit"),
    "E_YAML_PARSE": ("error", "the YAML cannot be parsed (syntax, aliases, unsupported tags)"),
    "E_YAML_DUPLICATE_KEY": ("error", "a mapping repeats a key"),
    "E_SPEC_SHAPE": ("error", "the document is not a mapping, or a key is not a string"),
    # versions and shape
    "E_SPEC_VERSION_UNSUPPORTED": ("error", "the spec declares a version this compiler does not know"),
    "W_SPEC_MIGRATION_NEEDED": ("warning", "the spec is unversioned or v0 and was migrated in memory"),
    "W_DEPRECATED_FIELD": ("warning", "a deprecated field was used (it still works)"),
    "E_SCHEMA": ("error", "a field has the wrong type, a bad value, or a required field is missing"),
    "E_UNKNOWN_FIELD": ("error", "a field is not part of the spec language"),
    "E_INLINE_SECRET": ("error", "a secret-looking field holds a literal value instead of an env-var reference"),
    "E_PROVIDER_UNAVAILABLE": ("error", "the model provider is not available"),
    "I_DEFAULT_WORKFLOW": ("info", "no workflow was declared; a one-step sequential workflow is used"),
    "I_ENVIRONMENT_NO_OVERLAY": ("info", "the selected environment has no overlay in the spec or project"),
    # references and structure
    "E_DUPLICATE_ID": ("error", "two steps, nodes, participants, tools or guardrails share an id"),
    "E_NO_STEPS": ("error", "a workflow has no steps, nodes or participants"),
    "E_UNKNOWN_TOOL": ("error", "a tool reference names no declared or imported tool"),
    "E_UNKNOWN_COMPONENT": ("error", "a ref names no declared component"),
    "E_STEP_FIELD_MISSING": ("error", "a step lacks a field its kind needs (function, prompt)"),
    "E_INVALID_IMPORT_PATH": ("error", "a function path is not `package.module:attribute`"),
    "W_PROMPT_UNKNOWN_REF": ("warning", "a prompt names `{steps.<id>}` of no earlier step"),
    "E_SELECTOR_UNKNOWN_PARTICIPANT": ("error", "a handoff selector entry is not a participant id"),
    "E_GROUP_CHAT_ROUNDS": ("error", "group-chat rounds must be at least 1"),
    "E_GRAPH_START_MISSING": ("error", "a graph workflow has no start node"),
    "E_GRAPH_START_UNKNOWN": ("error", "the graph start names no node"),
    "E_GRAPH_EDGE_UNKNOWN_NODE": ("error", "an edge starts or ends at an unknown node"),
    "E_GRAPH_UNREACHABLE_NODE": ("error", "a node cannot be reached from the start node"),
    "E_GRAPH_LOOP_NO_EXIT": ("error", "a loop has no edge that leaves it"),
    "E_GRAPH_LOOP_UNBOUNDED": ("error", "a loop has no bound (max_iterations or an edge's max_traversals)"),
    # governance
    "E_UNSAFE_TOOL_IMPORT": ("error", "a tool is implemented by a dangerous primitive (os, subprocess, …)"),
    "E_UNSAFE_FUNCTION_IMPORT": ("error", "a function is a dangerous primitive (os, subprocess, …)"),
    "W_TOOL_POLICY_UNRESTRICTED": ("warning", "a tool is selected by shorthand or declares no permissions"),
    "W_NETWORK_UNRESTRICTED": ("warning", "a tool may use the network without allowed_domains"),
    "W_SHELL_TOOL": ("warning", "a tool may run shell commands"),
    "W_FILESYSTEM_WRITE": ("warning", "a tool may write to the filesystem"),
    "W_HUMAN_APPROVAL_MISSING": ("warning", "privileged tools or unsafe imports with no human approval step"),
    # environment policy enforcement
    "E_POLICY_BLOCKED_CODE": ("error", "the environment policy blocks a diagnostic code the spec has"),
    "E_POLICY_WARNINGS": ("error", "the environment policy fails on warnings and the spec has some"),
    "E_POLICY_TOOL_PERMISSIONS": ("error", "the environment policy requires explicit tool permissions"),
    "E_POLICY_UNRESTRICTED_TOOL": ("error", "the environment policy denies unrestricted tools"),
    "E_POLICY_HUMAN_REVIEW": ("error", "the environment policy requires human review of privileged surfaces"),
    "E_POLICY_GUARDRAILS": ("error", "the environment policy requires input and output guardrails"),
    # what the runner can execute today
    "E_STEP_KIND_UNSUPPORTED": ("error", "the runner does not execute this step kind yet"),
    # project config and bundles
    "E_PROJECT_CONFIG": ("error", "the project config is invalid"),
    "E_BUNDLE_MALFORMED": ("error", "the bundle is not a Kneo spec bundle"),
    "E_BUNDLE_KEY_MISSING": ("error", "the signing key env var is not set"),
    "E_BUNDLE_DIGEST_MISMATCH": ("error", "the bundle's spec does not match its digest"),
    "E_BUNDLE_SIGNATURE_INVALID": ("error", "the bundle signature does not verify with this key"),
}


class Diagnostic(BaseModel):
    """One finding about a spec: a stable code, a severity, where, what, and what to do."""

    model_config = ConfigDict(frozen=True)
    code: str
    severity: Severity = "error"
    path: str = ""
    message: str
    suggestion: str | None = None
    line: int | None = None
    column: int | None = None


class SpecProblem(Exception):
    """The spec can't be used; ``diagnostics`` says why."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        super().__init__("; ".join(f"{d.code} {d.path}: {d.message}" for d in diagnostics))
        self.diagnostics = diagnostics


def diag(code: str, path: str, message: str, suggestion: str | None = None) -> Diagnostic:
    """Build a diagnostic with the registered severity of ``code``."""
    severity, _ = CODES[code]
    return Diagnostic(code=code, severity=severity, path=path, message=message, suggestion=suggestion)


def errors_of(diagnostics: Iterable[Diagnostic]) -> list[Diagnostic]:
    """The error-severity diagnostics."""
    return [d for d in diagnostics if d.severity == "error"]


def lint_view(diagnostics: Iterable[Diagnostic]) -> dict[str, object]:
    """The seed's lint envelope: warnings and errors only, with counts."""
    kept = [d for d in diagnostics if d.severity in ("error", "warning")]
    errors = sum(1 for d in kept if d.severity == "error")
    return {
        "clean": not kept,
        "warning_count": len(kept) - errors,
        "error_count": errors,
        "diagnostics": [d.model_dump(exclude_none=True) for d in kept],
    }


def join_path(*parts: str | int) -> str:
    """``("agent", "tools", 0, "id")`` → ``agent.tools[0].id``."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out
