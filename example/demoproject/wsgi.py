"""WSGI config for the demo project: ``application`` for any WSGI server."""
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'demoproject.settings')

application = get_wsgi_application()
