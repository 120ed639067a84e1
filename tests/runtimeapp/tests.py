"""Run by tests/support/runtime_settings_tests.py (not collected by pytest)."""
from django.test import TestCase

from .models import Gadget


class RuntimeAppTestCase(TestCase):
    def test_its_model_goes_through_the_test_coordinator(self):
        Gadget.objects.create(name="made at run time")
        self.assertEqual(list(Gadget.objects.values_list("name", flat=True)), ["made at run time"])
