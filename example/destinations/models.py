import django_lb_shm.load_balancer_model
from django.db import models


class Destination(django_lb_shm.load_balancer_model.LoadBalancerModel):
    name = models.CharField(max_length=100)
    desc = models.CharField(max_length=100)
