"""asmtp as a Django project's email backend (``EMAIL_BACKEND =
"asmtp.django.EmailBackend"``): settings, one view that sends a welcome mail, manage.py."""
