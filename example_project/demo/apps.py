import contextlib

from django.apps import AppConfig


class DemoConfig(AppConfig):
    name = "demo"
    verbose_name = "Demo agent"

    def ready(self) -> None:
        from . import receivers  # noqa: F401  (connects the example signal receiver)

        with contextlib.suppress(ImportError):  # installed without the [langgraph] extra
            from . import agent  # noqa: F401  (registers the demo agent's resumer)
