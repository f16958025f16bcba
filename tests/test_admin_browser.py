"""The approval dashboard in a real browser: Debian's Chromium, headless, against ``live_server``.

Screenshots land in ``test-artifacts/`` (``admin-dashboard.png`` is the README's picture).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from playwright import sync_api as playwright_sync

from agent_ledger.models import Effect, EffectStatus
from tests.ledger_rows import PASSWORD, make_effect, make_user

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEW = "agent_ledger.view_effect"
APPROVE = "agent_ledger.approve_effect"


@pytest.fixture(scope="module", autouse=True)
def sync_orm_beside_playwright() -> Iterator[None]:
    # Playwright's sync API keeps an event loop on this thread; the test's own ORM calls are
    # still plain sync code, so tell Django not to refuse them.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        yield


@pytest.fixture(scope="module")
def browser(sync_orm_beside_playwright: None) -> Iterator[Any]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("The browser tests need Debian's chromium: apt-get install chromium")
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1600, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture
def ledger_rows() -> dict[str, Effect]:
    """A small, believable ledger: finished calls, a failure, a replay, two awaiting a human."""
    now = timezone.now()

    def done(seconds: float, minutes_ago: int) -> dict[str, Any]:
        start = now - timedelta(minutes=minutes_ago)
        return {"created_at": start, "completed_at": start + timedelta(seconds=seconds)}

    rows = {
        "lookup": make_effect(
            status=EffectStatus.SUCCEEDED,
            workflow_id="support-ticket-1042",
            tool="crm.lookup_customer",
            args={"email": "dana@example.com"},
            result={"customer_id": "cus_8812"},
            **done(0.08, 50),
        ),
        "message": make_effect(
            status=EffectStatus.SUCCEEDED,
            workflow_id="support-ticket-1042",
            tool="slack.send_message",
            args={"channel": "#support", "text": "Ticket 1042 is resolved"},
            result={"ok": True},
            dedup_count=2,
            **done(0.25, 48),
        ),
        "charge": make_effect(
            status=EffectStatus.SUCCEEDED,
            workflow_id="order-7731",
            tool="stripe.charge",
            args={"amount": 4999, "currency": "eur"},
            result={"charge_id": "ch_3PqR7731"},
            dedup_count=1,
            **done(0.6, 40),
        ),
        "receipt": make_effect(
            status=EffectStatus.FAILED,
            workflow_id="order-7731",
            tool="email.send_receipt",
            args={"to": "dana@example.com", "order": 7731},
            error={"message": "421 smtp.example.com: try again later", "code": "SmtpDown"},
            dedup_count=1,
            **done(0.4, 39),
        ),
        "drop": make_effect(
            status=EffectStatus.DENIED,
            workflow_id="cleanup-tmp-tables",
            tool="db.drop_table",
            args={"database": "orders", "table": "orders"},
            error={"message": "Never drop live tables.", "code": "denied"},
            **done(95, 30),
        ),
        "refund": make_effect(
            status=EffectStatus.REQUIRES_APPROVAL,
            workflow_id="order-7731",
            tool="stripe.refund",
            args={"charge": "ch_3PqR7731", "amount": 4999},
            created_at=now - timedelta(minutes=5),
        ),
        "deploy": make_effect(
            status=EffectStatus.REQUIRES_APPROVAL,
            workflow_id="deploy-prod-2025-06",
            tool="k8s.deploy",
            args={"namespace": "prod", "image": "registry.example.com/app:v2.4.0", "replicas": 6},
            created_at=now - timedelta(minutes=2),
        ),
    }
    return rows


def log_in(page: Any, live_server: Any, username: str) -> None:
    page.goto(f"{live_server.url}/admin/login/?next=/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}/admin/")


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def detail_url(live_server: Any, effect: Effect) -> str:
    return f"{live_server.url}/admin/agent_ledger/effect/{effect.pk}/change/"


def test_approver_approves_from_the_dashboard(
    page: Any, live_server: Any, ledger_rows: dict[str, Effect]
) -> None:
    expect = playwright_sync.expect
    make_user("alice", VIEW, APPROVE)
    log_in(page, live_server, "alice")

    page.goto(f"{live_server.url}/admin/agent_ledger/effect/")
    expect(page.locator("#result_list tbody tr")).to_have_count(len(ledger_rows))
    expect(page.locator(".agent-ledger-badge--requires_approval")).to_have_count(2)
    screenshot(page, "admin-dashboard.png")

    page.goto(f"{live_server.url}/admin/")
    pending = page.get_by_role("link", name="Awaiting approval (2)")
    expect(pending).to_be_visible()
    screenshot(page, "admin-index.png")
    pending.click()
    expect(page).to_have_url(re.compile(r"status=requires_approval"))
    expect(page.locator("#result_list tbody tr")).to_have_count(2)

    page.locator("#result_list tbody tr", has_text="k8s.deploy").locator("th a").click()
    expect(page.locator("#agent-ledger-decision")).to_be_visible()
    expect(page.get_by_text("registry.example.com/app:v2.4.0")).to_be_visible()
    screenshot(page, "admin-awaiting-approval.png")
    page.get_by_role("button", name="Approve").click()

    expect(page.locator("ul.messagelist")).to_contain_text("Approved")
    expect(page.locator(".field-status_badge .agent-ledger-badge--ready")).to_be_visible()
    expect(page.locator("#agent-ledger-decision")).to_have_count(0)
    history = page.locator(".inline-group tbody tr.has_original")
    expect(history.last).to_contain_text("admin: alice")
    expect(history.last).to_contain_text("ready")
    screenshot(page, "admin-approved.png")

    deploy = Effect.objects.get(pk=ledger_rows["deploy"].pk)
    assert deploy.status == EffectStatus.READY
    assert deploy.transitions.order_by("at", "id").last().actor_name == "alice"

    page.goto(f"{live_server.url}/admin/")
    expect(page.get_by_role("link", name="Awaiting approval (1)")).to_be_visible()


def test_another_approver_denies_with_a_reason(
    page: Any, live_server: Any, ledger_rows: dict[str, Effect]
) -> None:
    expect = playwright_sync.expect
    make_user("bob", VIEW, APPROVE)
    log_in(page, live_server, "bob")
    refund = ledger_rows["refund"]
    page.goto(detail_url(live_server, refund))

    # The reason is required: the browser will not send the form without one.
    page.get_by_role("button", name="Deny").click()
    expect(page.locator("#agent-ledger-deny-reason:invalid")).to_have_count(1)
    assert Effect.objects.get(pk=refund.pk).status == EffectStatus.REQUIRES_APPROVAL

    page.fill("#agent-ledger-deny-reason", "Refunds over 40 EUR need a second look")
    page.get_by_role("button", name="Deny").click()
    expect(page.locator("ul.messagelist")).to_contain_text("Denied")
    expect(page.locator(".field-status_badge .agent-ledger-badge--denied")).to_be_visible()
    last = page.locator(".inline-group tbody tr.has_original").last
    expect(last).to_contain_text("admin: bob")
    expect(last).to_contain_text("Refunds over 40 EUR need a second look")
    screenshot(page, "admin-denied.png")

    refund.refresh_from_db()
    assert refund.status == EffectStatus.DENIED
    assert refund.error == {"message": "Refunds over 40 EUR need a second look", "code": "denied"}


def test_viewer_sees_no_buttons_and_cannot_post(
    page: Any, live_server: Any, ledger_rows: dict[str, Effect]
) -> None:
    expect = playwright_sync.expect
    make_user("carol", VIEW)
    log_in(page, live_server, "carol")
    deploy = ledger_rows["deploy"]
    page.goto(detail_url(live_server, deploy))
    expect(page.get_by_text("You do not have permission to approve or deny")).to_be_visible()
    expect(page.get_by_role("button", name="Approve")).to_have_count(0)
    expect(page.get_by_role("button", name="Deny")).to_have_count(0)

    token = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    approve = f"/admin/agent_ledger/effect/{deploy.pk}/approve/"
    status = page.evaluate(
        """async ([url, token]) => {
            const response = await fetch(url, {
                method: "POST",
                headers: {
                    "X-CSRFToken": token,
                    "Content-Type": "application/x-www-form-urlencoded",
                },
                body: "reason=sneaky",
                credentials: "same-origin",
            });
            return response.status;
        }""",
        [approve, token],
    )
    assert status == 403
    assert page.request.get(f"{live_server.url}{approve}").status == 405
    assert Effect.objects.get(pk=deploy.pk).status == EffectStatus.REQUIRES_APPROVAL
    assert deploy.transitions.count() == 1
