"""The dashboard in a real browser: Debian's Chromium (``deploy/chromium.sh``, headless, no
network) driven by Playwright, against a real stack (worker and gateway processes on loopback,
the null engine made slow enough that the tenants queue).

Under a known load (tenants of weights 1, 2 and 4, each keeping more requests in flight than
the workers take, and a fourth tenant held to one request a minute, refused the rest) the
browser logs in through the form, the page updates by itself, and the figures it shows are
those ``/metrics`` reports at the same moment: a counter scraped between two page updates lies
between them, a figure at rest equals what the page showed just before or just after the scrape
(the windowed ones move as time passes: "within one refresh"). The entitled shares are the
load's 1/7, 2/7, 4/7. Screenshots go to the test's directory and, where
``FAIRGATE_SCREENSHOT_DIR`` is set, there too.

Without Chromium (and no root to install it) the test fails with ``deploy/chromium.sh``'s
message, or skips where ``FAIRGATE_SKIP_CHROMIUM=1``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from bench.tenant_load import StackAccess, TenantLoad, run_closed_loop
from deploy.stack import Stack
from tests.deploy_scripts import require_path
from tests.gateway.conftest import start_test_stack

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHROMIUM_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "chromium.sh"
SKIP_ENV = "FAIRGATE_SKIP_CHROMIUM"
SCREENSHOT_ENV = "FAIRGATE_SCREENSHOT_DIR"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT_WIDTH, VIEWPORT_HEIGHT = 1400, 900
WEIGHTS = {"alpha": 1.0, "beta": 2.0, "gamma": 4.0}
# In flight per tenant: three tenants' 36 against workers that each run at most 8 requests at
# once (--max-num-seqs): every tenant keeps a queue, even gamma, served 4/7 of the slots.
CONCURRENCY = 12
MAX_TOKENS = 24
STACK_ENV = {
    # 20 ms a decode step: a request takes about half a second.
    "FAIRGATE_NULL_DECODE_STEP_S": "0.02",
    # Jain's index counts the tenants backlogged through the whole window: a short one shows
    # it a few seconds into the load.
    "FAIRGATE_TELEMETRY_METRICS_WINDOW_S": "8",
}
LOAD_S = 40.0  # long enough for every check under load; the load is cancelled once they pass
JAIN_SLACK = 0.05
UPDATE_TIMEOUT_S = 10.0  # the page updates about every second; a busy machine may lag


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Path:
    return require_path(CHROMIUM_SCRIPT, SKIP_ENV, "Chromium")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_test_stack(
        tmp_path_factory.mktemp("dashboard"),
        worker_args=["--log-level", "warning", "--max-num-seqs", "8"],
        env=STACK_ENV,
    )
    try:
        yield started
    finally:
        started.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def browser_page(chromium: Path) -> AsyncIterator[Any]:
    """A fresh browser context's page, 1400 × 900."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]'", pytrace=False)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(
                viewport={"width": VIEWPORT_WIDTH, "height": VIEWPORT_HEIGHT}
            )
            yield await context.new_page()
        finally:
            await browser.close()


# ---- reading the page and /metrics ----------------------------------------------------------

# Every figure of the page by where it is: {"seq", "at", "overall": {field: value}, "tenants":
# {name: {field: value}}, "workers": {id: {field: value}}} (values as the data-value strings).
_READ_PAGE = """() => {
  const fields = (scope) => {
    const out = {};
    for (const e of scope.querySelectorAll("[data-field]")) out[e.dataset.field] = e.dataset.value;
    return out;
  };
  const root = document.getElementById("dashboard");
  const page = {
    seq: Number(root.dataset.seq),
    at: Number(root.dataset.at),
    overall: fields(document.getElementById("cards")),
    tenants: {},
    workers: {},
    texts: {},  // what a person reads: each tenant's weight cell
  };
  for (const row of document.querySelectorAll("#tenants tr[data-tenant]")) {
    page.tenants[row.dataset.tenant] = fields(row);
    page.texts[row.dataset.tenant] = row.querySelector("[data-field=weight]").textContent;
  }
  for (const row of document.querySelectorAll("#workers tr[data-worker]")) {
    page.workers[row.dataset.worker] = fields(row);
  }
  return page;
}"""

Figures = dict[str, float | str | None]  # "tenant/alpha/fair_counter" -> value


def _number(value: str) -> float | str | None:
    if value == "":
        return None
    try:
        return float(value)
    except ValueError:
        return value  # a worker's state


def page_figures(page: dict[str, Any]) -> Figures:
    figures: Figures = {f"overall/{k}": _number(v) for k, v in page["overall"].items()}
    for name, fields in page["tenants"].items():
        figures |= {f"tenant/{name}/{k}": _number(v) for k, v in fields.items()}
    for worker, fields in page["workers"].items():
        figures |= {f"worker/{worker}/{k}": _number(v) for k, v in fields.items()}
    return figures


def metrics_figures(text: str, tenants: set[str]) -> Figures:
    """What /metrics says of the same figures, named as ``page_figures`` names them."""
    figures: Figures = {}
    # A sum over no series is 0 (a tenant never refused has no rejections series).
    sums = {
        f"tenant/{tenant}/{field}": 0.0
        for tenant in tenants
        for field in ("rejections", "preemptions", "requests_ok")
    }
    workers: dict[str, dict[str, float]] = {}

    def add(key: str, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + value

    by_tenant = {
        "fairgate_tenant_weight": "weight",
        "fairgate_fair_counter": "fair_counter",
        "fairgate_tenant_service_units_total": "service_units",
        "fairgate_queue_depth": "queue_depth",
        "fairgate_tenant_entitled_share": "entitled_share",
        "fairgate_tenant_service_share": "service_share",
        "fairgate_rejections_total": "rejections",
        "fairgate_preemptions_total": "preemptions",
    }
    by_class = {
        "fairgate_tenant_queue_depth": "queue_depth",
        "fairgate_tenant_slo_attainment": "ttft",
        "fairgate_tenant_tpot_attainment": "tpot",
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            tenant = labels.get("tenant")
            if tenant in tenants and name in by_tenant:
                add(f"tenant/{tenant}/{by_tenant[name]}", value)
            if tenant in tenants and name in by_class:
                figures[f"tenant/{tenant}/{by_class[name]}.{labels['slo_class']}"] = value
            if (
                tenant in tenants
                and name == "fairgate_requests_total"
                and labels["outcome"] == "ok"
            ):
                add(f"tenant/{tenant}/requests_ok", value)
            overall = {
                "fairgate_completion_tokens_total": "completion_tokens",
                "fairgate_prompt_tokens_total": "prompt_tokens",
                "fairgate_rejections_total": "rejections",
                "fairgate_preemptions_total": "preemptions",
                "fairgate_queue_depth": "queue_depth",
                "fairgate_requests_in_gateway": "in_gateway",
            }
            if name in overall:
                add(f"overall/{overall[name]}", value)
            if name == "fairgate_jain_index":
                figures["overall/jain"] = value
            if name in ("fairgate_slo_attainment", "fairgate_tpot_attainment"):
                kind = "ttft" if name == "fairgate_slo_attainment" else "tpot"
                figures[f"overall/{kind}.{labels['slo_class']}"] = value
            if name.startswith("fairgate_backend_"):
                worker = workers.setdefault(labels["worker"], {})
                if name == "fairgate_backend_worker_state" and value == 1:
                    figures[f"worker/{labels['worker']}/state"] = labels["state"]
                else:
                    worker[name.removeprefix("fairgate_backend_")] = value
    figures |= sums
    for worker_id, values in workers.items():
        for field in ("batch_size", "kv_blocks_used", "kv_blocks_total"):
            if field in values:
                figures[f"worker/{worker_id}/{field.replace('_size', '')}"] = values[field]
        prompt, cached = values.get("prompt_tokens_total", 0.0), values.get("cached_tokens_total")
        if prompt > 0 and cached is not None:
            figures[f"worker/{worker_id}/prefix_hit_rate"] = cached / prompt
    return figures


async def read_metrics(client: httpx.AsyncClient, admin_token: str, tenants: set[str]) -> Figures:
    answer = await client.get("/metrics", headers={"authorization": f"Bearer {admin_token}"})
    answer.raise_for_status()
    return metrics_figures(answer.text, tenants)


async def read_page(page: Any) -> dict[str, Any]:
    result: dict[str, Any] = await page.evaluate(_READ_PAGE)
    return result


async def next_update(page: Any, *, after_epoch: float) -> dict[str, Any]:
    """The page once it shows a snapshot built after ``after_epoch`` (the server's clock is
    this machine's). Polled with ``evaluate``: the page's Content-Security-Policy forbids the
    ``eval`` that Playwright's ``wait_for_function`` uses, as it should."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + UPDATE_TIMEOUT_S
    while (state := await read_page(page))["at"] <= after_epoch:
        if loop.time() > deadline:
            raise AssertionError(f"no update of the page within {UPDATE_TIMEOUT_S:g} s: {state}")
        await asyncio.sleep(0.05)
    return state


def close(a: float | str | None, b: float | str | None) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))
    return a == b


def within(
    before: float | str | None, value: float | str | None, after: float | str | None
) -> bool:
    """``value`` is what the page showed just before or just after, or between the two (the
    figures over a sliding window move on between a scrape and a snapshot, with nothing sent)."""
    if close(before, value) or close(after, value):
        return True
    if isinstance(before, float) and isinstance(value, float) and isinstance(after, float):
        return min(before, after) <= value <= max(before, after)
    return False


# ---- the test -------------------------------------------------------------------------------


async def _refused_tenant(client: httpx.AsyncClient, admin_token: str) -> str:
    """A tenant held to one request a minute that sends three: one served, two refused."""
    admin = {"authorization": f"Bearer {admin_token}"}
    created = await client.post(
        "/admin/v1/tenants",
        json={"name": "delta", "quotas": {"requests_per_minute": 1}},
        headers=admin,
    )
    assert created.status_code == 201, created.text
    key = (await client.post("/admin/v1/tenants/delta/keys", json={}, headers=admin)).json()
    model = (
        await client.get("/v1/models", headers={"authorization": f"Bearer {key['secret']}"})
    ).json()["data"][0]["id"]
    statuses = []
    for _ in range(3):
        answer = await client.post(
            "/v1/completions",
            json={"model": model, "prompt": "one two three", "max_tokens": 4},
            headers={"authorization": f"Bearer {key['secret']}"},
        )
        statuses.append(answer.status_code)
    assert statuses == [200, 429, 429], statuses
    return "delta"


async def _log_in(page: Any, stack: Stack, shots: Path) -> None:
    await page.goto(f"{stack.base_url}/dashboard")
    await page.wait_for_selector("[data-view=login]")
    await page.fill("#token", "not-the-admin-token-at-all")
    await page.click("button[type=submit]")
    await page.wait_for_selector(".notice")
    await page.screenshot(path=str(shots / "dashboard-login-refused.png"))
    _save(shots, "dashboard-login-refused.png")
    await page.fill("#token", stack.admin_token)
    await page.click("button[type=submit]")
    await page.wait_for_selector("[data-view=dashboard]")
    assert page.url == f"{stack.base_url}/dashboard"  # no token in the URL
    [cookie] = await page.context.cookies()
    assert stack.admin_token not in cookie["value"]
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (
        True,
        "Strict",
        "/dashboard",
    )


def _save(shots: Path, name: str) -> Path:
    path = shots / name
    target = os.environ.get(SCREENSHOT_ENV)
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)
    return path


async def _until(predicate: Any, page: Any, timeout_s: float, what: str) -> dict[str, Any]:
    """The page once ``predicate(page_state)`` holds (checked at each update)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    state = await read_page(page)
    while not predicate(state):
        if loop.time() > deadline:
            raise AssertionError(f"the page never showed {what}: {state}")
        state = await next_update(page, after_epoch=state["at"])
    return state


async def test_the_page_shows_what_metrics_reports_under_a_known_load(
    stack: Stack, browser_page: Any, tmp_path: Path
) -> None:
    page = browser_page
    tenants = {*WEIGHTS, "delta"}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30.0) as client:
        await _refused_tenant(client, stack.admin_token)
        await _log_in(page, stack, tmp_path)
        loads = [TenantLoad(name, weight, CONCURRENCY) for name, weight in WEIGHTS.items()]
        access = StackAccess(stack.base_url, stack.admin_token)
        load = asyncio.create_task(
            run_closed_loop(access, loads, LOAD_S, max_tokens=MAX_TOKENS, num_words=12)
        )
        try:
            await _check_under_load(page, client, stack, tenants, tmp_path)
        finally:
            load.cancel()
            await asyncio.gather(load, return_exceptions=True)
        await _check_at_rest(page, client, stack, tenants)


def _all_backlogged(state: dict[str, Any]) -> bool:
    rows = state["tenants"]
    return all(rows.get(name, {}).get("backlogged") == "1" for name in WEIGHTS)


async def _check_under_load(
    page: Any, client: httpx.AsyncClient, stack: Stack, tenants: set[str], shots: Path
) -> None:
    # The page updates by itself (no reload): the three tenants appear, all backlogged, with
    # their entitled shares 1/7, 2/7, 4/7; the charts have points.
    state = await _until(_all_backlogged, page, 30.0, "the three tenants backlogged")
    total_weight = sum(WEIGHTS.values())
    for name, weight in WEIGHTS.items():
        row = state["tenants"][name]
        assert float(row["weight"]) == weight and state["texts"][name] == f"{weight:g}"
        assert abs(float(row["entitled_share"]) - weight / total_weight) < 1e-9, (name, row)
    state = await _until(
        lambda s: (
            s["overall"].get("output_tokens_s") not in (None, "", "0")
            and s["overall"].get("jain", "") != ""
        ),
        page,
        30.0,
        "a throughput and Jain's index",
    )
    # Counters scraped between two page updates lie between what the page showed.
    before = await next_update(page, after_epoch=state["at"])
    scraped_after = time.time()
    scraped = await read_metrics(client, stack.admin_token, tenants)
    after = await next_update(page, after_epoch=scraped_after)
    first, last = page_figures(before), page_figures(after)
    counters = [
        key
        for key in scraped
        if key.endswith(
            (
                "/service_units",
                "/requests_ok",
                "/rejections",
                "/completion_tokens",
                "/prompt_tokens",
            )
        )
    ]
    assert len(counters) >= 2 * len(WEIGHTS), counters
    for key in counters:
        low, high, value = first.get(key), last.get(key), scraped[key]
        assert isinstance(low, float) and isinstance(high, float), (key, low, high)
        assert isinstance(value, float) and low <= value <= high, (key, low, value, high)
    for name in WEIGHTS:  # the weights and the entitled shares (all backlogged) hold still
        for field in ("weight", "entitled_share"):
            key = f"tenant/{name}/{field}"
            assert close(scraped.get(key), last.get(key)), (key, scraped.get(key), last.get(key))
    # Jain's index over an 8 s window moves each second, and a scrape samples the window
    # itself (a snapshot does not): between the two updates, give or take JAIN_SLACK.
    jain, low_jain, high_jain = (
        scraped.get("overall/jain"),
        first["overall/jain"],
        last["overall/jain"],
    )
    assert isinstance(jain, float), scraped
    assert isinstance(low_jain, float) and isinstance(high_jain, float), (low_jain, high_jain)
    low_jain, high_jain = sorted((low_jain, high_jain))
    assert low_jain - JAIN_SLACK <= jain <= high_jain + JAIN_SLACK, (low_jain, jain, high_jain)
    # Throughput: the page's output tokens/s against the counter's change over 3 s.
    start_tokens, start_t = scraped["overall/completion_tokens"], time.monotonic()
    await asyncio.sleep(3.0)
    now = await read_metrics(client, stack.admin_token, tenants)
    assert isinstance(start_tokens, float)
    rate = (float(now["overall/completion_tokens"] or 0) - start_tokens) / (
        time.monotonic() - start_t
    )
    shown = page_figures(await next_update(page, after_epoch=time.time()))[
        "overall/output_tokens_s"
    ]
    assert isinstance(shown, float) and 0.5 * rate <= shown <= 2.0 * rate, (shown, rate)
    await page.screenshot(path=str(shots / "dashboard-under-load.png"), full_page=True)
    _save(shots, "dashboard-under-load.png")


async def _check_at_rest(
    page: Any, client: httpx.AsyncClient, stack: Stack, tenants: set[str]
) -> None:
    """Once every request has ended: every figure /metrics has equals the page's just before
    or just after the scrape (a windowed one: is between them)."""
    state = await _until(
        lambda s: s["overall"].get("queue_depth") == "0" and s["overall"].get("in_gateway") == "0",
        page,
        60.0,
        "the queue empty",
    )
    before = page_figures(await next_update(page, after_epoch=state["at"]))
    scraped_after = time.time()
    scraped = await read_metrics(client, stack.admin_token, tenants)
    after = page_figures(await next_update(page, after_epoch=scraped_after))
    assert len(scraped) > 30, scraped
    mismatched = {
        key: (before.get(key), value, after.get(key))
        for key, value in scraped.items()
        if not within(before.get(key), value, after.get(key))
    }
    assert not mismatched, mismatched
    # And the other way: what the page shows of a tenant or worker, /metrics has.
    shown = {
        k
        for k, v in after.items()
        if v is not None and not k.startswith("overall/") and not k.endswith(("/role", "/model"))
    }
    assert shown - {k for k in shown if k.endswith(("/backlogged", "_rate"))} <= set(scraped)
    assert after["tenant/delta/rejections"] == 2.0
    assert after["overall/rejections"] == scraped["overall/rejections"]
    states = {k: v for k, v in after.items() if k.startswith("worker/") and k.endswith("/state")}
    assert len(states) == 2 and set(states.values()) == {"ready"}, states  # prefill, decode
