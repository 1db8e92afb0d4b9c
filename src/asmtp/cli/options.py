"""What every ``asmtp`` command (``send``, ``mx``, ``demo``, ``bench``) shares: the one
set of argument types (each turns a command-line word into a value or a clear usage
error), the options written alike in several commands, the exit statuses, the event-loop
runner and the plumbing of standard output and open files.

A command's own options live in its module; anything two commands would otherwise write
twice belongs here. Layer 6: may import any layer below.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import signal
import sys
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator
from typing import IO, Any, TypeVar

from .._core.address import check_mailbox
from .._delivery.retry import Rate
from ..config import Proxy
from ..errors import InputError

__all__ = [
    "DNS_TIMEOUT",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "add_dns_server",
    "add_dns_timeout",
    "add_proxy",
    "add_timeout",
    "discard_stdout",
    "fit_open_files",
    "host_port",
    "host_port_or",
    "mail_domain",
    "non_negative_int",
    "on_ctrl_c",
    "output",
    "password_from_env",
    "port",
    "positive_float",
    "positive_int",
    "proxy_from_args",
    "proxy_url",
    "rate",
    "rate_per_second",
    "relay_address",
    "run_loop",
    "size",
]

#: exit statuses: every recipient delivered (every domain resolved, every message
#: accepted); some not; bad usage or input, nothing sent; interrupted (128 + SIGINT)
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_T = TypeVar("_T")

# RFC 1035 2.3.4: 63 octets a label, 253 characters a name written without its last dot
_LABEL_MAX, _NAME_MAX = 63, 253
#: the DNS query timeout of ``send`` (direct delivery) and ``mx``
DNS_TIMEOUT = 5.0
#: open files the process needs besides its sessions' sockets (the interpreter, the
#: event loop, DNS queries, the journal and log files)
_FD_HEADROOM = 32
_SIZE = re.compile(r"\s*(\d+)\s*([kKmM]?)\s*")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}

# ----------------------------------------------------------------------- argument types


def _whole_number(value: str, minimum: int, needs: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < minimum:
        raise argparse.ArgumentTypeError(f"must be {needs}: {value!r}")
    return number


def positive_int(value: str) -> int:
    """A whole number from 1: ``--concurrency 10``."""
    return _whole_number(value, 1, "at least 1")


def non_negative_int(value: str) -> int:
    """A whole number from 0: ``--retries 0``."""
    return _whole_number(value, 0, "0 or more")


def positive_float(value: str) -> float:
    """A finite number of seconds above zero: ``--timeout 2.5``."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0 < number < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {value!r}")
    return number


def port(value: str) -> int:
    """A TCP port, 1-65535, in decimal digits."""
    if not (value.isascii() and value.isdigit()):
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}")
    number = int(value)
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"port must be 1-65535: {value!r}")
    return number


def port_or_any(value: str) -> int:
    """A TCP port to listen on: 1-65535, or 0 for any free one."""
    return 0 if value == "0" else port(value)


def host_port(value: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address; the port is None
    when not given (``send --relay`` picks it from ``--tls``).

    >>> host_port("mail.example.com:587"), host_port("[::1]:25"), host_port("::1")
    (('mail.example.com', 587), ('::1', 25), ('::1', None))
    """
    host, number = value, None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise argparse.ArgumentTypeError(f"not HOST[:PORT]: {value!r}")
            number = port(rest[1:])
    elif value.count(":") == 1:
        host, _, text = value.partition(":")
        number = port(text)
    if not host:
        raise argparse.ArgumentTypeError(f"not HOST[:PORT]: {value!r}")
    return host, number


def relay_address(value: str) -> tuple[str, int | None, str | None]:
    """``--relay``: ``HOST[:PORT]`` (see :func:`host_port`) or ``unix:/PATH``, a
    Unix-domain socket: ``(host, port, path)``, host "" and port None for a socket.

    >>> relay_address("mx.example.com:24"), relay_address("unix:/run/dovecot/lmtp")
    (('mx.example.com', 24, None), ('', None, '/run/dovecot/lmtp'))
    """
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path:
            raise argparse.ArgumentTypeError(f"not unix:/PATH: {value!r}")
        return "", None, path
    return (*host_port(value), None)


def host_port_or(default: int) -> Callable[[str], tuple[str, int]]:
    """An argument type: :func:`host_port` with ``default`` for a port not given
    (``host_port_or(25)`` for ``asmtp bench HOST[:PORT]``)."""

    def host_and_port(value: str) -> tuple[str, int]:
        host, number = host_port(value)
        return host, default if number is None else number

    return host_and_port


def rate(value: str) -> Rate:
    """A rate limit: ``50/s``, ``300/m``, ``1000/h`` (``30 / min``, ``2/hour`` too):
    the grammar of :meth:`asmtp.Rate.parse`, the one grammar of rates in asmtp."""
    try:
        return Rate.parse(value)
    except InputError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def rate_per_second(value: str) -> float:
    """Messages per second, written as :func:`rate` takes them or as a bare number of
    messages a second (``asmtp bench --rate``).

    >>> rate_per_second("50/s"), rate_per_second("120/m"), rate_per_second("2.5")
    (50.0, 2.0, 2.5)
    """
    unit = "" if "/" in value else "/s"
    try:
        return Rate.parse(value + unit).per_second
    except InputError:
        raise argparse.ArgumentTypeError(
            f"a rate looks like 50/s, 300/m, 1000/h or 50 (a second): {value!r}"
        ) from None


def size(value: str) -> int:
    """Octets from ``N``, ``Nk`` (x1024) or ``NM`` (x1048576).

    >>> size("2048"), size("2k"), size("1M")
    (2048, 2048, 1048576)
    """
    m = _SIZE.fullmatch(value)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size in octets (N, Nk, NM): {value!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def proxy_url(value: str) -> str:
    """A proxy URL, checked: ``socks5://[USER@]HOST[:PORT]`` or ``http://[USER@]HOST:PORT``.
    Never with a password (flags show in ``ps``): ``--proxy-password-env VAR`` gives it."""
    user, password = _url_user(value)
    if password:
        raise argparse.ArgumentTypeError(
            "put no password in the URL (flags show in ps): give --proxy-password-env VAR"
        )
    try:
        Proxy.parse(value, password="checked" if user else None)
    except InputError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return value


def _url_user(url: str) -> tuple[bool, bool]:
    """Whether ``url`` holds a user name, and a password."""
    try:
        parts = urllib.parse.urlsplit(url)
        return parts.username is not None, parts.password is not None
    except ValueError:  # Proxy.parse says what is wrong with it
        return False, False


def mail_domain(value: str) -> str:
    """A mail domain, or the domain of an address, checked as ``send`` checks a
    recipient's: ``example.org``, ``example.org.``, ``ann@example.org``, ``[192.0.2.1]``,
    ``bücher.example``. Returned as written (an address gives its domain)."""
    domain = value.rpartition("@")[2] if "@" in value else value
    # the domain checks of a recipient address, with the address's own checks on top
    address = value if "@" in value else f"postmaster@{value.removesuffix('.')}"
    try:
        ascii_name = check_mailbox(address, field="DOMAIN").rpartition("@")[2]
    except InputError as exc:
        reason = exc.message.removeprefix("DOMAIN: ").removeprefix(repr(address) + " ")
        raise argparse.ArgumentTypeError(
            f"not a mail domain or address: {value!r} ({reason})"
        ) from None
    if not ascii_name.startswith("["):
        labels = ascii_name.removesuffix(".").split(".")
        if len(ascii_name) > _NAME_MAX or any(len(label) > _LABEL_MAX for label in labels):
            raise argparse.ArgumentTypeError(
                f"not a mail domain: {value!r} (longer than DNS allows, RFC 1035 2.3.4)"
            )
    return domain


# ----------------------------------------------------------------------- shared options


def add_dns_server(group: Any) -> None:
    """``--dns-server IP[:PORT]`` (may repeat): the DNS servers to ask."""
    group.add_argument(
        "--dns-server",
        action="append",
        metavar="IP[:PORT]",
        help="ask this DNS server (may repeat; default: the system's)",
    )


def add_dns_timeout(group: Any, *, default: float | None) -> None:
    """``--dns-timeout SECONDS``; ``default`` None leaves it None when not given (``send``
    refuses it with ``--relay``, and then takes :data:`DNS_TIMEOUT`)."""
    group.add_argument(
        "--dns-timeout",
        type=positive_float,
        default=default,
        metavar="SECONDS",
        help=f"per DNS query (default {DNS_TIMEOUT:g})",
    )


def add_timeout(group: Any, *, default: float = 30.0) -> None:
    """``--timeout SECONDS``: per network step."""
    group.add_argument(
        "--timeout",
        type=positive_float,
        default=default,
        metavar="SECONDS",
        help=f"per network step (default {default:g})",
    )


def add_proxy(group: Any) -> None:
    """``--proxy URL`` and ``--proxy-password-env VAR``: connect through a SOCKS5 or
    HTTP CONNECT proxy (:func:`proxy_from_args` makes the :class:`~asmtp.Proxy`)."""
    group.add_argument(
        "--proxy",
        type=proxy_url,
        metavar="URL",
        help="connect through this proxy: socks5://[USER@]HOST[:PORT] (needs "
        "asmtp[proxy]) or http://[USER@]HOST:PORT (HTTP CONNECT)",
    )
    group.add_argument(
        "--proxy-password-env",
        metavar="VAR",
        help="the environment variable holding the proxy user's password",
    )


def proxy_from_args(args: argparse.Namespace) -> Proxy | None:
    """The proxy of ``--proxy URL`` (its user's password from ``--proxy-password-env``),
    or None without ``--proxy``."""
    url: str | None = getattr(args, "proxy", None)
    variable: str | None = getattr(args, "proxy_password_env", None)
    if url is None:
        if variable is not None:
            raise InputError("--proxy-password-env goes with --proxy")
        return None
    with_user, _ = _url_user(url)
    if with_user and not variable:
        raise InputError("--proxy with a user name needs --proxy-password-env VAR")
    if variable and not with_user:
        raise InputError("--proxy-password-env needs a user name in --proxy (socks5://USER@HOST)")
    password = None
    if variable:
        password = secret_from_env("--proxy-password-env", variable)
        if not password:
            raise InputError(f"--proxy-password-env: environment variable {variable} is not set")
    try:
        return Proxy.parse(url, password=password)
    except InputError as exc:
        raise InputError(f"--proxy: {exc.message}") from None


def password_from_env(user: str | None, variable: str | None) -> str | None:
    """The password of ``--user USER --password-env VAR``, read from the environment
    (a password is never a flag of its own: flags show in ``ps``); None without
    ``--user``. Each flag needs the other."""
    if variable is not None and user is None:
        raise InputError("--password-env goes with --user")
    if user is None:
        return None
    if not variable:
        raise InputError("--user needs --password-env VAR (the password is never a flag)")
    return secret_from_env("--password-env", variable)


def secret_from_env(flag: str, variable: str) -> str:
    """The value of the environment variable ``flag`` names (``--password-env VAR``):
    secrets come from the environment, never from a flag, which ``ps`` shows."""
    value = os.environ.get(variable)
    if value is None:
        raise InputError(f"{flag}: environment variable {variable} is not set")
    return value


# ----------------------------------------------------------------------- plumbing


def run_loop(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine on a new event loop (uvloop when installed)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: _T = uvloop.run(coro)  # typed whether or not uvloop ships its stubs
    return result


def discard_stdout() -> None:
    """Point standard output at the null device: its reader went away
    (``asmtp ... | head``), and the interpreter's last flush must not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@contextlib.contextmanager
def output() -> Iterator[IO[str]]:
    """Write to stdout; a reader that went away (``asmtp ... | head``) is not an error."""
    try:
        yield sys.stdout
        sys.stdout.flush()
    except BrokenPipeError:
        discard_stdout()


def fit_open_files(concurrency: int, *, per_session: int = 2) -> int:
    """``concurrency``, or less when the open-file limit cannot hold that many
    sessions: the soft limit is raised toward the hard one first; else the sessions
    are capped, with one warning (not one "Too many open files" result each).

    A session holds one socket, but a finished session's socket is released a loop
    turn after its slot has opened the next one: two files a session, at the peak."""
    try:
        import resource
    except ImportError:  # no such limit to raise here (Windows)
        return concurrency
    need = concurrency * per_session + _FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return concurrency
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft >= need:
        return concurrency
    fitted = max(1, (soft - _FD_HEADROOM) // per_session)
    print(
        f"asmtp: warning: --concurrency {concurrency} needs about {need} open files and "
        f"the limit is {soft} (ulimit -n); sending with --concurrency {fitted}",
        file=sys.stderr,
        flush=True,
    )
    return fitted


@contextlib.contextmanager
def on_ctrl_c(handler: Callable[[], None]) -> Iterator[None]:
    """Inside the block Ctrl-C calls ``handler`` (in the running event loop), where the
    loop can take signal handlers; elsewhere (not the main thread, no signal support)
    Ctrl-C raises KeyboardInterrupt as usual, which the commands handle."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, handler)
    except (NotImplementedError, RuntimeError, ValueError):  # no signals here: ^C raises
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)
