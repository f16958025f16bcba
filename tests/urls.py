from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/ledger/", include("agent_ledger.api.urls")),
]


async def ledger_echo(request: HttpRequest) -> JsonResponse:
    """An async view that uses the ledger, for tests/test_async_django.py (runs under ASGI)."""
    from agent_ledger import Effect, ToolCall
    from agent_ledger.services import get_ledger

    ledger = get_ledger()
    call = ToolCall(workflow_id="asgi", tool="test.echo", args={"text": request.GET["text"]})

    async def handler(effect: Effect) -> dict[str, str]:
        return {"echo": effect.args["text"]}

    result = await ledger.run(call, handler)
    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    return JsonResponse({"result": result, "replays": effect.dedup_count if effect else None})


urlpatterns += [path("tests/ledger-echo/", ledger_echo)]


def ledger_echo_sync(request: HttpRequest) -> JsonResponse:
    """A sync (WSGI) view that runs a tool through ``run_sync``, for tests/test_sync.py."""
    from agent_ledger import Effect, ToolCall
    from agent_ledger.services import get_ledger

    ran = []

    def handler(effect: Effect) -> dict[str, str]:
        ran.append(True)
        return {"echo": effect.args["text"]}

    call = ToolCall(workflow_id="wsgi", tool="test.echo", args={"text": request.GET["text"]})
    return JsonResponse({"result": get_ledger().run_sync(call, handler), "ran": bool(ran)})


urlpatterns += [path("tests/ledger-echo-sync/", ledger_echo_sync)]
