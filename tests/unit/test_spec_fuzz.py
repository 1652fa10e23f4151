"""Fuzzing: mutated specs and hostile text always come back as diagnostics, never as a traceback."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kneo_compiler.spec import check, parse_yaml, validate

SEED = parse_yaml((Path(__file__).resolve().parents[2] / "examples" / "research_agent.yaml").read_text())
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8), st.just("{steps.x}")
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, (*prefix, i))
    return out


ALL_PATHS = [p for p in paths(SEED) if p]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), VALUES, st.booleans()), min_size=1, max_size=4))
def test_mutated_specs_yield_diagnostics(mutations: list[tuple[tuple[Any, ...], Any, bool]]) -> None:
    spec = copy.deepcopy(SEED)
    for path, value, delete in mutations:
        parent: Any = spec
        try:
            for key in path[:-1]:
                parent = parent[key]
            if delete and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    for env in (None, "prod"):
        _, diags = validate(spec, env)
        assert isinstance(diags, list)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_arbitrary_text_yields_diagnostics(text: bytes | str) -> None:
    result = check(text)
    assert result.spec is not None or result.diagnostics


def test_hostile_inputs_are_bounded() -> None:
    hostile = [
        "a: " + "[" * 100_000,
        "a: " + "{x: " * 5000,
        "- " * 3000 + "x",
        "a: &a [1]\nb: *a\n",
        "x: !!python/object/apply:os.system [ls]\n",
        "x: !!binary aGVsbG8=\n",
        "x: !!set {a, b}\n",
        b"\x89PNG\r\n\x1a\n\x00\x00",
        "version: v1\n" + "k: v\n" * 40_000,
        "? [a, b]\n: c\n",
    ]
    for text in hostile:
        started = time.perf_counter()
        result = check(text)
        assert result.diagnostics and not result.valid, text[:40]
        assert time.perf_counter() - started < 5
