"""An app that only a test script installs, at run time (as Django's runtests.py does): no migrations."""
from django.db import models

from django_lb_shm import LoadBalancerModel


class Gadget(LoadBalancerModel):
    name = models.CharField(max_length=50)
