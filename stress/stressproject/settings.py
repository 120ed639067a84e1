"""Settings for the stress suite (stress/run_stress.py).

Everything that varies per invocation (the databases, LOAD_BALANCER, the
optional Pgpool-II alias) comes from the JSON file named by LB_STRESS_CONFIG,
written by run_stress.py, so the driver, every client process it spawns and the
coordinator it starts (``bin/djangoloadbalancer run``) read the same settings.
"""
import json
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent
SECRET_KEY = "django_lb_shm-stress-not-secret"
DEBUG = False  # DEBUG=True would record every query in connection.queries
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django_lb_shm",
    "stressapp",
]

_config_path = os.environ.get("LB_STRESS_CONFIG")
if _config_path:
    _config = json.loads(Path(_config_path).read_text())
else:  # lets `manage.py makemigrations`-style tooling import the settings without a run
    _config = {
        "DATABASES": {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "/tmp/stress-unused.sqlite3"}},
        "LOAD_BALANCER": {
            "DATABASES": ["default"],
            "ADDRESS": {"HOST": "127.0.0.1", "PORT": 1, "AUTHKEY": "unused"},
        },
    }
DATABASES = _config["DATABASES"]
LOAD_BALANCER = _config["LOAD_BALANCER"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django_lb_shm": {"handlers": ["console"], "level": os.environ.get("LB_STRESS_LOG_LEVEL", "WARNING")},
    },
}
