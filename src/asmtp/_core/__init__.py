"""Layer 1, sans-IO: every rule of the SMTP exchange and of the message, as pure code.

Bytes in, replies out. Nothing here imports asyncio, anyio, socket, ssl's I/O or dns, and
nothing here imports a higher layer: the reply parser (``reply``), the EHLO capabilities
(``capabilities``), the client state machine (``protocol``), what a session asks of its
driver (``steps``), SASL (``sasl``), address and header checks (``address``), message
building and envelopes (``message``, with ``parts`` and ``template``), the message made
ready to send (``prepared``: serialized by ``serialize``, its octets checked and
dot-stuffed by ``wire``), DKIM signing (``dkim``), recipients files
(``recipients``), bounces and complaints classified (``bounce``, reading messages through
``bounce_parse``) and server text made safe for a terminal (``sanitize``). It may import
layer 0 (:mod:`asmtp.errors`, :mod:`asmtp._version`) and the standard library.
"""
