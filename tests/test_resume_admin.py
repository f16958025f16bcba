"""The desk and resumptions: "approved, resuming", the effect page's resumption panel, and
"Retry resume" (POST, CSRF, ``agent_ledger.approve_effect``), through the Django test client."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from agent_ledger import Actor, EffectStatus, resume, services
from agent_ledger.models import Effect, Resumption, ResumptionStatus
from agent_ledger.stores.django import DjangoStore, close_connections
from agent_ledger.types import Effect as CoreEffect
from tests.effects import new_effect
from tests.ledger_rows import make_user

pytestmark = pytest.mark.django_db(transaction=True)

VIEW = "agent_ledger.view_effect"
APPROVE = "agent_ledger.approve_effect"
VIEW_RESUMPTIONS = "agent_ledger.view_resumption"


@pytest.fixture(autouse=True)
def close_store_connections() -> Iterator[None]:
    yield
    close_connections()


class Flaky:
    """A resumer that fails while ``down`` is set."""

    def __init__(self) -> None:
        self.down = True
        self.runs = 0

    def __call__(self, effect: CoreEffect, decision: str) -> None:
        self.runs += 1
        if self.down:
            raise ConnectionError("agent host down")


@pytest.fixture
def flaky() -> Iterator[Flaky]:
    resumer = Flaky()
    resume.register("flaky-agent", resumer)
    yield resumer
    resume.unregister("flaky-agent")


def approved_with_a_failed_resume() -> Effect:
    new = new_effect(EffectStatus.REQUIRES_APPROVAL, continuation={"resumer": "flaky-agent"})
    effect = DjangoStore().begin_sync(new).effect
    services.approve(effect.idem_key, actor=Actor("admin", name="Ann"))
    return Effect.objects.get(pk=effect.id)


def client_for(*perms: str, **kwargs: Any) -> Client:
    client = Client(**kwargs)
    client.force_login(make_user(f"user{len(perms)}{kwargs}".replace(" ", ""), *perms))
    return client


def change_url(effect: Effect) -> str:
    return reverse("admin:agent_ledger_effect_change", args=[effect.pk])


def retry_url(effect: Effect, row: Resumption) -> str:
    return reverse("admin:agent_ledger_effect_retry_resume", args=[effect.pk, row.pk])


def test_the_desk_says_approved_resuming_while_a_resume_is_pending(flaky: Flaky) -> None:
    effect = approved_with_a_failed_resume()
    row = Resumption.objects.get(effect=effect)
    assert row.status == ResumptionStatus.PENDING
    assert effect.shown_status() == "approved, resuming"
    assert str(effect).endswith("(approved, resuming)")

    client = client_for(VIEW, APPROVE)
    listing = client.get(reverse("admin:agent_ledger_effect_changelist")).content.decode()
    assert 'agent-ledger-badge--ready">approved, resuming</span>' in listing
    page = client.get(change_url(effect)).content.decode()
    assert 'agent-ledger-badge--ready">approved, resuming</span>' in page
    assert "Resuming the agent; it runs the tool when it calls again." in page
    assert "ConnectionError: agent host down" in page
    assert retry_url(effect, row) in page
    assert "Retry resume" in page


def test_retry_resume_runs_it_now_and_the_desk_goes_back_to_its_usual_label(
    flaky: Flaky,
) -> None:
    effect = approved_with_a_failed_resume()
    row = Resumption.objects.get(effect=effect)
    flaky.down = False
    client = client_for(VIEW, APPROVE)
    response = client.post(retry_url(effect, row), follow=True)
    assert response.status_code == 200
    assert [str(m) for m in response.context["messages"]] == ["Resume retried; it is now done."]
    row.refresh_from_db()
    assert (row.status, row.attempts, flaky.runs) == (ResumptionStatus.DONE, 2, 2)
    page = response.content.decode()
    assert 'agent-ledger-badge--ready">approved, runs when the agent calls again<' in page
    assert retry_url(effect, row) not in page  # done: no button
    assert Effect.objects.get(pk=effect.pk).status == EffectStatus.READY

    again = client.post(retry_url(effect, row), follow=True)
    assert [str(m) for m in again.context["messages"]] == [
        "That resumption is running or done: nothing to retry."
    ]
    assert flaky.runs == 2


def test_retry_resume_is_post_only_csrf_protected_and_needs_the_approve_permission(
    flaky: Flaky,
) -> None:
    effect = approved_with_a_failed_resume()
    row = Resumption.objects.get(effect=effect)
    flaky.down = False
    viewer = client_for(VIEW)
    assert viewer.post(retry_url(effect, row)).status_code == 403
    page = viewer.get(change_url(effect)).content.decode()
    assert retry_url(effect, row) not in page

    strict = client_for(VIEW, APPROVE, enforce_csrf_checks=True)
    assert strict.get(retry_url(effect, row)).status_code == 405
    assert strict.post(retry_url(effect, row)).status_code == 403  # no CSRF token
    page = strict.get(change_url(effect)).content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert token is not None
    response = strict.post(retry_url(effect, row), {"csrfmiddlewaretoken": token.group(1)})
    assert response.status_code == 302
    assert Resumption.objects.get(pk=row.pk).status == ResumptionStatus.DONE
    assert flaky.runs == 2


def test_a_resumption_of_another_effect_is_not_found(flaky: Flaky) -> None:
    effect = approved_with_a_failed_resume()
    other = approved_with_a_failed_resume()
    row = Resumption.objects.get(effect=other)
    client = client_for(VIEW, APPROVE)
    assert client.post(retry_url(effect, row)).status_code == 404
    assert Resumption.objects.get(pk=row.pk).attempts == 1


def test_the_resumptions_list_is_read_only_and_retries_in_bulk(flaky: Flaky) -> None:
    first = approved_with_a_failed_resume()
    approved_with_a_failed_resume()
    flaky.down = False
    client = client_for(VIEW, APPROVE, VIEW_RESUMPTIONS)
    changelist = reverse("admin:agent_ledger_resumption_changelist")
    page = client.get(changelist)
    assert page.status_code == 200
    html = page.content.decode()
    assert html.count("ConnectionError: agent host down") == 2
    assert change_url(first) in html
    assert reverse("admin:agent_ledger_resumption_add") not in html
    ids = [str(pk) for pk in Resumption.objects.values_list("pk", flat=True)]
    response = client.post(
        changelist, {"action": "retry_selected", "_selected_action": ids}, follow=True
    )
    assert [str(m) for m in response.context["messages"]] == ["Retried 2 resumptions."]
    assert set(Resumption.objects.values_list("status", flat=True)) == {"done"}

    # Without the approve permission the action is not offered at all.
    viewer = client_for(VIEW_RESUMPTIONS)
    assert "retry_selected" not in viewer.get(changelist).content.decode()
    row = Resumption.objects.first()
    assert row is not None
    detail = client.get(reverse("admin:agent_ledger_resumption_change", args=[row.pk]))
    assert detail.status_code == 200
    assert 'name="_save"' not in detail.content.decode()
