"""As Django's tests/runtests.py: settings made at run time, then LoadBalancerTestRunner.

The settings module (tests.testproject.settings) has neither the app under test nor the
admin; they, and the TEMPLATES/MIDDLEWARE the admin's checks (admin.E403, E408-E410) need,
are set here after it is read. Run by tests/test_testing.py.
"""
import sys

import django
from django.conf import settings


def main() -> int:
    added = ["django.contrib.admin", "django.contrib.sessions", "django.contrib.messages", "tests.runtimeapp"]
    settings.INSTALLED_APPS = [*settings.INSTALLED_APPS, *(app for app in added if app not in settings.INSTALLED_APPS)]
    settings.TEMPLATES = [{
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request",
                                           "django.contrib.auth.context_processors.auth",
                                           "django.contrib.messages.context_processors.messages"]},
    }]
    settings.MIDDLEWARE = ["django.contrib.sessions.middleware.SessionMiddleware",
                           "django.contrib.auth.middleware.AuthenticationMiddleware",
                           "django.contrib.messages.middleware.MessageMiddleware"]
    django.setup()
    from django_lb_shm.testing import LoadBalancerTestRunner

    # Not interactive: a test database left by an earlier killed run is replaced without asking.
    return 1 if LoadBalancerTestRunner(verbosity=2, interactive=False).run_tests(["tests.runtimeapp.tests"]) else 0


if __name__ == "__main__":
    sys.exit(main())
