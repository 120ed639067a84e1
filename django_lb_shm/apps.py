from django.apps import AppConfig


class DjangoLbShmConfig(AppConfig):
    name = "django_lb_shm"
    label = "django_lb_shm"
    verbose_name = "Database load balancer"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        # Checks only, plus the virtual connection alias (a settings entry; no I/O).
        from . import checks
        from .backend.alias import install_alias
        from .routers import install_router
        from .testing import apply_overrides_from_environment

        apply_overrides_from_environment()   # a coordinator started by LoadBalancerTestRunner
        checks.register()
        if install_alias():
            install_router()
