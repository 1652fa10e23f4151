"""Reading spec text safely: UTF-8 only, size and depth limits, no aliases, plain JSON types, and a source map.

The source map records where each path (``agent.tools[0]``) starts in the YAML so diagnostics carry line/column.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import yaml

from kneo_compiler.diagnostics import Diagnostic, SpecProblem, diag, join_path

JSON = dict[str, Any]
MAX_SPEC_BYTES = 262_144  # KNEO_SERV_MAX_INLINE_SPEC_BYTES default
MAX_DEPTH = 64


@dataclass
class SourceMap:
    """Path → (line, column), 1-based, for every node of the parsed YAML."""

    marks: dict[str, tuple[int, int]] = field(default_factory=dict)

    def find(self, path: str, environment: str | None = None) -> tuple[int, int] | None:
        """The mark of ``path`` (preferring the environment overlay's copy), or of its nearest located parent."""
        overlay = f"environments.{environment}.{path}"
        if environment and path and overlay in self.marks:
            return self.marks[overlay]
        probe = path
        while probe and probe not in self.marks:
            probe = _parent(probe)
        return self.marks.get(probe)


def _parent(path: str) -> str:
    cut = max(path.rfind("."), path.rfind("["))
    return path[:cut] if cut > 0 else ""


class _SpecLoader(yaml.SafeLoader):
    """Safe loading only; aliases are refused (no alias bombs) and nesting is bounded."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases are not allowed in specs", event.start_mark
            )
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _TooDeep(Exception):
    def __init__(self, mark: Any) -> None:
        super().__init__("too deep")
        self.mark = mark


def _located(code: str, message: str, mark: Any, suggestion: str | None = None) -> Diagnostic:
    d = diag(code, "", message, suggestion)
    if mark is None:
        return d
    return d.model_copy(update={"line": mark.line + 1, "column": mark.column + 1})


def decode(text: str | bytes, max_bytes: int = MAX_SPEC_BYTES) -> str:
    """Check size, encoding and binary content; return the text or raise :class:`SpecProblem`."""
    size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else len(text)
    if size > max_bytes:
        raise SpecProblem(
            [
                diag(
                    "E_SPEC_TOO_LARGE",
                    "",
                    f"the spec is {size} bytes; the limit is {max_bytes} (KNEO_SERV_MAX_INLINE_SPEC_BYTES)",
                    "split the spec or raise KNEO_SERV_MAX_INLINE_SPEC_BYTES",
                )
            ]
        )
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecProblem([diag("E_SPEC_ENCODING", "", f"spec is not UTF-8 text: {exc}", "save as UTF-8")]) from exc
    text = text.removeprefix("\ufeff")
    if "\x00" in text or any(ch in text for ch in "\x01\x02\x03\x04\x05\x06\x07\x08\x0e\x0f\x7f"):
        raise SpecProblem(
            [diag("E_SPEC_BINARY", "", "the spec contains binary control bytes", "pass a YAML text file")]
        )
    return text


def load(text: str | bytes, max_bytes: int = MAX_SPEC_BYTES) -> tuple[JSON, SourceMap]:
    """Parse spec text into a JSON-typed mapping and its source map, or raise :class:`SpecProblem`."""
    text = decode(text, max_bytes)
    loader: _SpecLoader | None = None
    try:
        loader = _SpecLoader(text)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except _TooDeep as exc:
        raise SpecProblem(
            [_located("E_SPEC_TOO_DEEP", f"the spec nests deeper than {MAX_DEPTH} levels", exc.mark)]
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = str(exc.problem or exc)
        raise SpecProblem([_located("E_YAML_PARSE", message, mark, "fix the YAML at the given line")]) from None
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
        raise SpecProblem([diag("E_YAML_PARSE", "", f"cannot parse the YAML: {exc}")]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        raise SpecProblem([diag("E_SPEC_SHAPE", "", "a spec must be a YAML mapping", "start with `version: v1`")])
    source = SourceMap()
    problems: list[Diagnostic] = []
    _map_node(node, "", source, problems)
    plain = to_json(data, "", problems)
    if problems:
        raise SpecProblem([_locate(d, source) for d in problems])
    return plain, source


def _locate(d: Diagnostic, source: SourceMap) -> Diagnostic:
    mark = source.find(d.path)
    return d.model_copy(update={"line": mark[0], "column": mark[1]}) if mark else d


def _map_node(node: Any, path: str, source: SourceMap, problems: list[Diagnostic]) -> None:
    source.marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = join_path(path, key) if path else key
            if key in seen:
                problems.append(diag("E_YAML_DUPLICATE_KEY", child, f"key {key!r} appears twice", "keep one of them"))
            seen.add(key)
            _map_node(value_node, child, source, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _map_node(item, f"{path}[{i}]", source, problems)


def to_json(value: Any, path: str, problems: list[Diagnostic]) -> Any:
    """Keep plain JSON types: dates become ISO strings; sets, bytes and non-string keys are problems."""
    if isinstance(value, dict):
        out: JSON = {}
        for k, v in value.items():
            if not isinstance(k, str):
                problems.append(diag("E_SPEC_SHAPE", path, f"mapping key {k!r} is not a string", "quote the key"))
                continue
            out[k] = to_json(v, join_path(path, k) if path else k, problems)
        return out
    if isinstance(value, list):
        return [to_json(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    problems.append(diag("E_YAML_PARSE", path, f"unsupported YAML value of type {type(value).__name__}"))
    return None


def parse_yaml(text: str | bytes, max_bytes: int = MAX_SPEC_BYTES) -> JSON:
    """Parse spec text into a mapping or raise :class:`SpecProblem` with a located diagnostic."""
    return load(text, max_bytes)[0]
