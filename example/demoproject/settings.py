"""
Django settings for the django_lb_shm demo project.

A trimmed ``django-admin startproject`` with five SQLite copies of one database
(files under run/, created by scripts/demo.sh) load-balanced by django_lb_shm.
"""
import os
from pathlib import Path

# Build paths inside the project like this: BASE_DIR / 'subdir'.
BASE_DIR = Path(__file__).resolve().parent.parent
RUN_DIR = BASE_DIR / 'run'

# SECURITY WARNING: a demo key; keep the one used in production secret!
SECRET_KEY = 'django-insecure-django_lb_shm-demo-not-secret'

# SECURITY WARNING: don't run with debug turned on in production!
DEBUG = True

ALLOWED_HOSTS = []


# Application definition

INSTALLED_APPS = [
    'django.contrib.admin',
    'django.contrib.auth',
    'django.contrib.contenttypes',
    'django.contrib.sessions',
    'django.contrib.messages',
    'django_lb_shm',
    'django.contrib.staticfiles',
    'destinations',
]

MIDDLEWARE = [
    'django.middleware.security.SecurityMiddleware',
    'django.contrib.sessions.middleware.SessionMiddleware',
    'django.middleware.common.CommonMiddleware',
    'django.middleware.csrf.CsrfViewMiddleware',
    'django.contrib.auth.middleware.AuthenticationMiddleware',
    'django.contrib.messages.middleware.MessageMiddleware',
    'django.middleware.clickjacking.XFrameOptionsMiddleware',
]

ROOT_URLCONF = 'demoproject.urls'

TEMPLATES = [
    {
        'BACKEND': 'django.template.backends.django.DjangoTemplates',
        'DIRS': [],
        'APP_DIRS': True,
        'OPTIONS': {
            'context_processors': [
                'django.template.context_processors.request',
                'django.contrib.auth.context_processors.auth',
                'django.contrib.messages.context_processors.messages',
            ],
        },
    },
]

WSGI_APPLICATION = 'demoproject.wsgi.application'


# Database: five copies of the same database.  Every one gets every
# create/update/delete; reads are spread over them.

DATABASES = {
    alias: {
        'ENGINE': 'django.db.backends.sqlite3',
        'NAME': RUN_DIR / f'{alias}.sqlite3',
    }
    for alias in ('default', 'DB1', 'DB2', 'DB3', 'DB4')
}


# django_lb_shm: the seed README's settings, plus where the write journal lives.

LOAD_BALANCER = {
    'CUD_ALGORITHM': 'MULTITHREADING',
    'R_ALGORITHM': {
        'NAME': 'ROUND_ROBIN',
    },
    'DATABASES': ['default', 'DB1', 'DB2', 'DB3', 'DB4'],
    'WAIT_TIME': 2,
    'ADDRESS': {
        'HOST': 'localhost',
        # DEMO_LB_PORT lets scripts/demo.sh move off a busy port.
        'PORT': int(os.environ.get('DEMO_LB_PORT', 6000)),
        # 'pass' as in the seed README.  A real AUTHKEY must be long and secret
        # (or use 'AUTHKEY_ENV': 'NAME_OF_AN_ENV_VAR'): whoever knows it can make
        # the coordinator unpickle data, i.e. run code in it.
        'AUTHKEY': 'pass',
    },
    'JOURNAL_DIR': RUN_DIR / 'journal',
    # Prometheus metrics from the supervisor at http://127.0.0.1:9808/metrics (needs
    # prometheus_client: pip install 'django-lb-shm[metrics]'); scripts/demo.sh prints some.
    'METRICS': {'HOST': '127.0.0.1', 'PORT': int(os.environ.get('DEMO_METRICS_PORT', 9808))},
}


# Password validation

AUTH_PASSWORD_VALIDATORS = [
    {'NAME': 'django.contrib.auth.password_validation.UserAttributeSimilarityValidator'},
    {'NAME': 'django.contrib.auth.password_validation.MinimumLengthValidator'},
    {'NAME': 'django.contrib.auth.password_validation.CommonPasswordValidator'},
    {'NAME': 'django.contrib.auth.password_validation.NumericPasswordValidator'},
]


# Internationalization

LANGUAGE_CODE = 'en-us'
TIME_ZONE = 'UTC'
USE_I18N = True
USE_TZ = True


# Static files (CSS, JavaScript, Images)

STATIC_URL = 'static/'

DEFAULT_AUTO_FIELD = 'django.db.models.BigAutoField'
