from django.apps import AppConfig


class DemoConfig(AppConfig):
    name = "demo"
    verbose_name = "Demo agent"

    def ready(self) -> None:
        from . import receivers  # noqa: F401  (connects the example signal receiver)
