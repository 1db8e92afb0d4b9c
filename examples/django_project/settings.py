"""Settings of the Django example: as small as a project can be (no database, no
apps), mail through asmtp's backend, everything that differs between machines read from
the environment.

Mail: ``SMTP_HOST``, ``SMTP_PORT`` (587), ``SMTP_TLS`` (``starttls``, ``implicit``,
``none``; by default implicit on port 465, else STARTTLS), ``SMTP_USER``/``SMTP_PASSWORD``
(AUTH, when both are set), ``MAIL_FROM``; they become Django's ``EMAIL_*`` settings,
which asmtp's backend reads. Django: ``DJANGO_SECRET_KEY``, ``DJANGO_DEBUG=1``,
``DJANGO_ALLOWED_HOSTS`` (comma-separated).
"""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or "example-only: set DJANGO_SECRET_KEY"
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(",")

ROOT_URLCONF = "django_project.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

# Mail: asmtp's backend keeps one pooled set of sessions to the relay for the process,
# shared by every send_mail (Django makes a backend per call; the sessions outlive it).
EMAIL_BACKEND = "asmtp.django.EmailBackend"
EMAIL_HOST = os.environ.get("SMTP_HOST", "localhost")
EMAIL_PORT = int(os.environ.get("SMTP_PORT", "587"))
EMAIL_HOST_USER = os.environ.get("SMTP_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("SMTP_PASSWORD", "")
_TLS = os.environ.get("SMTP_TLS") or ("implicit" if EMAIL_PORT == 465 else "starttls")
if _TLS not in ("starttls", "implicit", "none"):
    raise ValueError(f"SMTP_TLS must be starttls, implicit or none: {_TLS!r}")
EMAIL_USE_TLS = _TLS == "starttls"
EMAIL_USE_SSL = _TLS == "implicit"
EMAIL_TIMEOUT = 10
DEFAULT_FROM_EMAIL = os.environ.get("MAIL_FROM") or "Example <hello@app.example>"
