"""The approval dashboard in a real browser: Debian's Chromium, headless, against ``live_server``.

Screenshots land in ``test-artifacts/`` (``admin-dashboard.png`` and ``admin-decision-1280x720.png``
are the README's pictures, copied to ``docs/``).
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


def open_page(browser: Any, width: int, height: int) -> Any:
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(15_000)
    return context.new_page()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    page = open_page(browser, 1600, 900)
    yield page
    page.context.close()


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
            args={
                "namespace": "prod",
                "image": "registry.example.com/app:v2.4.0",
                "replicas": 6,
                "change_note": "Roll out v2.4.0 to prod.\nMigrations: none.\nRollback: v2.3.9.",
            },
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


def screenshot(page: Any, name: str, *, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=full_page)
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
    expect(history.last).to_contain_text("approved, runs when the agent calls again")
    expect(page.locator("#agent-ledger-next")).to_contain_text("runs when the agent calls again")
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


# -- the desk's layout -------------------------------------------------------------------------

#: What an approver must see before deciding, top to bottom.
DESK_PARTS = {
    "tool": ".agent-ledger-tool",
    "workflow": ".agent-ledger-workflow",
    "requested by": ".agent-ledger-requested",
    "waiting": ".agent-ledger-waited",
    "arguments": "#agent-ledger-args",
    "text block": "#agent-ledger-args pre.agent-ledger-text",
    "comment": "#agent-ledger-approve-comment",
    "approve": "button.agent-ledger-approve",
    "reason": "#agent-ledger-deny-reason",
    "deny": "button.agent-ledger-deny",
}


@pytest.mark.parametrize(("width", "height"), [(1280, 720), (1400, 900)])
def test_the_decision_is_visible_without_scrolling(
    browser: Any, live_server: Any, ledger_rows: dict[str, Effect], width: int, height: int
) -> None:
    """At laptop sizes the whole decision fits above the fold, the panel spans the content
    column (Django 6 squeezed it into the top-right corner), and keys come below it."""
    expect = playwright_sync.expect
    make_user("alice", VIEW, APPROVE)
    page = open_page(browser, width, height)
    log_in(page, live_server, "alice")
    page.goto(detail_url(live_server, ledger_rows["deploy"]))
    panel = page.locator("#agent-ledger-decision")
    expect(panel).to_be_visible()
    assert page.evaluate("window.scrollY") == 0
    for name, selector in DESK_PARTS.items():
        box = page.locator(selector).bounding_box()
        assert box is not None, name
        assert box["width"] > 0 and box["height"] > 0, name
        assert box["y"] >= 0 and box["y"] + box["height"] <= height, (name, box)
    panel_box = panel.bounding_box()
    content_box = page.locator("#content").bounding_box()
    assert panel_box["width"] >= min(0.9 * content_box["width"], 900), (panel_box, content_box)
    for field in (".field-fence", ".field-idem_key", ".field-call_id"):
        assert page.locator(field).bounding_box()["y"] > panel_box["y"] + panel_box["height"]
    # A multi-line string reads as lines of text, not as "\n"-escaped JSON.
    block = page.locator("#agent-ledger-args pre.agent-ledger-text")
    assert block.inner_text().splitlines() == [
        "Roll out v2.4.0 to prod.",
        "Migrations: none.",
        "Rollback: v2.3.9.",
    ]
    expect(page.locator("#agent-ledger-args")).not_to_contain_text("\\n")
    screenshot(page, f"admin-decision-{width}x{height}.png", full_page=False)
    page.context.close()


def test_a_long_value_scrolls_in_its_own_box(browser: Any, live_server: Any) -> None:
    make_user("alice", VIEW, APPROVE)
    effect = make_effect(
        tool="email.send",
        args={"to": "dana@example.com", "body": "\n".join(f"line {n}" for n in range(200))},
    )
    page = open_page(browser, 1280, 720)
    log_in(page, live_server, "alice")
    page.goto(detail_url(live_server, effect))
    body = page.locator("#agent-ledger-args pre.agent-ledger-text")
    sizes = body.evaluate("e => [e.scrollHeight, e.clientHeight]")
    assert sizes[0] > sizes[1]  # the value scrolls inside its box ...
    deny = page.locator("button.agent-ledger-deny").bounding_box()
    assert deny["y"] + deny["height"] <= 720  # ... so the buttons stay in view
    page.context.close()


def test_bulk_approve_shows_what_is_approved_first(
    page: Any, live_server: Any, ledger_rows: dict[str, Effect]
) -> None:
    expect = playwright_sync.expect
    make_user("alice", VIEW, APPROVE)
    log_in(page, live_server, "alice")
    page.goto(f"{live_server.url}/admin/agent_ledger/effect/?status=requires_approval")
    rows = page.locator("#result_list tbody tr")
    expect(rows).to_have_count(2)
    # The queue: oldest first, with what each call asks and how long it has waited.
    expect(rows.first).to_contain_text("stripe.refund")
    expect(rows.first).to_contain_text("charge=ch_3PqR7731")
    expect(rows.first).to_contain_text("5 min")
    screenshot(page, "admin-queue.png")
    page.locator("#action-toggle").check()
    page.select_option("select[name=action]", "approve_selected")
    page.locator("button[name=index]").click()

    listed = page.locator("#agent-ledger-selected tbody tr.agent-ledger-selected-effect")
    expect(listed).to_have_count(2)
    expect(listed.first).to_contain_text("stripe.refund")
    expect(listed.first).to_contain_text("ch_3PqR7731")
    expect(listed.last).to_contain_text("registry.example.com/app:v2.4.0")
    screenshot(page, "admin-bulk-approve.png")
    assert set(
        Effect.objects.filter(
            pk__in=[ledger_rows["deploy"].pk, ledger_rows["refund"].pk]
        ).values_list("status", flat=True)
    ) == {EffectStatus.REQUIRES_APPROVAL}

    page.get_by_role("button", name="Approve them").click()
    expect(page.locator("ul.messagelist")).to_contain_text("Approved 2 effects.")
    assert set(
        Effect.objects.filter(
            pk__in=[ledger_rows["deploy"].pk, ledger_rows["refund"].pk]
        ).values_list("status", flat=True)
    ) == {EffectStatus.READY}
