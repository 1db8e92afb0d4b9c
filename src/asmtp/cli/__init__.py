"""Layer 6, the ``asmtp`` command, for people: ``send``, ``mx``, ``demo`` and ``bench``.

It may import every layer below it. Its dependencies (rich, aiosmtpd) come with the
``cli`` extra: ``pip install 'asmtp[cli]'``.

Where things are: ``main`` (the parser wiring, :func:`main` and exit statuses),
``options`` (what every command shares: argument types, exit statuses, the event-loop
runner, stdout and open-file plumbing), ``send`` (``asmtp send``: its options, plan and
run), ``plan`` (options checked into typed settings: message parts, destination, Mailer
settings, journal checks), ``bulk`` (``--recipients FILE``), ``run`` (delivering a plan,
Ctrl-C), ``output`` (JSON Lines, log file, progress bar, summary table), ``mx``, ``demo``
and ``bench/``.
"""

from .main import main

__all__ = ["main"]
