"""A project that includes the admin but not the ledger's API (tests/test_links.py)."""

from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]
