"""The REST API and the approval webhook (Django REST framework; install the ``drf`` extra).

Mount it under any prefix: ``path("api/ledger/", include("agent_ledger.api.urls"))``.
"""
