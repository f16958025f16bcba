"""``urls_for``: where a person (or a model, in a tool message) sees and decides an effect."""

from __future__ import annotations

import uuid

from django.test import RequestFactory, override_settings

from agent_ledger import urls_for


def test_the_admin_page_and_the_api_resource_of_an_effect() -> None:
    effect_id = str(uuid.uuid4())
    assert urls_for(effect_id) == {
        "admin": f"/admin/agent_ledger/effect/{effect_id}/change/",
        "api": f"/api/ledger/effects/{effect_id}/",
    }


def test_absolute_urls_from_a_request() -> None:
    effect_id = str(uuid.uuid4())
    request = RequestFactory().get("/", HTTP_HOST="ledger.example.com", secure=True)
    with override_settings(ALLOWED_HOSTS=["ledger.example.com"]):
        urls = urls_for(effect_id, request=request)
    assert (
        urls["admin"] == f"https://ledger.example.com/admin/agent_ledger/effect/{effect_id}/change/"
    )


@override_settings(ROOT_URLCONF="tests.urls_admin_only")
def test_an_url_whose_app_is_not_included_is_left_out() -> None:
    assert set(urls_for(str(uuid.uuid4()))) == {"admin"}
