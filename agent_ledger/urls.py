"""Decision surfaces outside the admin and the API: signed links and Slack buttons.

path("ledger/", include("agent_ledger.urls")),
"""

from django.urls import path

from . import views

app_name = "agent_ledger"

urlpatterns = [
    path("approve/<str:token>/", views.approval_link_view, name="approval-link"),
    path("slack/actions/", views.slack_actions, name="slack-actions"),
]
