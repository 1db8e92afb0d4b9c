"""The HTTP side of the FastAPI example: ``POST /welcome`` with ``{"email": ...,
"name": ...}`` sends the welcome mail through the application's one pooled
:class:`~fastapi_app.mail.Notifier`, opened in the lifespan and reused by every request.

Replies, each JSON: 200 ``{"status": "delivered", ...}``; 422 for bad input (a missing
or empty field, FastAPI's own check; an address asmtp refuses, its
:class:`asmtp.InputError`; an address the mail server refused, 5xx at RCPT); 503 with
``Retry-After`` when the server said "try later" (after the Notifier's retries); 502 when
the mail could not be sent for another reason. Never a 500 for what a caller sent.

    SMTP_HOST=127.0.0.1 SMTP_PORT=8025 SMTP_TLS=none uvicorn fastapi_app.main:app
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

import asmtp

from .mail import Notifier, Settings

router = APIRouter()


class Signup(BaseModel):
    email: str = Field(min_length=1, max_length=254)
    name: str = Field(min_length=1, max_length=100)


@router.post("/welcome")
async def welcome(signup: Signup, request: Request) -> JSONResponse:
    notifier: Notifier = request.app.state.notifier
    result = await notifier.welcome(signup.email, signup.name)
    return answer(result)


def answer(result: asmtp.RecipientResult) -> JSONResponse:
    """The HTTP reply for one recipient's result."""
    if result.ok:
        return JSONResponse({"status": "delivered", "to": result.recipient})
    said = f"{result.code} {result.message}" if result.code else result.message
    body = {"status": result.status, "detail": f"not sent to {result.recipient}: {said}"}
    if result.status == "permanent" and result.stage == "rcpt":
        return JSONResponse(body, status_code=422)  # the address itself was refused
    if result.status == "transient":
        return JSONResponse(body, status_code=503, headers={"Retry-After": "60"})
    return JSONResponse(body, status_code=502)


async def bad_input(request: Request, exc: Exception) -> JSONResponse:
    """asmtp's :class:`~asmtp.InputError`: what the caller sent cannot be mailed."""
    assert isinstance(exc, asmtp.InputError)
    return JSONResponse({"detail": exc.message}, status_code=422)


async def mail_failed(request: Request, exc: Exception) -> JSONResponse:
    """Any other asmtp error (the relay's settings, the Mailer's state): not the caller's."""
    return JSONResponse({"detail": f"the mail service failed: {exc}"}, status_code=502)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application; ``settings`` default to the environment's, read at start-up."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config = settings or Settings.from_env()
        async with Notifier(config.relay, sender=config.sender) as notifier:
            app.state.notifier = notifier
            yield

    app = FastAPI(title="asmtp FastAPI example", lifespan=lifespan)
    app.include_router(router)
    # An InputError is an SMTPError too: the handler of its nearest class is used.
    app.add_exception_handler(asmtp.InputError, bad_input)
    app.add_exception_handler(asmtp.SMTPError, mail_failed)
    return app


app = create_app()
