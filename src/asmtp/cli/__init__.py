"""Layer 6, the ``asmtp`` command, for people: ``send``, ``mx``, ``demo`` and ``bench``.

It may import every layer below it. Its dependencies (rich, aiosmtpd) come with the
``cli`` extra: ``pip install 'asmtp[cli]'``.
"""

from .main import main

__all__ = ["main"]
