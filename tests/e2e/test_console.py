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


async def test_a_job_started_through_the_api_streams_into_the_console_without_errors(
    platform_factory: Any, tmp_path: Path
) -> None:
    """seeds/002 "Web Console": a job started with POST /jobs appears with its status, its output streams in over
    /jobs/{id}/cursor/stream, its artifacts show, and the browser console logs no error at all."""
    import json

    from playwright.async_api import async_playwright, expect

    chromium = _chromium()
    slow = {"slow": {"provider": "dummy", "name": "slow", "params": {"latency_ms": 300, "chunks": 10}}}
    p = await platform_factory(
        api_keys=SecretStr(KEYS), jobs_model_map=json.dumps(slow), sandbox_root=tmp_path / "sandboxes"
    )
    op = {"Authorization": "Bearer op-token"}
    prompt = "Write a fibonacci script"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            page.on(
                "console",
                lambda msg: errors.append(f"console: {msg.text} {msg.location}") if msg.type == "error" else None,
            )
            page.on("response", lambda r: errors.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
            # the key typed into this tab earlier: with it in sessionStorage no request is ever refused (a refused
            # fetch would itself log a console error)
            await page.add_init_script("sessionStorage.setItem('kneo.console.apiKey', 'view-token')")
            await page.goto(f"{p.url}/console")
            await expect(page.locator("#conn")).to_have_text("key in use", timeout=15_000)

            async with httpx.AsyncClient(base_url=p.url, timeout=30, headers=op) as http:
                created = await http.post(
                    "/jobs", json={"spec": {"job_type": "cursor_task", "prompt": prompt, "model": "slow"}}
                )
                assert created.status_code == 200, created.text
                job_id = created.json()["job_id"]
                await page.click("#refresh")
                row = page.locator(f'tr[data-id="{job_id}"]')
                await expect(row).to_be_visible(timeout=15_000)
                await expect(row.locator("td.kind")).to_have_text("jobs:cursor_task")
                await expect(row.locator("td.status")).to_have_text(re.compile("^(queued|running)$"))
                await row.click()

                output = page.locator("#output")
                await expect(output).not_to_be_empty(timeout=20_000)
                # it streamed in: the first output was on the page while the job was still working
                assert (await http.get(f"/jobs/{job_id}")).json()["status"] in ("queued", "running")
                await expect(output).to_contain_text("[completed]", timeout=60_000)
                await expect(row.locator("td.status")).to_have_text("completed", timeout=15_000)
                cursor = (await http.get(f"/jobs/{job_id}/cursor")).json()["events"]
                artifacts = (await http.get(f"/jobs/{job_id}/artifacts")).json()
            text = await output.text_content() or ""
            for item in cursor:  # every item of the job's transcript is in the pane
                if item["type"] == "tool_use":
                    assert f"→ {item['tool']}" in text
                elif item["type"] == "file_created":
                    assert f"+ {item['path']}" in text
                elif item["type"] == "agent_message":
                    assert item["message"] in text, (item["message"], text)
            box = page.locator("#artifacts")
            await expect(box.locator("summary")).to_have_text(list(artifacts))
            assert {"result.json", prompt} <= set(artifacts)
            await box.locator("summary", has_text="result.json").click()
            await expect(box).to_contain_text(f'"job_id": "{job_id}"')
            assert errors == [], errors
        finally:
            await browser.close()
