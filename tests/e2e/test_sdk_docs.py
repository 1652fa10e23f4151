"""The SDK examples of README.md and docs/sdk.md (the ```python block after each ``<!-- sdk-example -->``), taken
from the markdown as it is committed and run against `kneo service serve` with only the URL swapped."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.test_cli import cli_env, served  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow
Served = tuple[str, subprocess.Popen[str], dict[str, str]]
DOC_URL = "http://127.0.0.1:8000"


def example(doc: Path) -> str:
    """The one marked example of ``doc``."""
    found = re.findall(r"<!-- sdk-example -->\n```python\n(.*?)\n```", doc.read_text(), re.S)
    assert len(found) == 1, f"{doc}: expected one ```python block after <!-- sdk-example -->"
    code: str = found[0]
    assert DOC_URL in code
    return code


def _run(code: str, url: str, env: dict[str, str], tmp_path: Path) -> str:
    script = tmp_path / "example.py"
    script.write_text(code.replace(DOC_URL, url))
    res = subprocess.run(
        [sys.executable, str(script)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_the_readme_sdk_example_runs(served: Served, tmp_path: Path) -> None:  # noqa: F811
    url, _, env = served
    out = _run(example(ROOT / "README.md"), url, env, tmp_path)
    lines = out.splitlines()
    assert lines[0].startswith("succeeded ") and len(lines[0]) > len("succeeded ")
    assert "file_created result.json" in lines and lines[-1] == "completed completed"


def test_the_sdk_md_example_runs(served: Served, tmp_path: Path) -> None:  # noqa: F811
    url, _, env = served
    out = _run(example(ROOT / "docs" / "sdk.md"), url, env, tmp_path)
    assert "\nrun succeeded\n" in out and "not found: 404 not_found" in out
    cursor = [line.split()[1] for line in out.splitlines() if line.startswith("cursor ")]
    assert cursor[-1] == "completed" and "tool_use" in cursor
    assert re.search(r"^files \[.*'result.json'.*\]$", out, re.M)
    assert re.search(r"^knap chat chat_\S+$", out, re.M), out
