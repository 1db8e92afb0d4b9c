"""The example's view: ``POST /welcome/`` with ``email`` and ``name`` (JSON or a form)
sends the welcome mail with Django's own ``EmailMultiAlternatives``; the backend
(``asmtp.django.EmailBackend``) sends it through the process's pooled sessions.

Replies, each JSON: 200 ``{"status": "delivered", ...}``; 400 for a request without the
fields; 422 for an address asmtp refuses (:class:`asmtp.InputError`, reported by the
backend as that recipient's result at the stage "input"; a line break, Django's
``BadHeaderError``) or that the mail server refused (5xx at RCPT); 503 with
``Retry-After`` when the server said "try later"; 502 for any other failure to send.
"""

from __future__ import annotations

import html
import json
from email.utils import formataddr
from typing import Any

from django.core.mail import BadHeaderError, EmailMultiAlternatives
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

import asmtp
from asmtp.django import DeliveryError

#: what would turn one address into several (or into a display name) once it is put
#: between the angle brackets of the To field: "ann@x>, <eve@y" adds a recipient
LIST_CHARACTERS = frozenset('<>,;:"()[]\\')


def send_welcome(request: HttpRequest) -> JsonResponse:
    fields = _fields(request)
    if fields is None:
        return JsonResponse(
            {"error": "send a JSON object or a form with email and name"}, status=400
        )
    values = {}
    for field in ("email", "name"):
        value = fields.get(field)
        if not isinstance(value, str) or not value.strip():
            return JsonResponse({"error": f"{field} is missing or empty"}, status=400)
        values[field] = value.strip()
    email, name = values["email"], values["name"]
    if LIST_CHARACTERS.intersection(email):
        return JsonResponse({"error": f"not a single email address: {email!r}"}, status=422)
    message = EmailMultiAlternatives(
        subject=f"Welcome to Example, {name}!",
        body=f"Hi {name},\n\nyour account is ready.\n",
        to=[formataddr((name, email))],
    )
    message.attach_alternative(
        f"<h1>Hi {html.escape(name)}</h1><p>Your account is ready.</p>", "text/html"
    )
    try:
        message.send()
    except (asmtp.InputError, BadHeaderError) as exc:
        return JsonResponse({"error": str(exc)}, status=422)
    except DeliveryError as exc:  # the message reached no recipient: say why
        [report] = exc.failed
        return answer(report[0])
    except asmtp.SMTPError as exc:  # the backend's settings, a timeout: not the caller's
        return JsonResponse({"error": f"the mail service failed: {exc}"}, status=502)
    return JsonResponse({"status": "delivered", "to": email})


#: the view: POST only (405 otherwise), and no CSRF token asked for: an API for other
#: programs, which hold no CSRF cookie (Django's decorators, applied as functions)
welcome = csrf_exempt(require_POST(send_welcome))


def _fields(request: HttpRequest) -> dict[str, Any] | None:
    if request.content_type == "application/json":
        try:
            data: object = json.loads(request.body)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None
    form: dict[str, Any] = request.POST.dict()  # the last value of each field
    return form


def answer(result: asmtp.RecipientResult) -> JsonResponse:
    """The HTTP reply for a recipient the message did not reach."""
    said = f"{result.code} {result.message}" if result.code else result.message
    body = {"status": result.status, "error": f"not sent to {result.recipient}: {said}"}
    if result.status == "permanent" and result.stage in ("input", "rcpt"):
        # asmtp refused the address (an InputError, reported as this result), or the
        # mail server did
        return JsonResponse(body, status=422)
    if result.status == "transient":
        response = JsonResponse(body, status=503)
        response["Retry-After"] = "60"
        return response
    return JsonResponse(body, status=502)
