"""``asmtp sink``: a load-test SMTP server with latency emulation and fault injection.

:mod:`.session` (the exchange, sans-IO: settings, counters, replies), :mod:`.server`
(the asyncio server: connections, the round-trip emulation, STARTTLS) and :mod:`.main`
(the command: options, the run, the counters printed).
"""
