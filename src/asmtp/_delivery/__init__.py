"""Layer 4, delivery: sessions and the fan-out built on them.

One SMTP session's policy written once as steps for both drivers (``session``; where
and how it connects in ``endpoint``, one mail transaction's steps in ``transaction``), the
fan-out under a limit with one result per recipient (``dispatch``), direct delivery to
each domain's MX hosts (``direct``), pooled sessions (``pool``), the journal
(``journal``), retry decisions and rate limits (``retry``), the long-lived sender
(``mailer``) and the public entry points ``sendmail``/``send``/``connect`` (``api``).
They may import layers 0-3.
"""
