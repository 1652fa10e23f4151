"""Rate limits hold on the Jobs and Knap faces too: headers on every answer to a limited key, then 429 with
Retry-After in each face's own envelope."""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import SecretStr


async def test_jobs_and_knap_faces_are_rate_limited_in_their_envelopes(platform_factory: Any) -> None:
    p = await platform_factory(api_keys=SecretStr("ops:ops-token:operator"), rate_limit="3/3600", rate_limits="")
    h = {"Authorization": "Bearer ops-token"}
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        seen = []
        for _ in range(3):
            resp = await http.get("/jobs", headers=h)
            assert resp.status_code == 200
            seen.append(int(resp.headers["x-ratelimit-remaining"]))
            assert resp.headers["x-ratelimit-limit"] == "3" and int(resp.headers["x-ratelimit-reset"]) > 0
        assert seen == [2, 1, 0]
        jobs = await http.get("/jobs", headers=h)
        assert jobs.status_code == 429 and int(jobs.headers["retry-after"]) >= 1
        assert jobs.json()["code"] == "RATE_LIMITED" and set(jobs.json()) == {"error", "detail", "code"}
        knap = await http.post(
            "/api/knap-tools/run",
            json={"messages": [{"role": "user", "content": "x"}], "tool_types": [{"tool_type": "gmail"}]},
            headers=h,
        )
        assert knap.status_code == 429 and set(knap.json()) == {"detail"} and int(knap.headers["retry-after"]) >= 1
        kneo = await http.get("/v1/runs", headers=h)
        assert kneo.status_code == 429 and kneo.json()["error"] == "rate_limited"
