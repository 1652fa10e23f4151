"""GET /console: the page is served to anyone (it holds no data); in a real browser it lists runs, follows one
live over SSE with the key typed into it, and shows its output and final status.

The browser test drives Debian's ``chromium`` through Playwright (Playwright's own browser download is not used).
A missing chromium is a failure, never a skip: .ci/run installs it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import SecretStr

from kneo_events.schemas import event_types

ROOT = Path(__file__).resolve().parents[2]
KEYS = "op:op-token:operator;view:view-token:viewer"
PROBE = "<img src=x onerror=window.__pwned=1>"  # the run's input: it comes back in the output text


async def test_the_console_page_needs_no_key_and_loads_nothing_from_outside(platform_factory: Any) -> None:
    p = await platform_factory(api_keys=SecretStr(KEYS))
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        page = await http.get("/console")
        assert (await http.get("/v1/runs")).status_code == 401  # while the API itself is locked
        head = await http.head("/console")
    assert page.status_code == 200, page.text
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    assert "<title>Kneo console</title>" in html
    assert "__KNEO_EVENT_TYPES__" not in html
    for name in event_types():  # the SSE listeners cover every registered event type
        assert f'"{name}"' in html, name
    # offline and escape-safe: no external origin, data never goes through innerHTML
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html)
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html and "document.write" not in html
    assert head.status_code in (200, 405)


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed (apt-get install -y chromium; .ci/run does it when apt is usable)")
    return path


def _spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "research_agent.yaml").read_text())
    # slow enough that the browser subscribes while the steps still stream
    spec["agent"]["model"]["params"] = {"latency_ms": 250, "chunks": 8}
    spec.pop("environments", None)
    return spec


async def test_the_console_follows_a_run_live_in_a_browser(platform_factory: Any) -> None:
    from playwright.async_api import async_playwright, expect

    chromium = _chromium()
    p = await platform_factory(api_keys=SecretStr(KEYS))
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{p.url}/console")
            # Auth is on: the page says so until a key is entered.
            await expect(page.locator("#banner")).to_contain_text("401", timeout=15_000)
            await page.fill("#api-key", "view-token")
            await page.click("#save-key")
            await expect(page.locator("#banner")).to_be_hidden(timeout=15_000)

            async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
                created = await http.post(
                    "/v1/runs",
                    json={"spec": _spec(), "input": f"console {PROBE}", "async_mode": True},
                    headers={"Authorization": "Bearer op-token"},
                )
                assert created.status_code == 202, created.text
                run_id = created.json()["run_id"]
                await page.click("#refresh")
                row = page.locator(f'tr[data-id="{run_id}"]')
                await expect(row).to_be_visible(timeout=15_000)
                await expect(row.locator("td.kind")).to_have_text("kneo")
                await expect(row.locator("td.workflow")).to_have_text("research-pipeline")
                await row.click()

                output = page.locator("#output")
                await expect(output).not_to_be_empty(timeout=20_000)  # live chunks over SSE
                await expect(page.locator("#detail-status")).to_have_text("succeeded", timeout=60_000)
                await expect(row.locator("td.status")).to_have_text("succeeded")
                await expect(page.locator("#events")).to_contain_text("run.succeeded")
                await expect(page.locator("#stream-state")).to_have_text("finished")

                final = (await http.get(f"/v1/runs/{run_id}", headers={"Authorization": "Bearer op-token"})).json()
            assert final["status"] == "succeeded"
            streamed = await output.text_content() or ""
            # The last step streamed entirely while the page watched: its whole output is in the pane, verbatim
            # (the probe's markup included: it was inserted as text, so no element was created from it).
            assert final["output_text"] in streamed, (final["output_text"], streamed)
            assert PROBE in streamed
            assert await page.locator("img").count() == 0
            assert await page.evaluate("window.__pwned === undefined")

            # Filters: a search that matches nothing hides the row; the status filter keeps it.
            await page.fill("#filter-text", "no-such-run-xyz")
            await expect(row).to_be_hidden()
            await page.fill("#filter-text", run_id[-8:])
            await expect(row).to_be_visible()
            await page.select_option("#filter-status", "succeeded")
            await expect(row).to_be_visible()
            # The key stays in this tab's sessionStorage only.
            stored = await page.evaluate("sessionStorage.getItem('kneo.console.apiKey')")
            assert stored == "view-token"
            assert await page.evaluate("localStorage.length") == 0
            assert errors == [], errors
        finally:
            await browser.close()
